"""One operation's view of the PostgreSQL store: its rows, its writes, and its share of the batch's deltas.

An operation (a claim, a completion...) reads rows it will change with
``FOR UPDATE`` (so another node's batch cannot change them under it), edits
them as the same dicts the LMDB store uses, and writes them back in a few
statements at its end (:meth:`PgTx.flush`): one ``COPY`` for new jobs, one
pipelined ``executemany`` for changed ones. Counter, leaderboard and
throughput changes are only *deltas* here; the batch applies them once, sorted,
just before its commit (:class:`BatchState`), so hot rows are locked briefly
and always in the same order on every node. Last-stage results are numbered
there too, under the project's ``results`` counter lock, so a result's
``seq`` follows commit order and paging by ``after=seq`` never skips one that
committed late.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar
from collections.abc import Iterator

import psycopg
from psycopg.types.json import Json

from .schema import ALL_TIME, PREFIX

Record = dict[str, Any]
JOB_COLS = "id, stage, state, qseq, worker, lease_expires, attempts, parent, root, input, extra"
COLUMN_KEYS = frozenset(
    ("id", "stage", "state", "qseq", "worker", "lease_expires", "attempts", "parent", "root", "input")
)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def jsonb(value: Any) -> Json:
    return Json(value, dumps=dumps)


def row_to_job(row: tuple[Any, ...]) -> Record:
    job_id, stage, state, qseq, worker, expires, attempts, parent, root, value, extra = row
    job: Record = dict(extra)
    job.update(id=job_id, stage=stage, state=state, attempts=attempts, parent=parent, root=root, input=value)
    if qseq is not None:
        job["qseq"] = qseq
    if worker is not None:
        job["worker"] = worker
    if expires is not None:
        job["lease_expires"] = expires
    return job


K = TypeVar("K")


def _add(into: dict[K, int], deltas: dict[K, int]) -> None:
    for key, delta in deltas.items():
        into[key] = into.get(key, 0) + delta


class BatchState:
    """What a group commit accumulates from its operations, applied once before the commit."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str], int] = {}
        self.board: dict[tuple[str, int, str, str, int], int] = {}
        self.series: dict[tuple[str, int, int], int] = {}
        self.firsts: dict[tuple[str, int], int] = {}
        self.results: list[tuple[str, Record]] = []
        self.enqueued: set[tuple[str, int]] = set()
        self.wrote = False

    def merge(self, other: BatchState) -> None:
        _add(self.counters, other.counters)
        _add(self.board, other.board)
        _add(self.series, other.series)
        for key, ms in other.firsts.items():
            self.firsts.setdefault(key, ms)
        self.results.extend(other.results)
        self.enqueued |= other.enqueued
        self.wrote = self.wrote or other.wrote

    def apply(self, tx: PgTx) -> None:
        """Write the deltas in key order (no two batches deadlock on them) and number the results."""
        if self.counters:
            keys = sorted(self.counters)
            counted = tx.execute(
                f"""INSERT INTO {PREFIX}counters AS c (project, name, value)
                    SELECT p, n, v FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS t(p, n, v)
                    ORDER BY p, n
                    ON CONFLICT (project, name) DO UPDATE SET value = GREATEST(0, c.value + excluded.value)
                    RETURNING project, name, value""",
                ([k[0] for k in keys], [k[1] for k in keys], [self.counters[k] for k in keys]),
            )
            totals = {(p, n): v for p, n, v in counted.fetchall()}
            if self.results:
                self._insert_results(tx, totals)
        if self.firsts:
            keys2 = sorted(self.firsts)
            tx.execute(
                f"""INSERT INTO {PREFIX}counters (project, name, value)
                    SELECT p, 's' || s || '.first_ms', v
                    FROM unnest(%s::text[], %s::int[], %s::bigint[]) AS t(p, s, v) ORDER BY 1, 2
                    ON CONFLICT (project, name) DO NOTHING""",
                ([k[0] for k in keys2], [k[1] for k in keys2], [self.firsts[k] for k in keys2]),
            )
        if self.board:
            bkeys = sorted(self.board)
            tx.execute(
                f"""INSERT INTO {PREFIX}board AS b (project, hour, kind, who, stage, n)
                    SELECT * FROM unnest(
                        %s::text[], %s::int[], %s::text[], %s::text[], %s::smallint[], %s::bigint[])
                    ORDER BY 1, 2, 3, 4, 5
                    ON CONFLICT (project, hour, kind, who, stage) DO UPDATE SET n = b.n + excluded.n""",
                tuple([k[i] for k in bkeys] for i in range(5)) + ([self.board[k] for k in bkeys],),
            )
        if self.series:
            skeys = sorted(self.series)
            tx.execute(
                f"""INSERT INTO {PREFIX}series AS s (project, minute, stage, n)
                    SELECT * FROM unnest(%s::text[], %s::int[], %s::smallint[], %s::bigint[]) ORDER BY 1, 2, 3
                    ON CONFLICT (project, minute, stage) DO UPDATE SET n = s.n + excluded.n""",
                tuple([k[i] for k in skeys] for i in range(3)) + ([self.series[k] for k in skeys],),
            )

    def _insert_results(self, tx: PgTx, totals: dict[tuple[str, str], int]) -> None:
        per_project: dict[str, list[Record]] = {}
        for project, result in self.results:
            per_project.setdefault(project, []).append(result)
        rows = []
        for project, results in per_project.items():
            last = totals[(project, "results")]
            for offset, result in enumerate(results):
                rows.append((project, last - len(results) + 1 + offset, dumps(result)))
        tx.execute(
            f"""INSERT INTO {PREFIX}results (project, seq, rec)
                SELECT p, s, r::json FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS t(p, s, r)""",
            ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
        )


class Result:
    """The rows of a queued statement, fetched (with everything queued before it) when first read."""

    __slots__ = ("tx", "rows")

    def __init__(self, tx: PgTx) -> None:
        self.tx = tx
        self.rows: list[tuple[Any, ...]] | None = None

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self.rows is None:
            self.tx.sync()
        assert self.rows is not None
        return self.rows

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self.fetchall()
        return rows[0] if rows else None

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


class PgTx:
    """The rows one operation read and will write back, and its deltas (merged into the batch on success)."""

    def __init__(self, conn: psycopg.Connection[Any], *, write: bool) -> None:
        self.conn = conn
        self.write = write
        self.lock = " FOR UPDATE" if write else ""
        self.deltas = BatchState()
        #: Job ids taken from a project's sequence in advance, for the children a batch of completions makes.
        self.spare_ids: dict[str, list[int]] = {}
        self._jobs: dict[tuple[str, int], Record | None] = {}
        self._dirty_jobs: dict[tuple[str, int], Record] = {}
        self._new_jobs: list[tuple[str, Record]] = []
        self._workers: dict[tuple[str, str], Record | None] = {}
        self._dirty_workers: dict[tuple[str, str], Record] = {}
        self._new_workers: list[tuple[str, Record]] = []
        self._cursor = psycopg.ClientCursor(conn)
        self._queue: list[tuple[str, Result]] = []
        self.sent = False  # whether any statement of this operation reached the server

    def execute(self, sql: str, params: Any = None) -> Result:
        """Queue a statement; it is sent with the next one whose rows are read (or at :meth:`sync`).

        A write nobody reads the answer of (an UPDATE, a SAVEPOINT) so costs no
        round trip of its own: a completion's writes travel with its claim.
        Statements go as one simple-protocol message, interpolated by
        psycopg's client-side cursor (its quoting, not ours).
        """
        result = Result(self)
        self._queue.append((self._cursor.mogrify(sql, params) if params is not None else sql, result))
        return result

    def sync(self) -> None:
        """Send every queued statement now (one round trip), raising the first one's error."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        self.sent = True
        cur = self._cursor
        cur.execute(";\n".join(sql for sql, _ in queue))
        for i, (_, result) in enumerate(queue):
            result.rows = cur.fetchall() if cur.description is not None else []
            if i + 1 < len(queue):
                cur.nextset()

    def discard(self) -> None:
        self._queue = []

    # --- jobs ------------------------------------------------------------------------------

    def job(self, project: str, job_id: int) -> Record | None:
        key = (project, job_id)
        if key not in self._jobs:
            row = self.execute(
                f"SELECT {JOB_COLS} FROM {PREFIX}jobs WHERE project = %s AND id = %s{self.lock}", (project, job_id)
            ).fetchone()
            self._jobs[key] = row_to_job(row) if row is not None else None
        return self._jobs[key]

    def prefetch(self, project: str, job_ids: list[int]) -> None:
        """Read (and lock, in id order) many jobs in one statement."""
        missing = sorted({j for j in job_ids if (project, j) not in self._jobs})
        if not missing:
            return
        for job_id in missing:
            self._jobs[(project, job_id)] = None
        rows = self.execute(
            f"SELECT {JOB_COLS} FROM {PREFIX}jobs WHERE project = %s AND id = ANY(%s) ORDER BY id{self.lock}",
            (project, missing),
        ).fetchall()
        for row in rows:
            self._jobs[(project, row[0])] = row_to_job(row)

    def cache_job(self, project: str, job: Record) -> None:
        self._jobs[(project, job["id"])] = job

    def put_job(self, project: str, job: Record) -> None:
        key = (project, job["id"])
        self._dirty_jobs[key] = job
        self._jobs[key] = job

    def new_job(self, project: str, job: Record) -> None:
        self._new_jobs.append((project, job))
        self._jobs[(project, job["id"])] = job

    # --- workers ---------------------------------------------------------------------------

    def worker(self, project: str, token: str) -> Record | None:
        key = (project, token)
        if key not in self._workers:
            row = self.execute(
                f"SELECT rec FROM {PREFIX}workers WHERE project = %s AND token = %s{self.lock}", (project, token)
            ).fetchone()
            self._workers[key] = row[0] if row is not None else None
        return self._workers[key]

    def put_worker(self, project: str, worker: Record) -> None:
        key = (project, worker["token"])
        self._workers[key] = worker
        self._dirty_workers[key] = worker

    def new_worker(self, project: str, worker: Record) -> None:
        self._workers[(project, worker["token"])] = worker
        self._new_workers.append((project, worker))

    # --- deltas ----------------------------------------------------------------------------

    def bump(self, project: str, name: str, delta: int = 1) -> None:
        key = (project, name)
        self.deltas.counters[key] = self.deltas.counters.get(key, 0) + delta
        self.deltas.wrote = True

    def credit(self, project: str, user: str, worker: str, stage: int, now: float) -> None:
        hour = int(now // 3600)
        board = self.deltas.board
        for kind, who in (("u", user), ("w", worker)):
            for h in (ALL_TIME, hour):
                key = (project, h, kind, who, stage)
                board[key] = board.get(key, 0) + 1
        skey = (project, int(now // 60), stage)
        self.deltas.series[skey] = self.deltas.series.get(skey, 0) + 1

    # --- writing back ----------------------------------------------------------------------

    def flush(self) -> None:
        """Write new and changed rows, one statement each kind; a pending job without ``qseq`` joins its queue's tail.

        Statements whose results nobody reads: in the batch's pipeline they travel
        with the next statement that is read, not in round trips of their own.
        """
        new_keys = {(p, job["id"]) for p, job in self._new_jobs}
        if self._new_jobs:
            self.deltas.wrote = True
            rows = self._new_jobs
            self.execute(
                f"""INSERT INTO {PREFIX}jobs (project, id, stage, state, qseq, attempts, parent, root, input, extra)
                    SELECT p, i, s, st, CASE WHEN st = 'pending' THEN nextval('{PREFIX}qseq') END, 0, par, r,
                        inp::json, ex::json
                    FROM unnest(%s::text[], %s::bigint[], %s::smallint[], %s::text[], %s::bigint[], %s::bigint[],
                        %s::text[], %s::text[]) WITH ORDINALITY AS t(p, i, s, st, par, r, inp, ex, n)
                    ORDER BY n""",
                (
                    [p for p, _ in rows],
                    [j["id"] for _, j in rows],
                    [j["stage"] for _, j in rows],
                    [j["state"] for _, j in rows],
                    [j["parent"] for _, j in rows],
                    [j["root"] for _, j in rows],
                    [dumps(j["input"]) for _, j in rows],
                    [dumps({k: v for k, v in j.items() if k not in COLUMN_KEYS}) for _, j in rows],
                ),
            )
            self._new_jobs = []
        dirty = [(p, j) for (p, jid), j in self._dirty_jobs.items() if (p, jid) not in new_keys]
        if dirty:
            self.deltas.wrote = True
            self.execute(
                f"""UPDATE {PREFIX}jobs j SET state = u.st,
                        qseq = CASE WHEN u.st = 'pending' THEN COALESCE(u.q, nextval('{PREFIX}qseq')) END,
                        worker = u.w, lease_expires = u.e, attempts = u.a, input = u.inp::json, extra = u.ex::json
                    FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::float8[],
                        %s::int[], %s::text[], %s::text[]) AS u(p, i, st, q, w, e, a, inp, ex)
                    WHERE j.project = u.p AND j.id = u.i""",
                (
                    [p for p, _ in dirty],
                    [j["id"] for _, j in dirty],
                    [j["state"] for _, j in dirty],
                    [j.get("qseq") for _, j in dirty],
                    [j.get("worker") for _, j in dirty],
                    [j.get("lease_expires") for _, j in dirty],
                    [j["attempts"] for _, j in dirty],
                    [dumps(j["input"]) for _, j in dirty],
                    [dumps({k: v for k, v in j.items() if k not in COLUMN_KEYS}) for _, j in dirty],
                ),
            )
            # A requeued job's new qseq is the database's; forget our copy rather than guess it.
            for project, job in dirty:
                if job["state"] == "pending" and job.get("qseq") is None:
                    self._jobs.pop((project, job["id"]), None)
        self._dirty_jobs = {}
        new_workers = {(p, w["token"]) for p, w in self._new_workers}
        for project, worker in self._new_workers:
            self.deltas.wrote = True
            self.execute(
                f"INSERT INTO {PREFIX}workers (project, token, name, rec) VALUES (%s, %s, %s, %s)",
                (project, worker["token"], worker["name"], jsonb(worker)),
            )
        self._new_workers = []
        dirty_workers = [(key[0], w) for key, w in self._dirty_workers.items() if key not in new_workers]
        if dirty_workers:
            self.deltas.wrote = True
            self.execute(
                f"""UPDATE {PREFIX}workers w SET rec = u.rec::json
                    FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(p, t, rec)
                    WHERE w.project = u.p AND w.token = u.t""",
                (
                    [p for p, _ in dirty_workers],
                    [w["token"] for _, w in dirty_workers],
                    [dumps(w) for _, w in dirty_workers],
                ),
            )
        self._dirty_workers = {}
