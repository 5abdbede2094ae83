"""The job tracker's state machine, kept in the node's LMDB store.

Every operation (claim, complete, heartbeat, expire...) is one synchronous
LMDB write transaction that takes the current time as an argument and does
no I/O besides the store. Two consequences the rest of the tracker relies on:

* **Atomicity.** Trio runs handlers on one thread and a transaction never
  spans an ``await``, so a claim cannot interleave with another claim: 200
  workers claiming at once get 200 different jobs, and leaderboard counters
  are read-modify-written inside the same transaction as the completion
  they count (the original tracker lost concurrent increments).
* **Crash safety.** A state change and everything derived from it (queue,
  lease index, counters, next-stage jobs, results) commit together; LMDB's
  copy-on-write pages mean a kill -9 leaves either the old or the new state.
  Answers are sent after the commit, so an answered request is durable.

Layout (sub-databases; ``P`` is the project name + NUL, ids are 8-byte big-endian)::

    jobs.projects  name                      -> project JSON
    jobs.jobs      P id                      -> job JSON
    jobs.queue     P stage seq               -> id          (pending jobs, FIFO per stage)
    jobs.leases    expires_ms P id           -> ""          (lease expiry index, all projects)
    jobs.workers   P token                   -> worker JSON
    jobs.names     P display_name            -> token
    jobs.counters  P name                    -> 8-byte count (ids, per-stage state counts)
    jobs.board     P "A" kind name NUL stage -> count        (all-time, kind u=user w=worker)
                   P "H" hour kind name NUL stage -> count  (hourly, for "last 24 h")
    jobs.series    P minute stage            -> completions (throughput plot)
    jobs.results   P seq                     -> result JSON (last stage's outputs)
    jobs.failures  P seq                     -> failure JSON (recent errors, trimmed)
    jobs.idem      P key                     -> answer JSON (idempotent job creation)
"""

from __future__ import annotations

import contextlib
import json
import secrets
import struct
from typing import Any, Callable, Iterable, Iterator

import lmdb

from ..errors import BadRequest, Conflict, GatewayRequestError, NotFound, PayloadTooLarge, StoreCorrupt
from ..store import Store
from .model import MAX_FANOUT, STAGE_LETTERS, Project, parse_project
from .names import worker_name

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
DBS = ("projects", "jobs", "queue", "leases", "workers", "names", "counters", "board", "series", "results", "failures", "idem")
MAX_FAILURES_KEPT = 1000
MAX_ERRORS_PER_JOB = 20
MAX_NICKNAME = 64
MAX_PROGRESS = 1000
SERIES_KEEP_MINUTES = 24 * 60
ACTIVE_WINDOW = 300.0  # a worker heard from within this many seconds counts as active
YIELD_EVERY = 64  # jobs created between two chances for another thread to take the GIL


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise StoreCorrupt(f"job tracker {what} is not JSON; start with --cleanslate") from None


def payload_size(value: Any) -> int:
    return len(_dumps(value))


class _Tx:
    """One write (or read) transaction with the tracker's sub-databases at hand."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any], pkey: bytes = b"", cache: dict[tuple[str, bytes], int] | None = None) -> None:
        self.txn = txn
        self.dbs = dbs
        self.p = pkey
        # Shared by every _Tx view of one transaction (expire() makes one per project).
        self._cache: dict[tuple[str, bytes], int] = {} if cache is None else cache

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self.dbs[db])

    def put(self, db: str, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs[db])

    def delete(self, db: str, key: bytes) -> bool:
        return self.txn.delete(key, db=self.dbs[db])

    def scan(self, db: str, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        cursor = self.txn.cursor(db=self.dbs[db])
        if not cursor.set_range(start if start is not None else prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield key, value

    # counters --------------------------------------------------------------------------
    # A completion touches ~7 counters, some several times; they are read once and
    # written once per transaction (``flush``) instead of a get+put per change.

    def _counter(self, db: str, key: bytes) -> int:
        cached = self._cache.get((db, key))
        if cached is not None:
            return cached
        raw = self.get(db, key)
        return _U64.unpack(raw)[0] if raw else 0

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
            self.put(db, key, _U64.pack(value))
        self._cache.clear()

    # records ----------------------------------------------------------------------------

    def job(self, job_id: int) -> dict[str, Any] | None:
        raw = self.get("jobs", self.p + _U64.pack(job_id))
        return _loads(raw, "job") if raw is not None else None

    def put_job(self, job: dict[str, Any]) -> None:
        self.put("jobs", self.p + _U64.pack(job["id"]), _dumps(job))

    def worker(self, token: str) -> dict[str, Any] | None:
        raw = self.get("workers", self.p + token.encode())
        return _loads(raw, "worker") if raw is not None else None

    def put_worker(self, worker: dict[str, Any]) -> None:
        self.put("workers", self.p + worker["token"].encode(), _dumps(worker))


class JobStore:
    """All tracker state transitions; see the module docstring for the layout.

    Methods take ``now`` (wall-clock seconds) so leases survive restarts and
    tests can drive time without sleeping.
    """

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
            self.dbs = {name: store.db(f"jobs.{name}") for name in DBS}
        self._projects: dict[str, Project] = {}
        self._parent: lmdb.Transaction | None = None  # set inside batch()
        #: (project, stage index) that got pending jobs since the last :meth:`take_enqueued`.
        self._enqueued: set[tuple[str, int]] = set()
        with self._read() as tx:
            for key, raw in tx.scan("projects", b""):
                project = Project.from_json(_loads(raw, "project"))
                self._projects[project.name] = project

    # --- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Run many operations under one durable commit (group commit).

        Inside the block every operation's transaction is a child of one
        parent transaction: an operation that fails rolls back alone, and the
        parent's commit (one fsync) makes all of them durable at once. The
        tracker answers the requests of a batch only after that commit.
        """
        with self.store.write() as parent:
            self._parent = parent
            try:
                yield
            finally:
                self._parent = None

    def _write(self, project: Project | None = None) -> Any:
        store, dbs, jobstore = self.store, self.dbs, self
        pkey = _pkey(project.name) if project is not None else b""

        class _W:
            def __enter__(self_inner) -> _Tx:
                parent = jobstore._parent
                if parent is not None:
                    self_inner.cm = None
                    self_inner.txn = store.env.begin(write=True, parent=parent)
                    self_inner.tx = _Tx(self_inner.txn, dbs, pkey)
                else:
                    self_inner.cm = store.write()
                    self_inner.tx = _Tx(self_inner.cm.__enter__(), dbs, pkey)
                return self_inner.tx

            def __exit__(self_inner, *exc: Any) -> Any:
                if exc[0] is None:
                    self_inner.tx.flush()
                if self_inner.cm is not None:
                    return self_inner.cm.__exit__(*exc)
                if exc[0] is None:
                    self_inner.txn.commit()
                else:
                    self_inner.txn.abort()
                return None

        return _W()

    def _read(self, project: Project | None = None) -> Any:
        env, dbs = self.store.env, self.dbs
        pkey = _pkey(project.name) if project is not None else b""

        class _R:
            def __enter__(self_inner) -> _Tx:
                self_inner.txn = env.begin(write=False)
                return _Tx(self_inner.txn, dbs, pkey)

            def __exit__(self_inner, *exc: Any) -> None:
                self_inner.txn.abort()

        return _R()

    # --- projects -------------------------------------------------------------------------

    def create_project(self, name: str, body: Any, now: float) -> tuple[Project, bool]:
        """Create a project; the same definition again is a no-op, a different one a 409."""
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
            raise Conflict(f"project {name!r} already exists with a different definition", code="project_exists")
        with self._write() as tx:
            tx.put("projects", name.encode(), _dumps(project.to_json()))
        self._projects[name] = project
        return project, True

    def project(self, name: str) -> Project:
        project = self._projects.get(name)
        if project is None:
            # Not the list of projects: that would tell any caller what else this tracker runs.
            raise NotFound(f"project {name!r} not found", code="unknown_project")
        return project

    def projects(self) -> list[Project]:
        return [self._projects[name] for name in sorted(self._projects)]

    # --- creating jobs --------------------------------------------------------------------

    def add_jobs(
        self,
        name: str,
        inputs: Iterable[Any],
        now: float,
        *,
        idempotency_key: str | None = None,
        carry: dict[str, Any] | None = None,
        final: bool = True,
    ) -> dict[str, Any]:
        """Append stage-1 jobs in one write transaction; a repeated ``idempotency_key`` returns the first answer.

        A large request is written as several calls: ``carry`` is the answer
        so far (created, first and last id), and only the ``final`` call marks
        the key's record done, so a request cut short resumes rather than repeats.
        """
        project = self.project(name)
        with self._write(project) as tx:
            if idempotency_key:
                previous = tx.get("idem", tx.p + idempotency_key.encode())
                if previous is not None:
                    record = _loads(previous, "idempotency record")
                    if record.pop("done", True):
                        return dict(record, repeated=True)
            created = carry["created"] if carry else 0
            first = carry["first_id"] if carry else None
            last = carry["last_id"] if carry else None
            yield_gil = self.yield_gil
            for value in inputs:
                self.check_payload(value, "job input")
                job_id = self._new_job(tx, project, 0, value, now, parent=None, root=None)
                first = job_id if first is None else first
                last = job_id
                created += 1
                if yield_gil is not None and created % YIELD_EVERY == 0:
                    yield_gil()
            answer = {"created": created, "first_id": first, "last_id": last}
            if idempotency_key:
                tx.put("idem", tx.p + idempotency_key.encode(), _dumps(dict(answer, done=final)))
        return answer

    def creation_record(self, name: str, idempotency_key: str) -> dict[str, Any] | None:
        """What a job creation with this key wrote so far (``done`` once all of it is durable)."""
        project = self.project(name)
        with self._read(project) as tx:
            raw = tx.get("idem", tx.p + idempotency_key.encode())
            return _loads(raw, "idempotency record") if raw is not None else None

    def check_payload(self, value: Any, what: str) -> None:
        if value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and 6 * len(value) + 2 <= self.max_payload):
            return  # cannot exceed the limit as JSON; skip encoding it an extra time
        size = payload_size(value)
        if size > self.max_payload:
            raise PayloadTooLarge(f"{what} is {size} bytes of JSON; the limit is {self.max_payload}", code="payload_too_large")

    def _new_job(self, tx: _Tx, project: Project, stage: int, value: Any, now: float, *, parent: int | None, root: int | None) -> int:
        job_id = tx.bump("next_id")
        job = {
            "id": job_id,
            "stage": stage,
            "state": "pending",
            "input": value,
            "parent": parent,
            "root": root if root is not None else job_id,
            "attempts": 0,
            "errors": [],
            "flags": [],
            "created": now,
        }
        self._enqueue(tx, job)
        tx.bump(f"s{stage}.pending")
        return job_id

    def take_enqueued(self) -> set[tuple[str, int]]:
        """Which stages got pending jobs lately, so only their waiting claimers are woken."""
        enqueued, self._enqueued = self._enqueued, set()
        return enqueued

    def _enqueue(self, tx: _Tx, job: dict[str, Any]) -> None:
        self._enqueued.add((tx.p[:-1].decode(), job["stage"]))
        seq = tx.bump("seq")
        job["state"] = "pending"
        job["qseq"] = seq
        for key in ("worker", "lease_expires"):
            job.pop(key, None)
        tx.put("queue", tx.p + bytes([job["stage"]]) + _U64.pack(seq), _U64.pack(job["id"]))
        tx.put_job(job)

    def _dequeue(self, tx: _Tx, job: dict[str, Any]) -> None:
        seq = job.pop("qseq", None)
        if seq is not None:
            tx.delete("queue", tx.p + bytes([job["stage"]]) + _U64.pack(seq))

    def job(self, name: str, job_id: int) -> dict[str, Any]:
        project = self.project(name)
        with self._read(project) as tx:
            job = tx.job(job_id)
        if job is None:
            raise NotFound(f"project {name!r} has no job {job_id}", code="unknown_job")
        return _public_job(project, job)

    # --- workers --------------------------------------------------------------------------

    def register_worker(self, name: str, *, nickname: str, stage: Any, now: float, user: str | None = None) -> dict[str, Any]:
        project = self.project(name)
        stage_index = project.stage_index(stage)
        user = nickname if user is None else user
        for field, value in (("nickname", nickname), ("user", user)):
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_NICKNAME or not value.isprintable():
                raise BadRequest(f"{field} must be 1-{MAX_NICKNAME} printable characters", code="bad_worker")
        token = secrets.token_urlsafe(18)
        with self._write(project) as tx:
            display = worker_name(secrets.randbits(32))
            while tx.get("names", tx.p + display.encode()) is not None:
                display = worker_name(secrets.randbits(32))
            worker = {
                "token": token,
                "name": display,
                "nickname": nickname,
                "user": user.strip(),
                "stage": stage_index,
                "created": now,
                "last_seen": now,
                "progress": "Initialised",
                "leases": [],
                "completed": 0,
            }
            tx.put_worker(worker)
            tx.put("names", tx.p + display.encode(), token.encode())
        return worker

    def _worker(self, tx: _Tx, token: Any, now: float) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise NotFound("a worker token is required (register with /workers or /api/new first)", code="unknown_worker")
        worker = tx.worker(token)
        if worker is None or worker["last_seen"] + self.worker_timeout < now:
            raise NotFound("the tracker does not know this worker; did it time out? Register again.", code="unknown_worker")
        return worker

    def worker_stage(self, name: str, token: Any, now: float) -> int:
        project = self.project(name)
        with self._read(project) as tx:
            return self._worker(tx, token, now)["stage"]

    def held_jobs(self, name: str, token: Any, now: float) -> tuple[list[int], int | None]:
        """The jobs a worker holds, and the last one it was given (held, done, or lost since)."""
        project = self.project(name)
        with self._read(project) as tx:
            worker = self._worker(tx, token, now)
        return list(worker["leases"]), worker.get("last_claimed", worker.get("last_done"))

    def validate_worker(self, name: str, token: Any, now: float) -> bool:
        project = self.project(name)
        with self._read(project) as tx:
            try:
                self._worker(tx, token, now)
            except NotFound:
                return False
        return True

    def worker_by_name(self, name: str, display: str, now: float) -> dict[str, Any]:
        project = self.project(name)
        with self._read(project) as tx:
            token = tx.get("names", tx.p + display.encode())
            worker = tx.worker(bytes(token).decode()) if token is not None else None
            if worker is None:
                raise NotFound(f"no worker named {display!r} in project {name!r}", code="unknown_worker")
            hours = max((worker["last_seen"] - worker["created"]) / 3600.0, 1 / 60)
            stages = {}
            for i, stage in enumerate(project.stages):
                stages[stage.name] = self._board_count(tx, b"w", worker["name"], i)
            return {
                "name": worker["name"],
                "user": worker["user"],
                "stage": project.stages[worker["stage"]].name,
                "stage_letter": STAGE_LETTERS[worker["stage"]],
                "progress": worker["progress"],
                "first_seen": worker["created"],
                "last_seen": worker["last_seen"],
                "active": worker["last_seen"] + ACTIVE_WINDOW >= now,
                "jobs_completed": worker["completed"],
                "jobs_per_hour": round(worker["completed"] / hours, 2),
                "current_jobs": list(worker["leases"]),
                "completed_by_stage": stages,
            }

    def bye(self, name: str, token: Any, now: float) -> int:
        """Forget a worker, returning its leased jobs to pending at once (no attempt used)."""
        project = self.project(name)
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            released = self._release_all(tx, project, worker, now)
            tx.delete("workers", tx.p + worker["token"].encode())
            tx.delete("names", tx.p + worker["name"].encode())
        return released

    def _release_all(self, tx: _Tx, project: Project, worker: dict[str, Any], now: float) -> int:
        released = 0
        for job_id in worker["leases"]:
            job = tx.job(job_id)
            if job is not None and job["state"] == "leased" and job.get("worker") == worker["token"]:
                self._unlease(tx, job)
                job["attempts"] = max(0, job["attempts"] - 1)
                tx.bump(f"s{job['stage']}.leased", -1)
                tx.bump(f"s{job['stage']}.pending")
                self._enqueue(tx, job)
                released += 1
        worker["leases"] = []
        return released

    def release(self, name: str, token: Any, job_ids: list[int], now: float) -> int:
        """Hand back jobs leased to a caller that left before it got them (no attempt used)."""
        project = self.project(name)
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            keep, give = [], []
            for job_id in worker["leases"]:
                (give if job_id in job_ids else keep).append(job_id)
            worker["leases"] = give
            released = self._release_all(tx, project, worker, now)
            worker["leases"] = keep
            tx.put_worker(worker)
        return released

    # --- the job cycle --------------------------------------------------------------------

    def claim(self, name: str, token: Any, now: float, *, limit: int = 1, stage: Any = None, release_held: bool = False) -> list[dict[str, Any]]:
        """Lease up to ``limit`` pending jobs of the worker's stage, oldest first."""
        project = self.project(name)
        _check_limit(limit)
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            stage_index = worker["stage"] if stage is None else project.stage_index(stage)
            if stage_index != worker["stage"]:
                raise BadRequest(
                    f"worker {worker['name']} registered for stage {project.stages[worker['stage']].name!r}, not {project.stages[stage_index].name!r}",
                    code="wrong_stage",
                )
            if release_held:
                self._release_all(tx, project, worker, now)
            out = self._claim_in(tx, project, worker, limit, now)
            tx.put_worker(worker)
        return out

    def _claim_in(self, tx: _Tx, project: Project, worker: dict[str, Any], limit: int, now: float) -> list[dict[str, Any]]:
        stage_index = worker["stage"]
        timeout = project.stages[stage_index].lease_timeout
        picked = []
        stale = []
        for key, raw_id in tx.scan("queue", tx.p + bytes([stage_index])):
            job = tx.job(_U64.unpack(raw_id)[0])
            if job is None or job["state"] != "pending" or job.get("qseq") != _U64.unpack(key[-8:])[0]:
                stale.append(key)  # defensive: an index entry that outlived its job state
                continue
            picked.append((key, job))
            if len(picked) >= limit:
                break
        for key in stale:
            tx.delete("queue", key)
        out = []
        for key, job in picked:
            tx.delete("queue", key)
            job.pop("qseq", None)
            job["state"] = "leased"
            job["worker"] = worker["token"]
            job["attempts"] += 1
            job["lease_expires"] = now + timeout
            tx.put("leases", _lease_key(job["lease_expires"], tx.p, job["id"]), b"")
            tx.put_job(job)
            worker["leases"].append(job["id"])
            worker["last_claimed"] = job["id"]
            out.append(_public_job(project, job))
        if picked:
            tx.bump(f"s{stage_index}.pending", -len(picked))
            tx.bump(f"s{stage_index}.leased", len(picked))
            worker["progress"] = f"Received {len(picked)} job(s)"
        worker["last_seen"] = now
        return out

    def heartbeat(self, name: str, token: Any, now: float, *, progress: Any = None, jobs: Any = None) -> dict[str, Any]:
        """Extend every lease the worker holds; ``lost`` lists those of ``jobs`` it no longer holds.

        A client passes the ids it believes it is working on, and learns which
        ones expired or were rolled back, so it can stop wasting work on them.
        """
        project = self.project(name)
        if jobs is not None and (not isinstance(jobs, list) or len(jobs) > 10_000):
            raise BadRequest("'jobs' must be a list of job ids", code="bad_jobs")
        believed = [_job_id(j) for j in jobs] if jobs is not None else []
        if progress is not None and (not isinstance(progress, str) or len(progress) > MAX_PROGRESS):
            raise BadRequest(f"progress must be a string of at most {MAX_PROGRESS} characters", code="bad_progress")
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            held, lost = {}, []
            for job_id in worker["leases"]:
                job = tx.job(job_id)
                if job is None or job["state"] != "leased" or job.get("worker") != worker["token"]:
                    lost.append(job_id)
                    continue
                tx.delete("leases", _lease_key(job["lease_expires"], tx.p, job_id))
                job["lease_expires"] = now + project.stages[job["stage"]].lease_timeout
                tx.put("leases", _lease_key(job["lease_expires"], tx.p, job_id), b"")
                tx.put_job(job)
                held[job_id] = job["lease_expires"]
            worker["leases"] = list(held)
            lost.extend(j for j in believed if j not in held and j not in lost)
            worker["last_seen"] = now
            if progress is not None:
                worker["progress"] = progress
            tx.put_worker(worker)
        return {"leases": {str(k): v for k, v in held.items()}, "lost": lost}

    def complete(self, name: str, token: Any, job_id: Any, output: Any, now: float) -> dict[str, Any]:
        """Accept a job's output from its lease holder; a repeat by the same holder is a no-op."""
        project = self.project(name)
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            result = self._complete_one(tx, project, worker, _job_id(job_id), output, now)
            tx.put_worker(worker)
        return result

    def complete_many(self, name: str, token: Any, items: Any, now: float, *, claim: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Complete a batch in one transaction; each item succeeds or fails on its own.

        ``items`` is ``[{"id": N, "output": ...}, ...]``; the answer has one
        entry per item, ``{"id", "status": "done" | "already_done"}`` or
        ``{"id", "status": "error", "http_status", "code", "message"}``.
        With ``claim`` > 0 the same transaction also leases that many new
        jobs (returned second): a worker's whole cycle in one request and one
        commit, which is what lets a tracker keep up with thousands of jobs a
        second.
        """
        project = self.project(name)
        if not isinstance(items, list) or len(items) > 1000 or (not items and not claim):
            raise BadRequest("'results' must be a list of 1..1000 {id, output} objects", code="bad_results")
        if claim:
            _check_limit(claim)
        out = []
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            for item in items:
                try:
                    if not isinstance(item, dict) or "id" not in item:
                        raise BadRequest("each result must be an object with 'id' and 'output'", code="bad_results")
                    out.append(self._complete_one(tx, project, worker, _job_id(item["id"]), item.get("output"), now))
                except GatewayRequestError as exc:
                    ident = item.get("id") if isinstance(item, dict) else None
                    out.append({"id": ident, "status": "error", "http_status": exc.status, "code": exc.code, "message": exc.message})
            claimed = self._claim_in(tx, project, worker, claim, now) if claim else []
            tx.put_worker(worker)
        return out, claimed

    def _complete_one(self, tx: _Tx, project: Project, worker: dict[str, Any], job_id: int, output: Any, now: float) -> dict[str, Any]:
        # Every check comes before the first write, so a refused item changes nothing.
        self.check_payload(output, "job output")
        job = tx.job(job_id)
        if job is None:
            raise NotFound(f"project {project.name!r} has no job {job_id}", code="unknown_job")
        worker["last_seen"] = now
        if job["state"] == "done" and job.get("done_token") == worker["token"]:
            return {"id": job_id, "status": "already_done", "children": job.get("children", [])}
        self._check_lease(job, worker)
        stage = job["stage"]
        last = stage == len(project.stages) - 1
        inputs = output if project.stages[stage].fanout and isinstance(output, list) else [output]
        if not last and len(inputs) > MAX_FANOUT:
            raise PayloadTooLarge(f"a fan-out output may have at most {MAX_FANOUT} elements", code="fanout_too_large")
        children: list[int] = []
        if not last:
            for value in inputs:
                children.append(self._new_job(tx, project, stage + 1, value, now, parent=job_id, root=job["root"]))
        else:
            seq = tx.bump("results")
            tx.put(
                "results",
                tx.p + _U64.pack(seq),
                _dumps({"job": job_id, "root": job["root"], "output": output, "worker": worker["name"], "user": worker["user"], "time": now}),
            )
            job["result_seq"] = seq
        self._unlease(tx, job)
        job["state"] = "done"
        job["done_token"] = worker["token"]
        job["done_by"] = worker["name"]
        job["user"] = worker["user"]
        job["finished"] = now
        job["children"] = children
        tx.put_job(job)
        tx.bump(f"s{stage}.leased", -1)
        tx.bump(f"s{stage}.done")
        worker["leases"] = [j for j in worker["leases"] if j != job_id]
        if not tx.count(f"s{stage}.first_ms"):
            tx.bump(f"s{stage}.first_ms", int(now * 1000))  # where the stage's rate window may start
        worker["completed"] += 1
        worker["last_done"] = job_id
        worker["progress"] = "Completed job"
        self._credit(tx, worker, stage, now)
        return {"id": job_id, "status": "done", "children": children}

    def _check_lease(self, job: dict[str, Any], worker: dict[str, Any]) -> None:
        if job["state"] == "leased" and job.get("worker") == worker["token"]:
            return
        what = {
            "done": "was already completed by another worker",
            "failed": "has failed and is closed",
            "superseded": "was rolled back after its input was flagged invalid",
            "pending": "is pending again after your lease expired",
            "leased": "is leased to another worker after your lease expired",
        }.get(job["state"], f"is {job['state']}")
        raise Conflict(f"job {job['id']} {what}; your result was not recorded", code="lease_lost")

    def _credit(self, tx: _Tx, worker: dict[str, Any], stage: int, now: float) -> None:
        hour = _U32.pack(int(now // 3600))
        minute = _U32.pack(int(now // 60))
        for kind, who in ((b"u", worker["user"]), (b"w", worker["name"])):
            tail = kind + who.encode() + b"\x00" + bytes([stage])
            tx.add("board", tx.p + b"A" + tail)
            tx.add("board", tx.p + b"H" + hour + tail)
        tx.add("series", tx.p + minute + bytes([stage]))

    def fail(self, name: str, token: Any, job_id: Any, error: Any, now: float) -> dict[str, Any]:
        """The lease holder gives up on a job: it is retried, or failed after ``max_attempts``."""
        project = self.project(name)
        job_id = _job_id(job_id)
        if not isinstance(error, str) or not error:
            error = "worker reported failure" if error in (None, "") else json.dumps(error)[:MAX_PROGRESS]
        error = error[:MAX_PROGRESS]
        with self._write(project) as tx:
            worker, job = self._held_job(tx, project, token, job_id, now)
            state = self._retry_or_fail(tx, project, job, f"{worker['name']}: {error}", now)
        return {"id": job_id, "status": state, "attempts": job["attempts"]}

    def _held_job(self, tx: _Tx, project: Project, token: Any, job_id: int, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """The worker and the job it is giving back (fail, flag); 404/409 unless it holds the lease."""
        worker = self._worker(tx, token, now)
        job = tx.job(job_id)
        if job is None:
            raise NotFound(f"project {project.name!r} has no job {job_id}", code="unknown_job")
        self._check_lease(job, worker)
        worker["leases"] = [j for j in worker["leases"] if j != job_id]
        worker["last_seen"] = now
        tx.put_worker(worker)
        return worker, job

    def _retry_or_fail(self, tx: _Tx, project: Project, job: dict[str, Any], error: str, now: float) -> str:
        """A lease ended without a result: back to pending, or failed once attempts are used up."""
        self._unlease(tx, job)
        job["errors"] = (job["errors"] + [{"time": now, "error": error}])[-MAX_ERRORS_PER_JOB:]
        stage = job["stage"]
        tx.bump(f"s{stage}.leased", -1)
        seq = tx.bump("failure_seq")
        tx.put("failures", tx.p + _U64.pack(seq), _dumps({"job": job["id"], "stage": project.stages[stage].name, "time": now, "error": error, "attempt": job["attempts"]}))
        if seq > MAX_FAILURES_KEPT:
            tx.delete("failures", tx.p + _U64.pack(seq - MAX_FAILURES_KEPT))
        if job["attempts"] >= project.max_attempts:
            job["state"] = "failed"
            tx.put_job(job)
            tx.bump(f"s{stage}.failed")
            return "failed"
        tx.bump(f"s{stage}.pending")
        self._enqueue(tx, job)
        return "pending"

    def _unlease(self, tx: _Tx, job: dict[str, Any]) -> None:
        expires = job.pop("lease_expires", None)
        if expires is not None:
            tx.delete("leases", _lease_key(expires, tx.p, job["id"]))
        job.pop("worker", None)

    def flag(self, name: str, token: Any, job_id: Any, now: float, reason: Any = None) -> dict[str, Any]:
        """The lease holder says the job's *input* is bad.

        The lease is given back (no attempt used). Once ``flag_threshold``
        distinct users (or workers, with ``flag_per_worker``) agree, the job that produced the input (stage N-1)
        is redone: its not-yet-done outputs are withdrawn and it goes back
        to pending. A stage-1 job has no producer and is failed instead.
        """
        project = self.project(name)
        job_id = _job_id(job_id)
        with self._write(project) as tx:
            worker, job = self._held_job(tx, project, token, job_id, now)
            # Distinct users by default: one person running many workers is one opinion.
            flagger = worker["name"] if self.flag_per_worker else "user:" + worker["user"]
            if flagger not in job["flags"]:
                job["flags"].append(flagger)
            stage = job["stage"]
            self._unlease(tx, job)
            job["attempts"] = max(0, job["attempts"] - 1)
            tx.bump(f"s{stage}.leased", -1)
            if len(job["flags"]) < project.flag_threshold:
                tx.bump(f"s{stage}.pending")
                self._enqueue(tx, job)
                return {"id": job_id, "status": "flagged", "flags": len(job["flags"])}
            note = f"input flagged invalid by {len(job['flags'])} {'workers' if self.flag_per_worker else 'users'}" + (f" ({str(reason)[:200]})" if reason else "")
            if job["parent"] is None:
                job["state"] = "failed"
                job["errors"].append({"time": now, "error": note})
                tx.put_job(job)
                tx.bump(f"s{stage}.failed")
                return {"id": job_id, "status": "failed", "flags": len(job["flags"])}
            # Queue it like its siblings; the rollback withdraws all of the parent's unfinished outputs.
            tx.bump(f"s{stage}.pending")
            self._enqueue(tx, job)
            parent = tx.job(job["parent"])
            self._rollback(tx, project, parent, note, now)
        return {"id": job_id, "status": "rolled_back", "flags": len(job["flags"]), "redo": parent["id"]}

    def _rollback(self, tx: _Tx, project: Project, parent: dict[str, Any], note: str, now: float) -> None:
        for child_id in parent.get("children", []):
            child = tx.job(child_id)
            if child is None or child["state"] in ("done", "failed", "superseded"):
                continue
            stage = child["stage"]
            if child["state"] == "pending":
                self._dequeue(tx, child)
                tx.bump(f"s{stage}.pending", -1)
            else:
                holder = tx.worker(child.get("worker", ""))
                if holder is not None:
                    holder["leases"] = [j for j in holder["leases"] if j != child_id]
                    tx.put_worker(holder)
                self._unlease(tx, child)
                tx.bump(f"s{stage}.leased", -1)
            child["state"] = "superseded"
            tx.put_job(child)
            tx.bump(f"s{stage}.superseded")
        stage = parent["stage"]
        parent["children"] = []
        parent["errors"] = (parent["errors"] + [{"time": now, "error": f"redone: {note}"}])[-MAX_ERRORS_PER_JOB:]
        parent["attempts"] = 0
        for key in ("done_token", "done_by", "user", "finished"):
            parent.pop(key, None)
        tx.bump(f"s{stage}.done", -1)
        tx.bump(f"s{stage}.pending")
        self._enqueue(tx, parent)

    # --- time-driven ----------------------------------------------------------------------

    def next_expiry(self) -> float | None:
        with self._read() as tx:
            cursor = tx.txn.cursor(db=self.dbs["leases"])
            if not cursor.first():
                return None
            return _U64.unpack(cursor.key()[:8])[0] / 1000.0

    def expire(self, now: float, *, limit: int = 10_000) -> list[tuple[str, int, str]]:
        """Return jobs whose lease ran out to pending (or failed); ``[(project, id, new_state)]``."""
        out = []
        deadline = _U64.pack(int(now * 1000))
        with self._write() as tx:
            cursor = tx.txn.cursor(db=self.dbs["leases"])
            due = []
            if cursor.first():
                for key, _ in cursor:
                    if key[:8] > deadline or len(due) >= limit:
                        break
                    due.append(bytes(key))
            for key in due:
                tx.delete("leases", key)
                pkey, job_id = key[8:-8], _U64.unpack(key[-8:])[0]
                project = self._projects.get(pkey[:-1].decode())
                if project is None:
                    continue
                ptx = _Tx(tx.txn, self.dbs, pkey, tx._cache)
                job = ptx.job(job_id)
                if job is None or job["state"] != "leased" or _lease_key(job["lease_expires"], pkey, job_id) != key:
                    continue
                holder = ptx.worker(job.get("worker", ""))
                holder_name = holder["name"] if holder else "a forgotten worker"
                if holder is not None:
                    holder["leases"] = [j for j in holder["leases"] if j != job_id]
                    ptx.put_worker(holder)
                state = self._retry_or_fail(ptx, project, job, f"{holder_name}: lease expired without a result", now)
                out.append((project.name, job_id, state))
        return out

    def forget_idle_workers(self, now: float) -> int:
        """Drop workers silent for ``worker_timeout``, returning their leases; prune old series."""
        forgotten = 0
        with self._write() as tx:
            for project in self._projects.values():
                ptx = _Tx(tx.txn, self.dbs, _pkey(project.name), tx._cache)
                idle = [
                    _loads(raw, "worker")
                    for _, raw in ptx.scan("workers", ptx.p)
                ]
                for worker in idle:
                    if worker["last_seen"] + self.worker_timeout >= now:
                        continue
                    for job_id in worker["leases"]:
                        job = ptx.job(job_id)
                        if job is not None and job["state"] == "leased" and job.get("worker") == worker["token"]:
                            self._retry_or_fail(ptx, project, job, f"{worker['name']}: worker timed out", now)
                    ptx.delete("workers", ptx.p + worker["token"].encode())
                    ptx.delete("names", ptx.p + worker["name"].encode())
                    forgotten += 1
                self._prune(ptx, now)
        return forgotten

    def _prune(self, tx: _Tx, now: float) -> None:
        oldest_minute = _U32.pack(max(0, int(now // 60) - SERIES_KEEP_MINUTES))
        old = [bytes(k) for k, _ in tx.scan("series", tx.p) if k[len(tx.p) : len(tx.p) + 4] < oldest_minute]
        for key in old:
            tx.delete("series", key)
        oldest_hour = _U32.pack(max(0, int(now // 3600) - 48))
        old = [bytes(k) for k, _ in tx.scan("board", tx.p + b"H") if k[len(tx.p) + 1 : len(tx.p) + 5] < oldest_hour]
        for key in old:
            tx.delete("board", key)

    # --- reading --------------------------------------------------------------------------

    def counts(self, name: str) -> list[dict[str, int]]:
        project = self.project(name)
        with self._read(project) as tx:
            return [
                {state: tx.count(f"s{i}.{state}") for state in ("pending", "leased", "done", "failed", "superseded")}
                for i in range(len(project.stages))
            ]

    def result_count(self, name: str) -> int:
        project = self.project(name)
        with self._read(project) as tx:
            return tx.count("results")

    def pending_count(self, name: str, stage: Any) -> int:
        project = self.project(name)
        index = project.stage_index(stage)
        with self._read(project) as tx:
            return tx.count(f"s{index}.pending")

    def stats(self, name: str, now: float) -> dict[str, Any]:
        """Everything the dashboard shows: per-stage progress, rates, ETA, workers, failures."""
        project = self.project(name)
        counts = self.counts(name)
        with self._read(project) as tx:
            minute_now = int(now // 60)
            series: dict[int, list[int]] = {}
            start = tx.p + _U32.pack(max(0, minute_now - 59))
            for key, raw in tx.scan("series", tx.p, start):
                minute = _U32.unpack(key[len(tx.p) : len(tx.p) + 4])[0]
                series.setdefault(minute, [0] * len(project.stages))[key[-1]] += _U64.unpack(raw)[0]
            workers_active = [0] * len(project.stages)
            workers_total = 0
            for _, raw in tx.scan("workers", tx.p):
                worker = _loads(raw, "worker")
                workers_total += 1
                if worker["last_seen"] + ACTIVE_WINDOW >= now:
                    workers_active[worker["stage"]] += 1
            failures = [_loads(raw, "failure") for _, raw in _scan_reverse(tx, "failures", tx.p, 10)]
            results = tx.count("results")
            first_done = [tx.count(f"s{i}.first_ms") / 1000.0 for i in range(len(project.stages))]
        stages = []
        expected_prev = None
        eta = 0.0
        for i, (stage, c) in enumerate(zip(project.stages, counts)):
            total = c["pending"] + c["leased"] + c["done"] + c["failed"]
            # Jobs reach stage i+1 only as stage i finishes; without fan-out we
            # know how many will come, so progress is against that.
            expected = total
            if expected_prev is not None and not project.stages[i - 1].fanout:
                expected = max(total, expected_prev)
            # Completions of the last 15 minutes over the time they really span: a stage that
            # started a minute ago is measured over that minute, not over 900 s.
            window_start = max((minute_now - 14) * 60, first_done[i] or now)
            window = max(now - window_start, 1.0)
            rate = sum(v[i] for m, v in series.items() if m >= minute_now - 14) / window
            remaining = max(expected - c["done"] - c["failed"], 0)
            stage_eta = remaining / rate if rate > 0 else (None if remaining else 0.0)
            if eta is not None:
                eta = None if stage_eta is None else max(eta, stage_eta)
            stages.append(
                dict(
                    name=stage.name,
                    letter=STAGE_LETTERS[i],
                    lease_timeout=stage.lease_timeout,
                    fanout=stage.fanout,
                    **c,
                    total=total,
                    expected=expected,
                    progress=round((c["done"] + c["failed"]) / expected, 4) if expected else 0.0,
                    rate_per_s=round(rate, 3),
                    workers_active=workers_active[i],
                )
            )
            expected_prev = expected - c["failed"]
        overall = sum(s["progress"] for s in stages) / len(stages) if stages else 0.0
        return {
            "project": project.name,
            "time": now,
            "stages": stages,
            "completion": round(overall, 4),
            "eta_seconds": None if eta is None else round(eta, 1),
            "results": results,
            "workers": {"total": workers_total, "active": sum(workers_active)},
            "throughput": [
                {"minute": m * 60, "completed": series.get(m, [0] * len(project.stages))} for m in range(minute_now - 59, minute_now + 1)
            ],
            "recent_failures": failures,
        }

    def _board_count(self, tx: _Tx, kind: bytes, who: str, stage: int) -> int:
        raw = tx.get("board", tx.p + b"A" + kind + who.encode() + b"\x00" + bytes([stage]))
        return _U64.unpack(raw)[0] if raw else 0

    def leaderboard(self, name: str, now: float, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """Jobs completed per user and per worker, per stage, all time and last 24 h; paged by ``offset``."""
        project = self.project(name)
        stage_names = [s.name for s in project.stages]
        tables: dict[str, dict[str, dict[str, dict[str, int]]]] = {"users": {}, "workers": {}}

        def add(period: str, kind: bytes, who: str, stage: int, count: int) -> None:
            table = tables["users" if kind == b"u" else "workers"]
            row = table.setdefault(who, {"all_time": {}, "last_24h": {}})
            bucket = row[period]
            bucket[stage_names[stage]] = bucket.get(stage_names[stage], 0) + count

        with self._read(project) as tx:
            for key, raw in tx.scan("board", tx.p + b"A"):
                rest = key[len(tx.p) + 1 :]
                who, stage = rest[1:-2].decode(), rest[-1]
                add("all_time", rest[:1], who, stage, _U64.unpack(raw)[0])
            first_hour = _U32.pack(max(0, int(now // 3600) - 23))
            for key, raw in tx.scan("board", tx.p + b"H", tx.p + b"H" + first_hour):
                rest = key[len(tx.p) + 5 :]
                who, stage = rest[1:-2].decode(), rest[-1]
                add("last_24h", rest[:1], who, stage, _U64.unpack(raw)[0])
        out: dict[str, Any] = {"project": project.name, "stages": stage_names, "offset": offset, "limit": limit, "total": {}}
        for kind, table in tables.items():
            rows = [
                {
                    "name": who,
                    "all_time": row["all_time"],
                    "last_24h": row["last_24h"],
                    "total": sum(row["all_time"].values()),
                    "total_24h": sum(row["last_24h"].values()),
                }
                for who, row in table.items()
            ]
            rows.sort(key=lambda r: (-r["total"], r["name"]))
            out["total"][kind] = len(rows)
            out[kind] = rows[offset : offset + limit]
        return out

    def results(self, name: str, *, after: int = 0, limit: int = 1000, with_input: bool = False) -> list[dict[str, Any]]:
        """Last-stage outputs in completion order; page with ``after`` = the last ``seq`` seen.

        ``with_input`` adds the input of the job that produced each result and,
        for a multi-stage project, ``root_input``: what was created at stage 1.
        """
        project = self.project(name)
        with self._read(project) as tx:
            out = []
            for key, raw in tx.scan("results", tx.p, tx.p + _U64.pack(after + 1)):
                result = dict(_loads(raw, "result"), seq=_U64.unpack(key[-8:])[0])
                if with_input:
                    job = tx.job(result["job"])
                    result["input"] = job["input"] if job is not None else None
                    if result["root"] != result["job"]:
                        root = tx.job(result["root"])
                        result["root_input"] = root["input"] if root is not None else None
                out.append(result)
                if len(out) >= limit:
                    break
        return out

    def failures(self, name: str, *, limit: int = 100) -> list[dict[str, Any]]:
        project = self.project(name)
        with self._read(project) as tx:
            return [_loads(raw, "failure") for _, raw in _scan_reverse(tx, "failures", tx.p, limit)]


# --- helpers ----------------------------------------------------------------------------


def _pkey(name: str) -> bytes:
    return name.encode() + b"\x00"


def _lease_key(expires: float, pkey: bytes, job_id: int) -> bytes:
    return _U64.pack(int(expires * 1000)) + pkey + _U64.pack(job_id)


def _check_limit(limit: Any) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise BadRequest(f"max must be an integer in 1..1000, got {limit!r}", code="bad_limit")


def _job_id(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"job id must be a positive integer, got {value!r}", code="bad_job_id")
    return value


def _scan_reverse(tx: _Tx, db: str, prefix: bytes, limit: int) -> Iterator[tuple[bytes, bytes]]:
    cursor = tx.txn.cursor(db=tx.dbs[db])
    # Position after the last key with this prefix, then walk back.
    upper = prefix[:-1] + bytes([prefix[-1] + 1]) if prefix else None
    if upper is not None and cursor.set_range(upper):
        ok = cursor.prev()
    else:
        ok = cursor.last()
    n = 0
    while ok and n < limit:
        key = cursor.key()
        if not key.startswith(prefix):
            return
        yield bytes(key), bytes(cursor.value())
        n += 1
        ok = cursor.prev()


def _public_job(project: Project, job: dict[str, Any]) -> dict[str, Any]:
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
