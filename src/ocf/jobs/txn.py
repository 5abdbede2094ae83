"""Typed transactions over the tracker's sub-databases (layout in :mod:`ocf.jobs.keys`).

A :class:`Tx` is one LMDB transaction seen from one project (its key
prefix), with the records and counters the state machine reads and writes.
:class:`WriteScope` and :class:`ReadScope` open one: a write runs on its own
or, inside the tracker's group commit, as a child of the batch's parent
transaction, so an operation that fails rolls back alone while one commit
(one fsync) makes the whole batch durable.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol
from collections.abc import Iterator

from ..store import Store
from .keys import U64, Record, dumps, loads, pkey


class Cursor(Protocol):
    """The part of an LMDB cursor the tracker uses (py-lmdb ships no types)."""

    def set_range(self, key: bytes) -> bool: ...
    def first(self) -> bool: ...
    def last(self) -> bool: ...
    def prev(self) -> bool: ...
    def key(self) -> bytes: ...
    def value(self) -> bytes: ...
    def __iter__(self) -> Iterator[tuple[bytes, bytes]]: ...


class Txn(Protocol):
    """The part of an LMDB transaction the tracker uses."""

    def get(self, key: bytes, default: bytes | None = None, db: Any = None) -> bytes | None: ...
    def put(self, key: bytes, value: bytes, db: Any = None) -> bool: ...
    def delete(self, key: bytes, value: bytes = b"", db: Any = None) -> bool: ...
    def cursor(self, db: Any = None) -> Cursor: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


#: (project name, stage index) pairs that got pending jobs; the tracker wakes their claimers.
Enqueued = set[tuple[str, int]]


class Tx:
    """One write (or read) transaction with the tracker's sub-databases at hand."""

    __slots__ = ("txn", "dbs", "p", "enqueued", "_cache")

    def __init__(
        self,
        txn: Txn,
        dbs: dict[str, Any],
        project_key: bytes = b"",
        *,
        enqueued: Enqueued | None = None,
        cache: dict[tuple[str, bytes], int] | None = None,
    ) -> None:
        self.txn = txn
        self.dbs = dbs
        self.p = project_key
        self.enqueued: Enqueued = set() if enqueued is None else enqueued
        # Shared by every view of one transaction (expire() makes one per project).
        self._cache: dict[tuple[str, bytes], int] = {} if cache is None else cache

    def view(self, project_key: bytes) -> Tx:
        """The same transaction (counters included) seen from another project."""
        return Tx(self.txn, self.dbs, project_key, enqueued=self.enqueued, cache=self._cache)

    @property
    def project_name(self) -> str:
        return self.p[:-1].decode()

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self.dbs[db])

    def put(self, db: str, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs[db])

    def delete(self, db: str, key: bytes) -> bool:
        return self.txn.delete(key, db=self.dbs[db])

    def cursor(self, db: str) -> Cursor:
        return self.txn.cursor(db=self.dbs[db])

    def scan(self, db: str, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        cursor = self.cursor(db)
        if not cursor.set_range(start if start is not None else prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield key, value

    def scan_reverse(self, db: str, prefix: bytes, limit: int) -> Iterator[tuple[bytes, bytes]]:
        cursor = self.cursor(db)
        # Position after the last key with this prefix, then walk back.
        upper = prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else None
        ok = cursor.prev() if upper is not None and cursor.set_range(upper) else cursor.last()
        n = 0
        while ok and n < limit:
            key = cursor.key()
            if not key.startswith(prefix):
                return
            yield bytes(key), bytes(cursor.value())
            n += 1
            ok = cursor.prev()

    # counters --------------------------------------------------------------------------
    # A completion touches ~7 counters, some several times; they are read once and
    # written once per transaction (``flush``) instead of a get+put per change.

    def _counter(self, db: str, key: bytes) -> int:
        cached = self._cache.get((db, key))
        if cached is not None:
            return cached
        raw = self.get(db, key)
        value: int = U64.unpack(raw)[0] if raw else 0
        return value

    def count(self, name: str) -> int:
        return self._counter("counters", self.p + name.encode())

    def bump(self, name: str, delta: int = 1) -> int:
        key = self.p + name.encode()
        value = max(0, self._counter("counters", key) + delta)
        self._cache[("counters", key)] = value
        return value

    def add(self, db: str, key: bytes, delta: int = 1) -> None:
        self._cache[(db, key)] = self._counter(db, key) + delta

    def flush(self) -> None:
        for (db, key), value in self._cache.items():
            self.put(db, key, U64.pack(value))
        self._cache.clear()

    # records ----------------------------------------------------------------------------

    def job(self, job_id: int) -> Record | None:
        raw = self.get("jobs", self.p + U64.pack(job_id))
        return loads(raw, "job") if raw is not None else None

    def put_job(self, job: Record) -> None:
        self.put("jobs", self.p + U64.pack(job["id"]), dumps(job))

    def worker(self, token: str) -> Record | None:
        raw = self.get("workers", self.p + token.encode())
        return loads(raw, "worker") if raw is not None else None

    def put_worker(self, worker: Record) -> None:
        self.put("workers", self.p + worker["token"].encode(), dumps(worker))


class WriteScope:
    """``with WriteScope(...) as tx``: commit on a clean exit (counters flushed first), abort on an error.

    With a ``parent`` (the group commit's transaction) it is a child
    transaction: committing it only folds it into the parent, which the batch
    commits once for all.
    """

    __slots__ = ("_store", "_dbs", "_pkey", "_parent", "_enqueued", "_own", "_txn", "_tx")

    def __init__(
        self, store: Store, dbs: dict[str, Any], project_name: str | None, parent: Txn | None, enqueued: Enqueued
    ) -> None:
        self._store = store
        self._dbs = dbs
        self._pkey = pkey(project_name) if project_name is not None else b""
        self._parent = parent
        self._enqueued = enqueued
        self._own: Any = None  # the Store.write() context when not inside a batch

    def __enter__(self) -> Tx:
        if self._parent is not None:
            self._txn: Txn = self._store.env.begin(write=True, parent=self._parent)
        else:
            self._own = self._store.write()
            self._txn = self._own.__enter__()
        self._tx = Tx(self._txn, self._dbs, self._pkey, enqueued=self._enqueued)
        return self._tx

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if exc_type is None:
            try:
                self._tx.flush()
            except BaseException as error:  # a full map, say: the transaction must still end (aborted)
                self._end(type(error), error, error.__traceback__)
                raise
        return self._end(exc_type, exc, tb)

    def _end(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._own is not None:
            result: bool | None = self._own.__exit__(exc_type, exc, tb)
            return result
        if exc_type is None:
            self._txn.commit()
        else:
            self._txn.abort()
        return None


class ReadScope:
    """``with ReadScope(...) as tx``: a read-only snapshot, always released at the end."""

    __slots__ = ("_store", "_dbs", "_pkey", "_txn")

    def __init__(self, store: Store, dbs: dict[str, Any], project_name: str | None) -> None:
        self._store = store
        self._dbs = dbs
        self._pkey = pkey(project_name) if project_name is not None else b""

    def __enter__(self) -> Tx:
        self._txn: Txn = self._store.env.begin(write=False)
        return Tx(self._txn, self._dbs, self._pkey)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._txn.abort()
