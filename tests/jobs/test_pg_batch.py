"""The PostgreSQL store's group commit: round trips per operation, no savepoints, and the redo when one fails late."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import trio
import trio.testing

from ocf.errors import LeaseNotHeld, StoreUnavailable
from ocf.jobs.core import BatchRedo
from ocf.jobs.pg import PgJobStore
from ocf.jobs.pg.pipe import Pipe, Prepared, changes_rows
from ocf.jobs.tracker import REAPER_POLL, Tracker, _Op

T0 = 1_800_000_000.0
STAGES = {"stages": [{"name": "crawl", "lease_timeout": 60}, "embed", "filter"]}


@pytest.fixture
def store(pg_url: str):
    s = PgJobStore(pg_url)
    try:
        yield s
    finally:
        s.close()


def worker_with_leases(store: PgJobStore, n: int) -> tuple[str, list[dict[str, Any]]]:
    store.create_project("p", STAGES, T0)
    store.add_jobs("p", [f"in-{i}" for i in range(3 * n)], T0)
    token = store.register_worker("p", nickname="w", stage="crawl", now=T0)["token"]
    return token, store.claim("p", token, T0, limit=n)


def test_a_complete_and_claim_costs_two_round_trips_and_the_commit_one(store):
    token, jobs = worker_with_leases(store, 20)
    before = store.round_trips
    with store.batch():
        for half in (jobs[:10], jobs[10:]):
            done, claimed = store.complete_many(
                "p", token, [{"id": j["id"], "output": j["input"] + "!"} for j in half], T0 + 1, claim=10
            )
            assert [d["status"] for d in done] == ["done"] * 10 and len(claimed) == 10
    # Per operation: its reads (worker, jobs, the children's ids) in one, its writes and the claim in another;
    # its trailing writes and the batch's deltas travel with the next read and with the COMMIT.
    assert store.round_trips - before == 2 * 2 + 1
    assert store.counts("p")[0] == {"pending": 20, "leased": 20, "done": 20, "failed": 0, "superseded": 0}
    assert store.counts("p")[1]["pending"] == 20
    child = store.job("p", done[0]["children"][0])
    assert child["input"] == jobs[10]["input"] + "!" and child["stage"] == "embed"


def test_the_pipe_sends_everything_queued_with_the_first_read(store):
    with store.pool.connection() as conn:
        pipe = Pipe(conn)
        pipe.execute("BEGIN")
        pipe.execute("CREATE TEMP TABLE t (x int)")
        pipe.execute("INSERT INTO t VALUES (%s), (%s)", (1, 2))
        total = pipe.execute("SELECT sum(x) FROM t")
        assert pipe.round_trips == 0
        assert total.fetchone() == (3,) and pipe.round_trips == 1
        mark = pipe.mark()
        pipe.execute("INSERT INTO t VALUES (%s)", (5,))
        assert not pipe.wrote_since(mark) and not pipe.sent_since(mark)
        pipe.discard(mark)  # dropped before it was sent
        assert pipe.execute("SELECT count(*) FROM t").fetchone() == (2,) and pipe.round_trips == 2
        pipe.execute("ROLLBACK")
        pipe.sync()
    assert changes_rows("WITH picked AS (SELECT 1) UPDATE t SET x = 1") and not changes_rows(" select 1 FOR UPDATE")


def test_a_statement_is_prepared_once_per_connection_and_again_after_a_failed_message(store):
    prepared = Prepared()
    add = "SELECT %s::int + %s::int"
    with store.pool.connection() as conn:
        pipe = Pipe(conn, prepared)
        pipe.execute(add, (1, 2))
        three = pipe.execute(add, (3, 4))  # prepared in the message that first uses it, once
        assert [entry[1] for entry in pipe._queue] == [
            "PREPARE ocf_0 AS SELECT $1::int + $2::int",
            "EXECUTE ocf_0(1, 2)",
            "EXECUTE ocf_0(3, 4)",
        ]
        assert three.fetchone() == (7,)
        later = Pipe(conn, prepared)  # another pipe on the same connection: already prepared there
        eleven = later.execute(add, (5, 6))
        assert [entry[1] for entry in later._queue] == ["EXECUTE ocf_0(5, 6)"] and eleven.fetchone() == (11,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            later.execute("SELECT %s::int / 0", (1,)).fetchall()
        after = Pipe(conn, prepared)  # which PREPAREs of a failed message ran is unknown: start over
        two = after.execute(add, (1, 1))
        assert [entry[1] for entry in after._queue][:2] == [
            "DEALLOCATE ALL",
            "PREPARE ocf_0 AS SELECT $1::int + $2::int",
        ]
        assert two.fetchone() == (2,)


def test_a_batch_uses_no_savepoints_and_an_operation_refused_before_writing_fails_alone(store, monkeypatch):
    token, jobs = worker_with_leases(store, 2)
    sent: list[str] = []
    real_sync = Pipe.sync

    def spy(pipe: Pipe) -> None:
        sent.extend(entry[1] for entry in pipe._queue)
        real_sync(pipe)

    monkeypatch.setattr(Pipe, "sync", spy)
    other = store.register_worker("p", nickname="x", stage="crawl", now=T0)["token"]
    with store.batch():
        assert store.complete("p", token, jobs[0]["id"], "a", T0 + 1)["status"] == "done"
        with pytest.raises(LeaseNotHeld):  # read, then refused: nothing of it reached the server as a write
            store.complete("p", other, jobs[1]["id"], "b", T0 + 1)
        assert store.complete("p", token, jobs[1]["id"], "c", T0 + 1)["status"] == "done"
    assert not any("SAVEPOINT" in sql for sql in sent)
    assert store.counts("p")[0]["done"] == 2 and store.job("p", jobs[1]["id"])["done_by"] != "x"


def test_an_operation_failing_after_its_writes_were_sent_has_the_batch_run_again_isolated(store):
    token, jobs = worker_with_leases(store, 2)

    def fails_late(s: PgJobStore) -> Any:
        def op(tx: Any) -> None:
            tx.execute("UPDATE ocf_jobs_counters SET value = value + 100 WHERE project = 'p'")
            tx.execute("SELECT 1/0").fetchall()  # the server refuses it: the transaction is aborted

        return s._write(op)

    def complete(job: dict[str, Any]) -> Any:
        return lambda s: s.complete("p", token, job["id"], "out", T0 + 1)

    ops = [_Op(complete(jobs[0])), _Op(fails_late), _Op(complete(jobs[1]))]
    tracker = Tracker(store)
    tracker._run_batch(ops)
    assert tracker.batches_redone == 1
    assert [op.result["status"] for op in (ops[0], ops[2])] == ["done", "done"]
    assert ops[0].error is None and ops[2].error is None
    assert isinstance(ops[1].error, psycopg.errors.DivisionByZero)
    assert store.counts("p")[0] == {"pending": 4, "leased": 0, "done": 2, "failed": 0, "superseded": 0}


def test_without_the_redo_a_late_failure_commits_nothing(store):
    token, jobs = worker_with_leases(store, 1)
    with pytest.raises(BatchRedo), store.batch():
        assert store.complete("p", token, jobs[0]["id"], "out", T0 + 1)["status"] == "done"
        with pytest.raises(BatchRedo):
            store._write(lambda tx: tx.execute("SELECT 1/0").fetchall())
        with pytest.raises(BatchRedo):  # the batch is lost: later operations are not run
            store.add_jobs("p", ["late"], T0 + 1)
    assert store.counts("p")[0] == {"pending": 2, "leased": 1, "done": 0, "failed": 0, "superseded": 0}


def test_a_statement_cancelled_mid_batch_never_commits_the_rest_as_if_nothing_happened(store):
    token, jobs = worker_with_leases(store, 2)

    def cancelled(s: PgJobStore) -> Any:
        def op(tx: Any) -> None:
            tx.execute("SET LOCAL statement_timeout = '20ms'")
            tx.execute("SELECT pg_sleep(5)").fetchall()  # QueryCanceled: an OperationalError, the transaction aborted

        return s._write(op)

    def complete(job: dict[str, Any]) -> Any:
        return lambda s: s.complete("p", token, job["id"], "out", T0 + 1)

    ops = [_Op(complete(jobs[0])), _Op(complete(jobs[1])), _Op(cancelled)]  # the last: no statement after it
    tracker = Tracker(store)
    tracker._run_batch(ops)
    assert tracker.batches_redone == 1  # not a COMMIT that the server turned into a ROLLBACK
    assert isinstance(ops[2].error, StoreUnavailable)
    assert [op.result["status"] for op in ops[:2]] == ["done", "done"] and ops[0].error is None
    assert store.counts("p")[0]["done"] == 2


class _Quiet:
    """A blocking store whose leases are never due (the reaper only asks)."""

    blocking = True

    def take_enqueued(self) -> set[tuple[str, int]]:
        return set()

    def forget_idle_workers(self, now: float) -> int:
        return 0


async def test_the_reaper_on_a_shared_database_asks_at_most_twice_a_second(mock_clock):
    tracker = Tracker(_Quiet(), clock=trio.current_time)  # type: ignore[arg-type]
    polls: list[float] = []

    async def read(fn: Any) -> None:  # the reaper's only question: when is the next lease due?
        polls.append(trio.current_time())

    tracker.read = read  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tracker.run_reaper)
        for _ in range(200):  # a commit every 10 ms of the mock clock, for 2 s: each wakes the reaper
            tracker.notify()
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(0.01)
        nursery.cancel_scope.cancel()
    assert 4 <= len(polls) <= 5
    assert all(b - a >= REAPER_POLL - 1e-9 for a, b in zip(polls, polls[1:], strict=False))
