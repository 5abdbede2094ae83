"""Connections, transactions and projects of the PostgreSQL store.

Every method of the store is synchronous and blocking, like the LMDB
store's, and for the same reason: the tracker runs writes on its writer
thread (the group commit) and reads on Trio's worker threads, never on the
event loop's. A write is a function of a :class:`~ocf.jobs.pg.tx.PgTx`;
inside :meth:`PgCore.batch` they run plainly in the batch's one
transaction, and one commit makes the batch durable. A refusal that cannot
be undone alone (or a deadlock between two nodes' batches) has the batch
run again with each operation in its own savepoint, where a refused one
rolls back alone and a deadlock victim retries that one operation. A
database that cannot be reached raises
:class:`~ocf.errors.StoreUnavailable` (503 with ``Retry-After``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any, TypeVar
from collections.abc import Callable, Iterator

import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolTimeout

from ... import log as logfmt
from ...errors import ConfigError, JobsPayloadTooLarge, ProjectExists, ProjectNotFound, StoreUnavailable
from ..keys import payload_size
from ..core import BatchRedo
from ..model import Project, parse_project
from ..txn import Enqueued
from .schema import CHANNEL, DDL, PREFIX, SCHEMA_LOCK, SCHEMA_VERSION, id_sequence, redact
from .pipe import Pipe, Prepared
from .tx import BatchState, PgTx, dumps, jsonb

log = logging.getLogger("ocf.jobs")
T = TypeVar("T")
RETRIES = 5
RETRY_AFTER = 2
CONNECT_TIMEOUT = 5
POOL_TIMEOUT = 2.0  # a request waits this long for a connection before its 503
RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def check_connection(url: str) -> None:
    """Connect once and create the schema; a bad URL or credentials become one :class:`ConfigError` line."""
    try:
        with (
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT, autocommit=True) as conn,
            conn.transaction(),
        ):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(DDL)
            conn.execute(
                f"INSERT INTO {PREFIX}meta (key, value) VALUES ('schema', %s) ON CONFLICT (key) DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            row = conn.execute(f"SELECT value FROM {PREFIX}meta WHERE key = 'schema'").fetchone()
    except (psycopg.Error, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError("--jobs.store", f"cannot use PostgreSQL at {redact(url)}: {reason}") from None
    if row is None or int(row[0]) != SCHEMA_VERSION:
        raise ConfigError(
            "--jobs.store", f"{redact(url)} holds tracker schema {row and row[0]}; this ocf reads {SCHEMA_VERSION}"
        )


class PgCore:
    """Settings, the connection pool, transactions and project definitions."""

    #: Store calls block on the network: the tracker must run them off the event loop's thread.
    blocking = True

    def __init__(
        self,
        url: str,
        *,
        max_stages: int = 5,
        max_attempts: int = 3,
        flag_threshold: int = 5,
        max_payload: int = 1 << 20,
        default_lease: float = 600.0,
        worker_timeout: float = 3600.0,
        flag_per_worker: bool = False,
        pool_size: int = 12,
        node: str = "",
    ) -> None:
        check_connection(url)
        self.url = url
        self.node = node
        self.flag_per_worker = flag_per_worker
        self.yield_gil: Callable[[], None] | None = None
        self.max_stages = max_stages
        self.max_attempts = max_attempts
        self.flag_threshold = flag_threshold
        self.max_payload = max_payload
        self.default_lease = default_lease
        self.worker_timeout = worker_timeout
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            timeout=POOL_TIMEOUT,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
            open=True,
            name="ocf-jobs",
        )
        self._projects: dict[str, tuple[Project, int]] = {}
        self._prepared = Prepared()  # the statements each connection of the pool has prepared
        # Several batches may run at once (one per writer thread, each its own connection and transaction).
        self._local = threading.local()
        self._enqueued_lock = threading.Lock()
        self._enqueued: Enqueued = set()
        self._firsts: set[tuple[str, int]] = set()
        self.retries = 0  # operations retried after a deadlock or serialization failure
        self.unavailable = 0  # operations refused because the database could not be reached
        self.round_trips = 0  # round trips of write transactions (batches and lone writes), for tests
        with contextlib.suppress(StoreUnavailable):
            self.projects()

    def close(self) -> None:
        self.pool.close()

    # --- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (psycopg.OperationalError, PoolTimeout, psycopg.errors.AdminShutdown) as exc:
            self.unavailable += 1
            reason = " ".join(str(exc).split())[:200]
            raise StoreUnavailable(
                f"the tracker's database is unavailable ({reason}); retry shortly", retry_after=RETRY_AFTER
            ) from exc

    @contextlib.contextmanager
    def batch(self, *, isolated: bool = False) -> Iterator[None]:
        """Run many operations in one transaction and one commit (group commit).

        The operations run one after another in the batch's transaction, with
        no savepoint each: a savepoint is a subtransaction to the server, and
        past 64 of them in one transaction every other backend's snapshot
        gets slower. An operation refused before any of its writes reached the
        server (the usual refusal: it read, then raised) drops its queued
        statements and fails alone. One that fails after, or a statement the
        server refuses (which aborts the transaction), raises
        :class:`~ocf.jobs.core.BatchRedo` out of this block, with nothing
        committed: the caller runs the batch again ``isolated``, each
        operation in its own savepoint, so the bad one fails alone there.

        Statements are queued on the batch's :class:`~ocf.jobs.pg.pipe.Pipe`
        (``BEGIN``, writes, ``COMMIT`` included), so they cost no round trips
        of their own: an operation is about one round trip per read it makes.
        """
        with self._errors(), self.pool.connection() as conn:
            pipe = Pipe(conn, self._prepared)
            pipe.execute("BEGIN")
            batch = _Batch(pipe, BatchState(), isolated)
            try:
                self._local.batch = batch
                try:
                    yield
                finally:
                    self._local.batch = None
                if batch.failed is not None:
                    raise BatchRedo("an operation of the batch failed after writing") from batch.failed
                end = PgTx(pipe, write=True)
                self._finish(end, batch.state)
                pipe.execute("COMMIT")
                pipe.sync()
                if pipe.status != "COMMIT":  # an aborted transaction "commits" as a rollback
                    raise BatchRedo(f"the batch's transaction ended in {pipe.status}, not COMMIT")
            except BaseException:
                pipe.discard()
                _rollback(conn, "ROLLBACK")
                raise
            self._committed(batch.state)
            self.round_trips += pipe.round_trips

    def _finish(self, tx: PgTx, state: BatchState) -> None:
        state.apply(tx)
        if state.wrote:
            payload = dumps({"node": self.node, "stages": sorted(state.enqueued)})
            if len(payload) > 7000:  # NOTIFY payloads stop at 8000 bytes: say "something changed"
                payload = dumps({"node": self.node, "stages": None})
            tx.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

    def _committed(self, state: BatchState) -> None:
        with self._enqueued_lock:
            self._enqueued |= state.enqueued
        self._firsts.update(state.firsts)

    def _write(self, op: Callable[[PgTx], T]) -> T:
        batch: _Batch | None = getattr(self._local, "batch", None)
        with self._errors():
            if batch is None:
                with self.pool.connection() as conn:
                    pipe = Pipe(conn, self._prepared)
                    try:
                        return self._attempts(pipe, op, None)
                    finally:
                        self.round_trips += pipe.round_trips
            if batch.isolated:
                return self._attempts(batch.pipe, op, batch.state)
            return self._plain(batch, op)

    def _plain(self, batch: _Batch, op: Callable[[PgTx], T]) -> T:
        """Run ``op`` in the batch's transaction as it is; its trailing writes go with the next statement read."""
        if batch.failed is not None:
            raise BatchRedo("the batch runs again") from batch.failed
        pipe = batch.pipe
        mark = pipe.mark()
        tx = PgTx(pipe, write=True)
        try:
            result = op(tx)
            tx.flush()
        except psycopg.Error as exc:  # the server refused a statement: the transaction is aborted
            batch.failed = exc
            if isinstance(exc, psycopg.OperationalError):
                raise  # the database may be down: a 503 if running the batch again cannot reach it either
            raise BatchRedo("a statement of the batch failed") from exc
        except BaseException as exc:
            if pipe.wrote_since(mark):
                batch.failed = exc
                raise BatchRedo("an operation failed after writing") from exc
            pipe.discard(mark)
            raise
        batch.state.merge(tx.deltas)
        return result

    def _attempts(self, pipe: Pipe, op: Callable[[PgTx], T], batch: BatchState | None) -> T:
        """Run ``op`` in a savepoint of ``batch`` (or in a transaction of its own), retrying a deadlock victim."""
        begin, commit, undo = ("SAVEPOINT ocf_op", "RELEASE SAVEPOINT ocf_op", "ROLLBACK TO SAVEPOINT ocf_op")
        if batch is None:
            begin, commit, undo = ("BEGIN", "COMMIT", "ROLLBACK")
        for attempt in range(RETRIES + 1):
            mark = pipe.mark()
            tx = PgTx(pipe, write=True)
            tx.execute(begin)
            try:
                result = op(tx)
                tx.flush()
                if batch is None:
                    self._finish(tx, tx.deltas)
                tx.execute(commit)
                tx.sync()
            except RETRYABLE:
                _rollback(pipe.conn, undo, release=batch is not None)
                if attempt == RETRIES:
                    raise
                self.retries += 1
                continue
            except BaseException:
                sent = pipe.sent_since(mark)
                pipe.discard(mark)
                if sent:
                    _rollback(pipe.conn, undo, release=batch is not None)
                raise
            if batch is None:
                self._committed(tx.deltas)
            else:
                batch.merge(tx.deltas)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _read(self, op: Callable[[PgTx], T], *, snapshot: bool = False) -> T:
        """A read; ``snapshot`` reads everything from one moment (reports that must add up)."""
        with self._errors(), self.pool.connection() as conn:
            pipe = Pipe(conn, self._prepared)
            tx = PgTx(pipe, write=False)
            if not snapshot:
                return op(tx)
            tx.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                result = op(tx)
                tx.execute("COMMIT")
                tx.sync()
            except BaseException:
                sent = pipe.sent_since(0)
                pipe.discard()
                if sent:
                    _rollback(conn, "ROLLBACK")
                raise
            return result

    def take_enqueued(self) -> Enqueued:
        with self._enqueued_lock:
            enqueued, self._enqueued = self._enqueued, set()
        return enqueued

    def first_known(self, project: str, stage: int) -> bool:
        return (project, stage) in self._firsts

    # --- projects -------------------------------------------------------------------------

    def create_project(self, name: str, body: Any, now: float) -> tuple[Project, bool]:
        project = parse_project(
            name,
            body,
            max_stages=self.max_stages,
            default_lease=self.default_lease,
            max_attempts=self.max_attempts,
            flag_threshold=self.flag_threshold,
            now=now,
        )

        def op(tx: PgTx) -> tuple[Project, bool, int]:
            row = tx.execute(
                f"""INSERT INTO {PREFIX}projects (name, definition) VALUES (%s, %s)
                    ON CONFLICT (name) DO NOTHING RETURNING pid""",
                (name, jsonb(project.to_json())),
            ).fetchone()
            if row is not None:
                tx.execute(f"CREATE SEQUENCE IF NOT EXISTS {id_sequence(row[0])}")
                tx.deltas.wrote = True
                return project, True, row[0]
            existing, pid = self._load_project(tx, name)
            if not existing.same_definition(project):
                raise ProjectExists(f"project {name!r} already exists with a different definition")
            return existing, False, pid

        result, created, pid = self._write(op)
        self._projects[name] = (result, pid)
        return result, created

    def _load_project(self, tx: PgTx, name: str) -> tuple[Project, int]:
        row = tx.execute(f"SELECT definition, pid FROM {PREFIX}projects WHERE name = %s", (name,)).fetchone()
        if row is None:
            raise ProjectNotFound(f"project {name!r} not found")
        return Project.from_json(row[0]), row[1]

    def project(self, name: str) -> Project:
        return self._project_entry(name)[0]

    def cached_project(self, name: str) -> Project | None:
        """The definition if this node has seen it (no database round trip), else None."""
        entry = self._projects.get(name)
        return entry[0] if entry is not None else None

    def _project_entry(self, name: str) -> tuple[Project, int]:
        entry = self._projects.get(name)
        if entry is None:
            # Another node may have created it; definitions never change once made, so caching is safe.
            entry = self._read(lambda tx: self._load_project(tx, name))
            self._projects[name] = entry
        return entry

    def projects(self) -> list[Project]:
        rows = self._read(lambda tx: tx.execute(f"SELECT definition, pid FROM {PREFIX}projects").fetchall())
        for definition, pid in rows:
            project = Project.from_json(definition)
            self._projects.setdefault(project.name, (project, pid))
        return [self._projects[name][0] for name in sorted(self._projects)]

    def check_payload(self, value: Any, what: str) -> None:
        if (
            value is None
            or isinstance(value, (bool, int, float))
            or (isinstance(value, str) and 6 * len(value) + 2 <= self.max_payload)
        ):
            return
        size = payload_size(value)
        if size > self.max_payload:
            raise JobsPayloadTooLarge(
                f"{what} is {size} bytes of JSON; the limit is {self.max_payload}", code="payload_too_large"
            )

    def _ids(self, tx: PgTx, name: str, count: int, *, reserve: int = 0) -> list[int]:
        """``count`` new job ids; ``reserve`` more are kept for this operation's next calls (one round trip)."""
        spare = tx.spare_ids.setdefault(name, [])
        pending = tx.pending_ids.pop(name, None)
        if pending is not None:
            spare.extend(sorted(r[0] for r in pending.fetchall()))
        if len(spare) < count or len(spare) < reserve:
            pid = self._project_entry(name)[1]
            wanted = max(count - len(spare), 0) + reserve
            rows = tx.execute(f"SELECT nextval('{id_sequence(pid)}') FROM generate_series(1, %s)", (wanted,)).fetchall()
            spare.extend(sorted(r[0] for r in rows))
        ids, tx.spare_ids[name] = spare[:count], spare[count:]
        return ids

    def _reserve_ids(self, tx: PgTx, name: str, token: str, count: int) -> None:
        """Queue taking ``count`` ids for the children of a worker's completions, if its stage has a next one.

        The worker's stage is read in the same statement, so the ids travel with
        the operation's first reads instead of a round trip after them.
        """
        pid = self._project_entry(name)[1]
        tx.pending_ids[name] = tx.execute(
            f"""SELECT nextval('{id_sequence(pid)}') FROM generate_series(1, (
                    SELECT CASE WHEN (rec->>'stage')::int < %s THEN %s ELSE 0 END
                    FROM {PREFIX}workers WHERE project = %s AND token = %s))""",
            (len(self.project(name).stages) - 1, count, name, token),
        )


class _Batch:
    """A group commit in progress on this thread: its pipe, its deltas, and how its operations run."""

    __slots__ = ("pipe", "state", "isolated", "failed")

    def __init__(self, pipe: Pipe, state: BatchState, isolated: bool) -> None:
        self.pipe = pipe
        self.state = state
        self.isolated = isolated
        #: Set when an operation failed in a way only running the batch again can undo.
        self.failed: BaseException | None = None


def _rollback(conn: psycopg.Connection[Any], undo: str, *, release: bool = False) -> None:
    """Undo an operation's writes; a connection that broke meanwhile is the pool's to discard."""
    if conn.closed or conn.broken:
        return
    with contextlib.suppress(psycopg.OperationalError):
        # Two statements in one message: the client-side cursor sends them with the simple protocol.
        psycopg.ClientCursor(conn).execute(undo + ("; RELEASE SAVEPOINT ocf_op" if release else ""))


def describe(exc: BaseException) -> str:
    return logfmt.kv(error=" ".join(str(exc).split())[:200])


__all__ = ["PgCore", "check_connection", "json"]
