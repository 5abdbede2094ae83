"""One LMDB environment per node data directory.

LMDB itself happily lets several processes open one environment, which is
exactly what we must *not* allow for two nodes (each would believe it owns
the node table and the job queue). So the data directory is guarded by an
exclusive ``flock`` on ``<data_dir>/LOCK``; a second opener gets
:class:`DataDirLocked` naming the holder's PID instead of silently sharing.

Subsystems get named sub-databases (``store.db("nodetable")``) and do their
own writes inside ``with store.write() as txn:`` so that related keys change
atomically — LMDB's copy-on-write B-tree then guarantees a kill -9 leaves
either the old or the new state, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Iterator

import lmdb

from ..errors import DataDirLocked, StoreCorrupt, StoreError

log = logging.getLogger("ocf.store")

STORE_DIR = "store"
LOCK_FILE = "LOCK"
SCHEMA_VERSION = 1
DEFAULT_MAP_SIZE = 64 << 30  # address space only; the file grows as needed
MAX_DBS = 64


class Store:
    """An open, exclusively-held LMDB environment. Create with :meth:`open`."""

    def __init__(self, data_dir: Path, env: lmdb.Environment, lock_fd: int, *, syncs: bool = True) -> None:
        self.data_dir = data_dir
        self.env = env
        #: Whether a commit waits for the disk (fsync). Callers on the Trio thread commit in a
        #: worker thread when it does; without it a commit is a copy into the page cache.
        self.syncs = syncs
        self._lock_fd: int | None = lock_fd
        self._dbs: dict[str, Any] = {}
        # The write transaction in progress on each thread, if any. LMDB allows
        # one writer, so creating a sub-database while a write txn is open must
        # reuse that txn or it deadlocks; handles created inside a txn that then
        # aborts are invalid and must be forgotten. Per thread, because the job
        # tracker commits on its own writer thread while the node table commits
        # on worker threads (LMDB serialises the two; each waits for the other).
        self._local = threading.local()

    @property
    def _write_txn(self) -> lmdb.Transaction | None:
        return getattr(self._local, "txn", None)

    @_write_txn.setter
    def _write_txn(self, txn: lmdb.Transaction | None) -> None:
        self._local.txn = txn

    @property
    def _created_in_txn(self) -> list[str]:
        created = getattr(self._local, "created", None)
        if created is None:
            created = self._local.created = []
        return created

    @classmethod
    def open(
        cls,
        data_dir: Path | str,
        *,
        cleanslate: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
        sync: bool = True,
    ) -> Store:
        """Lock ``data_dir`` and open (creating if needed) its LMDB store.

        ``cleanslate`` wipes the store (not the identity key) after the lock
        is held, which is also the way out of :class:`StoreCorrupt`.
        """
        data_dir = Path(data_dir).expanduser()
        try:
            data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot create data dir {data_dir}: {exc.strerror}") from None
        lock_fd = _acquire_lock(data_dir)
        try:
            path = data_dir / STORE_DIR
            if cleanslate and path.exists():
                log.warning("cleanslate: removing store at %s", path)
                shutil.rmtree(path)
            path.mkdir(exist_ok=True, mode=0o700)
            try:
                # metasync=False (MDB_NOMETASYNC): one fsync per commit instead of two. LMDB
                # keeps full integrity; only an OS crash or power cut may undo the very last
                # commit (a process kill -9 loses nothing: the page cache survives it).
                env = lmdb.open(str(path), map_size=map_size, max_dbs=MAX_DBS, subdir=True, sync=sync, metasync=False)
            except lmdb.Error as exc:
                raise StoreCorrupt(
                    f"store at {path} cannot be opened ({exc}); start with --cleanslate to discard it"
                ) from None
            store = cls(data_dir, env, lock_fd, syncs=sync)
            try:
                store._check_schema()
            except BaseException:
                store.close()
                raise
            return store
        except BaseException:
            _release_lock(lock_fd)
            raise

    def _check_schema(self) -> None:
        meta = self.db("meta")
        try:
            with self.write() as txn:
                raw = txn.get(b"schema", db=meta)
                if raw is None:
                    txn.put(b"schema", str(SCHEMA_VERSION).encode(), db=meta)
                elif raw != str(SCHEMA_VERSION).encode():
                    raise StoreCorrupt(
                        f"store schema {raw.decode(errors='replace')!r} is not {SCHEMA_VERSION}; "
                        "start with --cleanslate to discard it"
                    )
        except lmdb.Error as exc:
            raise StoreCorrupt(f"store is unreadable ({exc}); start with --cleanslate to discard it") from None

    def db(self, name: str) -> Any:
        """The named sub-database, created on first use.

        Call this before starting a *read* transaction that uses it (e.g. once
        at subsystem start): LMDB does not show a handle created after a read
        transaction began to that transaction. Inside a write transaction it is
        always safe.
        """
        handle = self._dbs.get(name)
        if handle is None:
            handle = self.env.open_db(name.encode(), txn=self._write_txn)
            self._dbs[name] = handle
            if self._write_txn is not None:
                self._created_in_txn.append(name)
        return handle

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        with self.env.begin(write=False) as txn:
            yield txn

    @contextlib.contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction, committed on normal exit, aborted on exception.

        Not re-entrant: LMDB has a single writer, and a nested write would deadlock.
        """
        if self._write_txn is not None:
            raise StoreError("nested write transaction (pass the open txn instead)")
        txn = self.env.begin(write=True)
        self._write_txn = txn
        try:
            yield txn
        except BaseException:
            txn.abort()
            for name in self._created_in_txn:
                self._dbs.pop(name, None)
            raise
        else:
            txn.commit()
        finally:
            self._write_txn = None
            self._created_in_txn.clear()

    # typed helpers -----------------------------------------------------------------

    def get_bytes(self, db: str, key: bytes, txn: lmdb.Transaction | None = None) -> bytes | None:
        handle = self.db(db)  # resolve before a read txn begins: LMDB hides newer handles from older txns
        if txn is not None:
            return txn.get(key, db=handle)
        with self.read() as t:
            return t.get(key, db=handle)

    def put_bytes(self, db: str, key: bytes, value: bytes, txn: lmdb.Transaction | None = None) -> None:
        if txn is not None:
            txn.put(key, value, db=self.db(db))
            return
        handle = self.db(db)
        with self.write() as t:
            t.put(key, value, db=handle)

    def update(self, db: str, updates: Iterable[tuple[bytes, Callable[[bytes | None], bytes | None]]]) -> None:
        """Rewrite keys in one transaction: each function gets the key's stored bytes (or None) and
        returns its new bytes, or None to delete it.

        Read and write in one transaction, so nothing commits between them.
        Keep transactions small: LMDB keeps (until the store closes) every
        page its largest write transaction dirtied. Safe from any one thread
        at a time. Raises :class:`StoreError` when LMDB refuses a write (the
        disk or the map is full, an I/O error); nothing of the transaction is
        written then.
        """
        handle = self.db(db)
        try:
            with self.write() as txn:
                for key, rewrite in updates:
                    old = txn.get(key, db=handle)
                    value = rewrite(None if old is None else bytes(old))
                    if value is None:
                        if old is not None:
                            txn.delete(key, db=handle)
                    else:
                        txn.put(key, value, db=handle)
        except lmdb.Error as exc:
            raise StoreError(f"cannot write to {db!r} in {self.data_dir}: {exc}") from None

    def get_json(self, db: str, key: bytes, txn: lmdb.Transaction | None = None) -> Any:
        raw = self.get_bytes(db, key, txn)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise StoreCorrupt(f"value {key!r} in {db!r} is not JSON; start with --cleanslate") from None

    def put_json(self, db: str, key: bytes, value: Any, txn: lmdb.Transaction | None = None) -> None:
        self.put_bytes(db, key, json.dumps(value, separators=(",", ":")).encode(), txn)

    def delete(self, db: str, key: bytes, txn: lmdb.Transaction | None = None) -> bool:
        if txn is not None:
            return txn.delete(key, db=self.db(db))
        handle = self.db(db)
        with self.write() as t:
            return t.delete(key, db=handle)

    def close(self) -> None:
        """Flush and close the environment, then release the data-dir lock."""
        if self._lock_fd is None:
            return
        try:
            self.env.sync(True)
            self.env.close()
        finally:
            _release_lock(self._lock_fd)
            self._lock_fd = None
            self._dbs.clear()
        log.debug("store closed: %s", self.data_dir)

    @property
    def closed(self) -> bool:
        return self._lock_fd is None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _acquire_lock(data_dir: Path) -> int:
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).decode().strip()
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f" (pid {holder})" if holder else ""
            raise DataDirLocked(
                f"data dir {data_dir} is in use by another ocf node{who}; stop it or choose another --data-dir"
            ) from None
        raise StoreError(f"cannot lock {path}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release_lock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
