"""The tracker as a node subsystem: the store plus the tasks that make time pass.

:class:`~ocf.jobs.store.JobStore` is synchronous and clock-free; this module
adds what needs Trio: a reaper task that returns expired leases to pending
at their deadline (the original tracker's reclaim task died on a typo and
stuck jobs stayed stuck forever; ours is tested), a change notification that
long-polling claims and the dashboard's live feed wait on, and registration
of the ``jobs`` service so workers reach the tracker through any node.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import threading
import time
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Union, cast
from collections.abc import Callable, Sequence

import attrs
import trio

from .. import log as logfmt
from ..errors import StoreUnavailable
from .core import BatchRedo
from .model import Project
from .store import JobStore
from .writer import WriterThread
import trio.lowlevel

if TYPE_CHECKING:
    from .pg import PgJobStore

#: Either store: the embedded LMDB one (the default) or PostgreSQL, shared by several nodes.
TrackerStore = Union["JobStore", "PgJobStore"]

log = logging.getLogger("ocf.jobs")

IDLE_SWEEP_INTERVAL = 60.0
MAX_REAPER_SLEEP = 5.0
MAX_CLAIM_WAIT = 60.0
CREATE_CHUNK = 2000
CHECK_SLICE = 1000
PARALLEL_BATCHES = 4  # PostgreSQL batches in flight at once per node
READ_THREADS = 4  # concurrent PostgreSQL reads (dashboard, reports) per node
STORE_RETRY = 2.0  # seconds the reaper waits before trying an unreachable database again
SNAPSHOT_INTERVAL = 5.0  # seconds between refreshes of the /metrics counts of a blocking store
#: A blocking store's reaper asks the database at most this often: every commit wakes it, and on a
#: shared database each wake-up would be a query on every node.
REAPER_POLL = 0.5


T = TypeVar("T")

#: One store operation for the group commit: it runs on the writer thread, in its own child
#: transaction, so it must not read the clock or anything else the Trio thread changes.
StoreOp = Callable[["TrackerStore"], T]
#: What to do if the caller leaves after the operation began: given its result, the operation
#: that hands back what it leased (or None when it leased nothing).
Undo = Callable[[T], "StoreOp[int] | None"]


@attrs.define(eq=False)
class _Op(Generic[T]):
    run: StoreOp[T]
    result: T | None = None
    error: BaseException | None = None
    abandoned: bool = False  # the caller left before the writer began it: skip it
    started: bool = False  # the writer began it: too late to skip
    done: trio.Event = attrs.field(factory=trio.Event)


def _release_gil() -> None:
    """On the writer thread: let the event loop's thread take the GIL now if it waits for it.

    A thread that wants the GIL otherwise waits out the switch interval
    (5 ms) each time, and the event loop's thread needs it at every step: a
    long burst of Python on the writer would stretch the loop's steps by
    that much, over and over.
    """
    time.sleep(0)


def _second(pair: tuple[Any, T]) -> T:
    return pair[1]


class Tracker:
    """Mutations go through here so waiters learn of them; reads may use :attr:`store`."""

    def __init__(
        self, store: TrackerStore, clock: Callable[[], float] = time.time, *, create_chunk: int = CREATE_CHUNK
    ) -> None:
        self.store = store
        #: PostgreSQL's store blocks on the network: its reads go to worker threads, never this one.
        self.blocking: bool = getattr(store, "blocking", False)
        self._read_limiter = trio.CapacityLimiter(READ_THREADS)
        #: Per-project job counts for /metrics when reading them would block (refreshed by a task).
        self.counts_snapshot: list[tuple[Any, list[dict[str, int]], int]] = []
        self._store_log = logfmt.RateLimitedLog(log, 30.0)
        self.clock = clock
        self.create_chunk = create_chunk
        # Job creation is chunked across transactions; one creation at a time keeps each
        # request's ids contiguous and its idempotency record in step with what was written.
        self._create_lock = trio.Lock()
        # Guards an op's abandoned/started pair, read by the writer thread and set by Trio.
        self._op_lock = threading.Lock()
        self.batches_redone = 0  # group commits run again with every op isolated (see _run_batch)
        self._last_poll = -REAPER_POLL  # when the reaper last asked a blocking store (Trio's clock)
        self._writer: WriterThread | None = None
        self.version = 0
        self._changed = trio.Event()
        # Claimers long-polling a stage wait here, not on every change: a thousand idle
        # workers must not all wake for each completion elsewhere.
        self._stage_events: dict[tuple[str, int], trio.Event] = {}
        self.waiting_claims = 0  # long-polling claims waiting for a job right now
        # Group commit: operations queued by requests, run and committed together by run_committer.
        self._queue: list[_Op[Any]] = []
        self._work = trio.Event()
        self._committer: trio.lowlevel.Task | None = None

    # --- reads ---------------------------------------------------------------------------------

    async def read(self, fn: Callable[[TrackerStore], T]) -> T:
        """``fn(store)``: inline for LMDB (a read never waits), on a worker thread for PostgreSQL."""
        if not self.blocking:
            return fn(self.store)
        return await trio.to_thread.run_sync(fn, self.store, limiter=self._read_limiter)

    async def project(self, name: str) -> Project:
        """A project's definition (404 if unknown); cached by either store once seen."""
        cached = getattr(self.store, "cached_project", None)
        if cached is not None:
            project: Project | None = cached(name)
            if project is not None:
                return project
        return await self.read(lambda store: store.project(name))

    # --- change notification ----------------------------------------------------------------

    def remote_changed(self, stages: list[tuple[str, int]] | None) -> None:
        """Another node committed a change (its NOTIFY): wake who waits here, as a local commit would."""
        if stages is None:
            events = list(self._stage_events.values())
            self._stage_events.clear()
        else:
            events = [e for e in (self._stage_events.pop(key, None) for key in stages) if e is not None]
        for event in events:
            event.set()
        self.version += 1
        self._wake()

    def notify(self) -> None:
        # Swaps the store's set of enqueued stages, which a batch fills as it runs: between batches
        # for LMDB (its writer thread is idle then); the PostgreSQL store guards the swap with a lock.
        for key in self.store.take_enqueued():
            event = self._stage_events.pop(key, None)
            if event is not None:
                event.set()
        self.version += 1
        self._wake()

    def _wake(self) -> None:
        """Wake :meth:`wait_until` callers (and the reaper) to look again."""
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def wait_changed(self, since: int) -> int:
        """Return the current version once it differs from ``since``."""
        while self.version == since:
            await self._changed.wait()
        return self.version

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait (without polling) until ``predicate()`` holds after some change."""
        while not predicate():
            await self._changed.wait()

    # --- mutations ------------------------------------------------------------------------------

    def _mutate(self, run: StoreOp[T]) -> T:
        """Run a store operation now, on this thread (only before the committer runs, and in tests)."""
        result = run(self.store)
        self.notify()
        return result

    def _hand_back(self, name: str, token: Any) -> Undo[Sequence[dict[str, Any]]]:
        """An :data:`Undo` for an operation that leased ``jobs`` to ``token``: release them (no attempt used)."""

        def undo(jobs: Sequence[dict[str, Any]]) -> StoreOp[int] | None:
            ids = [job["id"] for job in jobs]
            if not ids:
                return None
            now = self.clock()
            return lambda store: store.release(name, token, ids, now)

        return undo

    async def _batched(self, run: StoreOp[T], *, undo: Undo[T] | None = None) -> T:
        """Run a store operation in the next group commit and return its result once durable.

        Requests that arrive together (a hundred workers each claiming and
        completing) share one LMDB commit, so one fsync covers many answers
        instead of each answer paying its own. ``undo`` hands back what the
        operation leased if the caller leaves while it runs.
        """
        if self._committer is None:
            return self._mutate(run)
        op: _Op[T] = _Op(run)
        self._queue.append(op)
        self._work.set()
        try:
            await op.done.wait()
        except trio.Cancelled:
            # The caller left (a long-polling client hung up). Not begun yet: the writer skips
            # it, so no job is leased to nobody. Already begun: wait for it, then hand back
            # what it leased (no attempt used), as a lease nobody will heartbeat.
            with self._op_lock:
                op.abandoned = True
                started = op.started
            if started:
                with trio.CancelScope(shield=True):
                    await op.done.wait()
                hand_back = undo(cast(T, op.result)) if undo is not None and op.error is None else None
                if hand_back is not None:
                    self._queue.append(_Op(hand_back))
                    self._work.set()
            raise
        if op.error is not None:
            raise op.error
        return cast(T, op.result)

    def _run_batch(self, ops: list[_Op[Any]]) -> None:
        """On the writer thread: run the ops, one durable commit for all; a failing op fails alone.

        The store may run a batch's ops without isolating each (PostgreSQL:
        savepoints cost its server more than the ops); when one then fails in
        a way it cannot undo alone, nothing was committed and the batch runs
        again ``isolated``, each op in its own child transaction.
        """
        try:
            try:
                self._run_ops(ops, isolated=False)
            except BatchRedo:
                self.batches_redone += 1
                self._run_ops(ops, isolated=True)
        except Exception as exc:  # the commit itself failed (disk full...): nobody's change is durable
            log.error("job tracker commit failed %s", logfmt.kv(ops=len(ops), error=exc))
            for op in ops:
                op.error = exc

    def _run_ops(self, ops: list[_Op[Any]], *, isolated: bool) -> None:
        with self.store.batch(isolated=isolated):
            for op in ops:
                with self._op_lock:
                    if op.abandoned and not op.started:
                        continue
                    op.started = True
                op.result, op.error = None, None
                try:
                    op.result = op.run(self.store)
                except Exception as exc:  # this request's error (404, 409...): others go on
                    op.error = exc
                _release_gil()

    async def run_committer(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.blocking:
            await self._run_parallel_committer(task_status)
            return
        self._committer = trio.lowlevel.current_task()
        writer = self._writer = WriterThread()
        self.store.yield_gil = _release_gil
        try:
            task_status.started()
            while True:
                await self._work.wait()
                self._work = trio.Event()
                await trio.lowlevel.checkpoint()  # requests made runnable by the same I/O join this batch
                ops, self._queue = [op for op in self._queue if not op.abandoned], []
                if not ops:
                    continue
                # The batch runs and commits (fsync) on the writer thread; this task waits
                # without holding the event loop, and answers once the batch is durable.
                await writer.run(functools.partial(self._run_batch, ops))
                self.notify()
                for op in ops:
                    op.done.set()
        finally:
            self.store.yield_gil = None
            self._committer = None
            self._writer = None
            for op in self._queue:  # the node is stopping: fail the stragglers rather than hang them
                op.error = RuntimeError("job tracker stopped")
                op.done.set()
            writer.close()

    async def _run_parallel_committer(self, task_status: Any) -> None:
        """Group commit for a networked store: up to ``PARALLEL_BATCHES`` batches in flight at once.

        A PostgreSQL batch spends most of its time waiting for round trips, not
        for a disk or a lock, so while one waits another can run on its own
        connection (the database orders them with row locks, as it does the
        batches of other nodes). A batch starts when a writer is free and takes
        every operation queued by then, so under load batches grow instead of queueing.
        """
        self._committer = trio.lowlevel.current_task()
        writers = trio.CapacityLimiter(PARALLEL_BATCHES)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    await self._work.wait()
                    self._work = trio.Event()
                    borrower = object()
                    await writers.acquire_on_behalf_of(borrower)
                    await trio.lowlevel.checkpoint()  # requests made runnable by the same I/O join this batch
                    ops, self._queue = [op for op in self._queue if not op.abandoned], []
                    if not ops:
                        writers.release_on_behalf_of(borrower)
                        continue
                    nursery.start_soon(self._commit_in_thread, ops, writers, borrower)
        finally:
            self._committer = None
            for op in self._queue:
                op.error = RuntimeError("job tracker stopped")
                op.done.set()

    async def _commit_in_thread(self, ops: list[_Op[Any]], writers: trio.CapacityLimiter, borrower: object) -> None:
        try:
            # Not cancellable once handed over: the thread finishes (commits or rolls back) first.
            await trio.to_thread.run_sync(self._run_batch, ops)
        finally:
            writers.release_on_behalf_of(borrower)
        self.notify()
        for op in ops:
            op.done.set()

    async def create_project(self, name: str, body: Any) -> Any:
        now = self.clock()
        project, created = await self._batched(lambda store: store.create_project(name, body, now))
        if created:
            log.info("project created %s", logfmt.kv(project=name, stages=",".join(s.name for s in project.stages)))
        return project, created

    async def add_jobs(self, name: str, inputs: list[Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Create stage-1 jobs in transactions of at most ``create_chunk``, yielding between them.

        A million inputs in one transaction held the writer (and, before it
        had a thread, the event loop) for many seconds; chunks let claims and
        completions commit in between. Every input is checked first, so a bad
        one refuses the whole request before anything is written. With an
        idempotency key, a request cut short (a crash mid-way) resumes where
        its last durable chunk ended when retried, instead of duplicating it.
        """
        await self.project(name)
        for start in range(0, len(inputs), CHECK_SLICE):
            for value in inputs[start : start + CHECK_SLICE]:
                self.store.check_payload(value, "job input")
            await trio.lowlevel.checkpoint()
        async with self._create_lock:
            carry: dict[str, Any] | None = None
            answer: dict[str, Any]
            position = 0
            if idempotency_key:
                previous = await self.read(lambda store: store.creation_record(name, idempotency_key))
                if previous is not None and previous.get("done", True):
                    previous.pop("done", None)
                    return dict(previous, repeated=True)
                if previous is not None:
                    carry, position = previous, previous["created"]
            while True:
                chunk = inputs[position : position + self.create_chunk]
                position += len(chunk)
                final = position >= len(inputs)
                # methodcaller, not a lambda: it binds this iteration's chunk and carry now.
                op = operator.methodcaller(
                    "add_jobs",
                    name,
                    inputs=chunk,
                    now=self.clock(),
                    idempotency_key=idempotency_key,
                    carry=carry,
                    final=final,
                )
                carry = answer = await self._batched(op)
                if final:
                    return answer

    async def register_worker(self, name: str, *, nickname: str, stage: Any, user: str | None = None) -> dict[str, Any]:
        now = self.clock()
        worker = await self._batched(
            lambda store: store.register_worker(name, nickname=nickname, stage=stage, now=now, user=user)
        )
        log.info(
            "worker registered %s",
            logfmt.kv(project=name, worker=worker["name"], user=worker["user"], stage=worker["stage"] + 1),
        )
        return worker

    async def claim(
        self, name: str, token: Any, *, limit: int = 1, stage: Any = None, wait: float = 0.0, release_held: bool = False
    ) -> list[dict[str, Any]]:
        """Lease up to ``limit`` jobs; with ``wait`` > 0, wait that long for one to appear (long poll)."""
        now = self.clock()
        hand_back = self._hand_back(name, token)
        jobs = await self._batched(
            lambda store: store.claim(name, token, now, limit=limit, stage=stage, release_held=release_held),
            undo=hand_back,
        )
        if jobs or wait <= 0:
            return jobs
        now = self.clock()
        key = (name, await self.read(lambda store: store.worker_stage(name, token, now)))
        self.waiting_claims += 1
        self._wake()
        try:
            with trio.move_on_after(min(wait, MAX_CLAIM_WAIT)):
                while True:
                    event = self._stage_events.get(key)
                    if event is None:
                        event = self._stage_events[key] = trio.Event()
                    await event.wait()
                    again = operator.methodcaller("claim", name, token, self.clock(), limit=limit, stage=stage)
                    jobs = await self._batched(again, undo=hand_back)
                    if jobs:
                        return jobs
            return []
        finally:
            self.waiting_claims -= 1
            self._wake()

    async def heartbeat(self, name: str, token: Any, *, progress: Any = None, jobs: Any = None) -> dict[str, Any]:
        now = self.clock()
        return await self._batched(lambda store: store.heartbeat(name, token, now, progress=progress, jobs=jobs))

    async def complete(self, name: str, token: Any, job_id: Any, output: Any) -> dict[str, Any]:
        now = self.clock()
        return await self._batched(lambda store: store.complete(name, token, job_id, output, now))

    async def complete_many(
        self, name: str, token: Any, items: Any, *, claim: int = 0
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        now = self.clock()
        hand_back = self._hand_back(name, token)
        return await self._batched(
            lambda store: store.complete_many(name, token, items, now, claim=claim),
            undo=lambda done: hand_back(_second(done)),
        )

    async def fail(self, name: str, token: Any, job_id: Any, error: Any) -> dict[str, Any]:
        now = self.clock()
        result = await self._batched(lambda store: store.fail(name, token, job_id, error, now))
        log.info(
            "job failed by worker %s",
            logfmt.kv(project=name, job=result["id"], now=result["status"], attempts=result["attempts"]),
        )
        return result

    async def flag(self, name: str, token: Any, job_id: Any, reason: Any = None) -> dict[str, Any]:
        now = self.clock()
        result = await self._batched(lambda store: store.flag(name, token, job_id, now, reason))
        if result["status"] != "flagged":
            log.warning(
                "job input flagged invalid %s",
                logfmt.kv(project=name, job=result["id"], outcome=result["status"], redo=result.get("redo", "-")),
            )
        return result

    async def bye(self, name: str, token: Any) -> int:
        now = self.clock()
        return await self._batched(lambda store: store.bye(name, token, now))

    # --- time ------------------------------------------------------------------------------------

    def _log_expired(self, expired: list[tuple[str, int, str]]) -> None:
        if expired:
            failed = sum(1 for *_, state in expired if state == "failed")
            log.info("leases expired %s", logfmt.kv(jobs=len(expired), requeued=len(expired) - failed, failed=failed))

    async def expire_at_start(self) -> list[tuple[str, int, str]]:
        """Expire leases that ran out while the node was down (before the writer thread runs)."""
        now = self.clock()
        if self.blocking:
            expired = await self.read(lambda store: store.expire(now))
            self.notify()
        else:
            expired = self._mutate(lambda store: store.expire(now))
        self._log_expired(expired)
        return expired

    async def expire_now(self) -> list[tuple[str, int, str]]:
        now = self.clock()
        expired = await self._batched(lambda store: store.expire(now))
        self._log_expired(expired)
        return expired

    async def _forget_idle_workers(self, now: float) -> int:
        return await self._batched(lambda store: store.forget_idle_workers(now))

    async def run_reaper(self) -> None:
        """Return expired leases to pending at their deadline, for as long as the node runs.

        With PostgreSQL every node runs one; they share the work safely (a lease
        locked by one reaper is skipped by the others). A database that is down
        pauses the reaper, it does not stop it.
        """
        next_sweep = self.clock() + IDLE_SWEEP_INTERVAL
        while True:
            try:
                next_sweep = await self._reap_once(next_sweep)
            except StoreUnavailable as exc:
                self._store_log.log(
                    logging.WARNING, "reaper", "job tracker reaper waits for its database", error=exc.message[:200]
                )
                with trio.move_on_after(STORE_RETRY):
                    await self._changed.wait()

    async def _reap_once(self, next_sweep: float) -> float:
        if self.blocking:
            await trio.sleep_until(self._last_poll + REAPER_POLL)
            self._last_poll = trio.current_time()
        now = self.clock()
        if now >= next_sweep:
            forgotten = await self._batched(lambda store: store.forget_idle_workers(now))
            if forgotten:  # the committer notified waiters after that batch
                log.info("idle workers forgotten %s", logfmt.kv(workers=forgotten))
            next_sweep = now + IDLE_SWEEP_INTERVAL
        due = await self.read(lambda store: store.next_expiry())
        if due is not None and due <= now:
            await self.expire_now()
            await trio.lowlevel.checkpoint()  # let requests run between large batches
            return next_sweep
        delay = min(MAX_REAPER_SLEEP, next_sweep - now, (due - now) if due is not None else MAX_REAPER_SLEEP)
        # A claim may create a lease due sooner than what we sleep for: wake on changes too.
        with trio.move_on_after(max(delay, 0.001)):
            await self._changed.wait()
        return next_sweep

    async def run_snapshots(self) -> None:
        """Keep :attr:`counts_snapshot` fresh for /metrics (a scrape must not wait for the database)."""
        while True:
            with contextlib.suppress(StoreUnavailable):  # keep the last copy while the database is down
                self.counts_snapshot = await self.read(
                    lambda store: [(p, store.counts(p.name), store.result_count(p.name)) for p in store.projects()]
                )
            await trio.sleep(SNAPSHOT_INTERVAL)
