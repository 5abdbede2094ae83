"""What every part of the job store stands on: its settings, its transactions and its projects.

:class:`StoreCore` opens the sub-databases, loads the project definitions
(they change only by creation, so they live in memory) and hands out typed
transactions (:mod:`ocf.jobs.txn`). The state machine
(:mod:`ocf.jobs.lifecycle`), the worker operations (:mod:`ocf.jobs.workers`)
and the read-only reports (:mod:`ocf.jobs.reports`) build on it;
:class:`ocf.jobs.store.JobStore` puts them together.
"""

from __future__ import annotations

import contextlib
from typing import Any
from collections.abc import Callable, Iterator

from ..errors import JobsPayloadTooLarge, ProjectExists, ProjectNotFound
from ..store import Store
from .keys import DBS, Record, dumps, loads, payload_size
from .model import Project, parse_project
from .txn import Enqueued, ReadScope, Txn, WriteScope

ACTIVE_WINDOW = 300.0  # a worker heard from within this many seconds counts as active


class BatchRedo(Exception):
    """A group commit must run again with every operation isolated (``batch(isolated=True)``).

    A store whose batches run their operations without a child transaction
    each (PostgreSQL: no savepoint per operation, they cost the server) raises
    it when one operation failed in a way that cannot be undone alone. Nothing
    of the batch was committed; the caller runs the same operations again.
    """


class StoreCore:
    """Settings, transactions and project definitions shared by the store's parts."""

    def __init__(
        self,
        store: Store,
        *,
        max_stages: int = 5,
        max_attempts: int = 3,
        flag_threshold: int = 5,
        max_payload: int = 1 << 20,
        default_lease: float = 600.0,
        worker_timeout: float = 3600.0,
        flag_per_worker: bool = False,
    ) -> None:
        self.store = store
        self.flag_per_worker = flag_per_worker
        #: Called every ``YIELD_EVERY`` jobs of a long creation. The tracker's writer thread sets it
        #: to release the GIL for a moment, so the event loop's thread never waits for it long.
        self.yield_gil: Callable[[], None] | None = None
        self.max_stages = max_stages
        self.max_attempts = max_attempts
        self.flag_threshold = flag_threshold
        self.max_payload = max_payload
        self.default_lease = default_lease
        self.worker_timeout = worker_timeout
        with store.write():
            self.dbs: dict[str, Any] = {name: store.db(f"jobs.{name}") for name in DBS}
        self._projects: dict[str, Project] = {}
        self._parent: Txn | None = None  # set inside batch()
        #: (project, stage index) that got pending jobs since the last :meth:`take_enqueued`.
        self._enqueued: Enqueued = set()
        with self._read() as tx:
            for _key, raw in tx.scan("projects", b""):
                project = Project.from_json(loads(raw, "project"))
                self._projects[project.name] = project

    # --- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self, *, isolated: bool = True) -> Iterator[None]:
        """Run many operations under one durable commit (group commit).

        Inside the block every operation's transaction is a child of one
        parent transaction: an operation that fails rolls back alone, and the
        parent's commit (one fsync) makes all of them durable at once. The
        tracker answers the requests of a batch only after that commit.
        LMDB's child transactions are cheap, so every batch is ``isolated``
        and this store never raises :class:`BatchRedo`.
        """
        with self.store.write() as parent:
            self._parent = parent
            try:
                yield
            finally:
                self._parent = None

    def _write(self, project: Project | None = None) -> WriteScope:
        return WriteScope(
            self.store, self.dbs, project.name if project is not None else None, self._parent, self._enqueued
        )

    def _read(self, project: Project | None = None) -> ReadScope:
        return ReadScope(self.store, self.dbs, project.name if project is not None else None)

    def take_enqueued(self) -> Enqueued:
        """Which stages got pending jobs lately, so only their waiting claimers are woken."""
        enqueued, self._enqueued = self._enqueued, set()
        return enqueued

    # --- projects -------------------------------------------------------------------------

    def create_project(self, name: str, body: Any, now: float) -> tuple[Project, bool]:
        """Create a project; the same definition again is a no-op, a different one raises
        :class:`~ocf.errors.ProjectExists`."""
        project = parse_project(
            name,
            body,
            max_stages=self.max_stages,
            default_lease=self.default_lease,
            max_attempts=self.max_attempts,
            flag_threshold=self.flag_threshold,
            now=now,
        )
        existing = self._projects.get(name)
        if existing is not None:
            if existing.same_definition(project):
                return existing, False
            raise ProjectExists(f"project {name!r} already exists with a different definition")
        with self._write() as tx:
            tx.put("projects", name.encode(), dumps(project.to_json()))
        self._projects[name] = project
        return project, True

    def project(self, name: str) -> Project:
        project = self._projects.get(name)
        if project is None:
            # Not the list of projects: that would tell any caller what else this tracker runs.
            raise ProjectNotFound(f"project {name!r} not found")
        return project

    def projects(self) -> list[Project]:
        return [self._projects[name] for name in sorted(self._projects)]

    def check_payload(self, value: Any, what: str) -> None:
        if (
            value is None
            or isinstance(value, (bool, int, float))
            or (isinstance(value, str) and 6 * len(value) + 2 <= self.max_payload)
        ):
            return  # cannot exceed the limit as JSON; skip encoding it an extra time
        size = payload_size(value)
        if size > self.max_payload:
            raise JobsPayloadTooLarge(
                f"{what} is {size} bytes of JSON; the limit is {self.max_payload}", code="payload_too_large"
            )


def public_job(project: Project, job: Record) -> Record:
    """A job as the API shows it (no internal bookkeeping, no lease holder token)."""
    out = {
        "id": job["id"],
        "stage": project.stages[job["stage"]].name,
        "stage_index": job["stage"] + 1,
        "state": job["state"],
        "input": job["input"],
        "attempts": job["attempts"],
        "root": job["root"],
        "parent": job["parent"],
    }
    if "lease_expires" in job:
        out["lease_expires"] = job["lease_expires"]
    for key in ("errors", "flags", "children", "done_by", "finished"):
        if job.get(key):
            out[key] = job[key]
    return out
