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

The store is split by concern: the key layout and record codec
(:mod:`ocf.jobs.keys`), typed transactions (:mod:`ocf.jobs.txn`), settings
and projects (:mod:`ocf.jobs.core`), the lease state machine
(:mod:`ocf.jobs.lifecycle`), workers (:mod:`ocf.jobs.workers`) and
read-only reports (:mod:`ocf.jobs.reports`). This module holds the
operations a request or the clock performs, each one transaction.
"""

from __future__ import annotations

import json
from typing import Any
from collections.abc import Iterable

from ..errors import InvalidJobRequest, JobNotFound, JobsError, StoreCorrupt
from .core import ACTIVE_WINDOW, public_job
from .keys import U32, U64, check_limit, dumps, lease_key, loads, parse_job_id, pkey
from .reports import Reports
from .txn import Tx
from .workers import WorkerOps

__all__ = ["ACTIVE_WINDOW", "JobStore"]

MAX_PROGRESS = 1000
SERIES_KEEP_MINUTES = 24 * 60
YIELD_EVERY = 64  # jobs created between two chances for another thread to take the GIL


class JobStore(WorkerOps, Reports):
    """All tracker state transitions; see :mod:`ocf.jobs.keys` for the layout.

    Methods take ``now`` (wall-clock seconds) so leases survive restarts and
    tests can drive time without sleeping.
    """

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
                    record = loads(previous, "idempotency record")
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
                tx.put("idem", tx.p + idempotency_key.encode(), dumps(dict(answer, done=final)))
        return answer

    def creation_record(self, name: str, idempotency_key: str) -> dict[str, Any] | None:
        """What a job creation with this key wrote so far (``done`` once all of it is durable)."""
        project = self.project(name)
        with self._read(project) as tx:
            raw = tx.get("idem", tx.p + idempotency_key.encode())
            return loads(raw, "idempotency record") if raw is not None else None

    def job(self, name: str, job_id: int) -> dict[str, Any]:
        project = self.project(name)
        with self._read(project) as tx:
            job = tx.job(job_id)
        if job is None:
            raise JobNotFound(f"project {name!r} has no job {job_id}")
        return public_job(project, job)

    # --- the job cycle --------------------------------------------------------------------

    def claim(
        self, name: str, token: Any, now: float, *, limit: int = 1, stage: Any = None, release_held: bool = False
    ) -> list[dict[str, Any]]:
        """Lease up to ``limit`` pending jobs of the worker's stage, oldest first."""
        project = self.project(name)
        check_limit(limit)
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            stage_index = worker["stage"] if stage is None else project.stage_index(stage)
            if stage_index != worker["stage"]:
                raise InvalidJobRequest(
                    f"worker {worker['name']} registered for stage {project.stages[worker['stage']].name!r}, not "
                    f"{project.stages[stage_index].name!r}",
                    code="wrong_stage",
                )
            if release_held:
                self._release_all(tx, project, worker, now)
            out = self._claim_in(tx, project, worker, limit, now)
            tx.put_worker(worker)
        return out

    def heartbeat(self, name: str, token: Any, now: float, *, progress: Any = None, jobs: Any = None) -> dict[str, Any]:
        """Extend every lease the worker holds; ``lost`` lists those of ``jobs`` it no longer holds.

        A client passes the ids it believes it is working on, and learns which
        ones expired or were rolled back, so it can stop wasting work on them.
        """
        project = self.project(name)
        if jobs is not None and (not isinstance(jobs, list) or len(jobs) > 10_000):
            raise InvalidJobRequest("'jobs' must be a list of job ids", code="bad_jobs")
        believed = [parse_job_id(j) for j in jobs] if jobs is not None else []
        if progress is not None and (not isinstance(progress, str) or len(progress) > MAX_PROGRESS):
            raise InvalidJobRequest(
                f"progress must be a string of at most {MAX_PROGRESS} characters", code="bad_progress"
            )
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            held, lost = {}, []
            for job_id in worker["leases"]:
                job = tx.job(job_id)
                if job is None or job["state"] != "leased" or job.get("worker") != worker["token"]:
                    lost.append(job_id)
                    continue
                tx.delete("leases", lease_key(job["lease_expires"], tx.p, job_id))
                job["lease_expires"] = now + project.stages[job["stage"]].lease_timeout
                tx.put("leases", lease_key(job["lease_expires"], tx.p, job_id), b"")
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
            result = self._complete_one(tx, project, worker, parse_job_id(job_id), output, now)
            tx.put_worker(worker)
        return result

    def complete_many(
        self, name: str, token: Any, items: Any, now: float, *, claim: int = 0
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Complete a batch in one transaction; each item succeeds or fails on its own.

        ``items`` is ``[{"id": N, "output": ...}, ...]``; the answer has one
        entry per item, ``{"id", "status": "done" | "already_done"}`` or
        ``{"id", "status": "error", "kind", "code", "message"}`` where ``kind``
        is the :class:`~ocf.errors.JobsError` category (the HTTP edge,
        :mod:`ocf.jobs.edge`, turns it into ``http_status``).
        With ``claim`` > 0 the same transaction also leases that many new
        jobs (returned second): a worker's whole cycle in one request and one
        commit, which is what lets a tracker keep up with thousands of jobs a
        second.
        """
        project = self.project(name)
        if not isinstance(items, list) or len(items) > 1000 or (not items and not claim):
            raise InvalidJobRequest("'results' must be a list of 1..1000 {id, output} objects", code="bad_results")
        if claim:
            check_limit(claim)
        out = []
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            for item in items:
                try:
                    if not isinstance(item, dict) or "id" not in item:
                        raise InvalidJobRequest(
                            "each result must be an object with 'id' and 'output'", code="bad_results"
                        )
                    out.append(
                        self._complete_one(tx, project, worker, parse_job_id(item["id"]), item.get("output"), now)
                    )
                except JobsError as exc:
                    ident = item.get("id") if isinstance(item, dict) else None
                    out.append(
                        {
                            "id": ident,
                            "status": "error",
                            "kind": exc.kind,
                            "code": exc.code,
                            "message": exc.message,
                        }
                    )
            claimed = self._claim_in(tx, project, worker, claim, now) if claim else []
            tx.put_worker(worker)
        return out, claimed

    def fail(self, name: str, token: Any, job_id: Any, error: Any, now: float) -> dict[str, Any]:
        """The lease holder gives up on a job: it is retried, or failed after ``max_attempts``."""
        project = self.project(name)
        job_id = parse_job_id(job_id)
        if not isinstance(error, str) or not error:
            error = "worker reported failure" if error in (None, "") else json.dumps(error)[:MAX_PROGRESS]
        error = error[:MAX_PROGRESS]
        with self._write(project) as tx:
            worker, job = self._held_job(tx, project, token, job_id, now)
            state = self._retry_or_fail(tx, project, job, f"{worker['name']}: {error}", now)
        return {"id": job_id, "status": state, "attempts": job["attempts"]}

    def flag(self, name: str, token: Any, job_id: Any, now: float, reason: Any = None) -> dict[str, Any]:
        """The lease holder says the job's *input* is bad.

        The lease is given back (no attempt used). Once ``flag_threshold``
        distinct users (or workers, with ``flag_per_worker``) agree, the job that produced the input (stage N-1)
        is redone: its not-yet-done outputs are withdrawn and it goes back
        to pending. A stage-1 job has no producer and is failed instead.
        """
        project = self.project(name)
        job_id = parse_job_id(job_id)
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
            note = f"input flagged invalid by {len(job['flags'])} {'workers' if self.flag_per_worker else 'users'}" + (
                f" ({str(reason)[:200]})" if reason else ""
            )
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
            if parent is None:  # a job's producer is never deleted: only a damaged store lacks it
                raise StoreCorrupt(
                    f"job {job['parent']} (the producer of job {job_id}) is missing; start with --cleanslate"
                )
            self._rollback(tx, project, parent, note, now)
        return {"id": job_id, "status": "rolled_back", "flags": len(job["flags"]), "redo": parent["id"]}

    # --- time-driven ----------------------------------------------------------------------

    def next_expiry(self) -> float | None:
        with self._read() as tx:
            cursor = tx.cursor("leases")
            if not cursor.first():
                return None
            return U64.unpack(cursor.key()[:8])[0] / 1000.0

    def expire(self, now: float, *, limit: int = 10_000) -> list[tuple[str, int, str]]:
        """Return jobs whose lease ran out to pending (or failed); ``[(project, id, new_state)]``."""
        out = []
        deadline = U64.pack(int(now * 1000))
        with self._write() as tx:
            cursor = tx.cursor("leases")
            due: list[bytes] = []
            if cursor.first():
                for key, _ in cursor:
                    if key[:8] > deadline or len(due) >= limit:
                        break
                    due.append(bytes(key))
            for key in due:
                tx.delete("leases", key)
                project_key, job_id = key[8:-8], U64.unpack(key[-8:])[0]
                project = self._projects.get(project_key[:-1].decode())
                if project is None:
                    continue
                ptx = tx.view(project_key)
                job = ptx.job(job_id)
                if (
                    job is None
                    or job["state"] != "leased"
                    or lease_key(job["lease_expires"], project_key, job_id) != key
                ):
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
                ptx = tx.view(pkey(project.name))
                idle = [loads(raw, "worker") for _, raw in ptx.scan("workers", ptx.p)]
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

    def _prune(self, tx: Tx, now: float) -> None:
        oldest_minute = U32.pack(max(0, int(now // 60) - SERIES_KEEP_MINUTES))
        old = [bytes(k) for k, _ in tx.scan("series", tx.p) if k[len(tx.p) : len(tx.p) + 4] < oldest_minute]
        for key in old:
            tx.delete("series", key)
        oldest_hour = U32.pack(max(0, int(now // 3600) - 48))
        old = [bytes(k) for k, _ in tx.scan("board", tx.p + b"H") if k[len(tx.p) + 1 : len(tx.p) + 5] < oldest_hour]
        for key in old:
            tx.delete("board", key)
