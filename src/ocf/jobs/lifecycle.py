"""The lease state machine: how a job moves between pending, leased, done, failed and superseded.

Each step here runs inside a transaction its caller opened (``tx``) and
keeps every index in step with the job record: the stage queue, the lease
expiry index, the per-stage state counters, the worker's list of leases,
the leaderboard and the throughput series. Because a step never commits on
its own, one request's whole change (a completion and the next-stage jobs
it creates, say) commits or rolls back as one.
"""

from __future__ import annotations

from typing import Any

from ..errors import JobNotFound, WorkerNotFound
from .core import StoreCore, public_job
from .keys import U32, U64, dumps, lease_key
from . import rules
from .model import Project
from .rules import MAX_FAILURES_KEPT
from .txn import Tx

__all__ = ["MAX_FAILURES_KEPT", "LeaseMachine"]


class LeaseMachine(StoreCore):
    """Job state transitions inside an open transaction (the ``_`` methods the operations share)."""

    def _new_job(
        self, tx: Tx, project: Project, stage: int, value: Any, now: float, *, parent: int | None, root: int | None
    ) -> int:
        job_id = tx.bump("next_id")
        job = rules.new_job(job_id, stage, value, now, parent=parent, root=root)
        self._enqueue(tx, job)
        tx.bump(f"s{stage}.pending")
        return job_id

    def _enqueue(self, tx: Tx, job: dict[str, Any]) -> None:
        tx.enqueued.add((tx.project_name, job["stage"]))
        seq = tx.bump("seq")
        job["state"] = "pending"
        job["qseq"] = seq
        for key in ("worker", "lease_expires"):
            job.pop(key, None)
        tx.put("queue", tx.p + bytes([job["stage"]]) + U64.pack(seq), U64.pack(job["id"]))
        tx.put_job(job)

    def _dequeue(self, tx: Tx, job: dict[str, Any]) -> None:
        seq = job.pop("qseq", None)
        if seq is not None:
            tx.delete("queue", tx.p + bytes([job["stage"]]) + U64.pack(seq))

    def _unlease(self, tx: Tx, job: dict[str, Any]) -> None:
        expires = job.pop("lease_expires", None)
        if expires is not None:
            tx.delete("leases", lease_key(expires, tx.p, job["id"]))
        job.pop("worker", None)

    def _worker(self, tx: Tx, token: Any, now: float) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise WorkerNotFound("a worker token is required (register with /workers or /api/new first)")
        worker = tx.worker(token)
        if worker is None or worker["last_seen"] + self.worker_timeout < now:
            raise WorkerNotFound("the tracker does not know this worker; did it time out? Register again.")
        return worker

    def _held_job(
        self, tx: Tx, project: Project, token: Any, job_id: int, now: float
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The worker and the job it is giving back (fail, flag); refused unless it holds the lease."""
        worker = self._worker(tx, token, now)
        job = tx.job(job_id)
        if job is None:
            raise JobNotFound(f"project {project.name!r} has no job {job_id}")
        rules.check_lease(job, worker)
        worker["leases"] = [j for j in worker["leases"] if j != job_id]
        worker["last_seen"] = now
        tx.put_worker(worker)
        return worker, job

    def _release_all(self, tx: Tx, project: Project, worker: dict[str, Any], now: float) -> int:
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

    def _claim_in(
        self, tx: Tx, project: Project, worker: dict[str, Any], limit: int, now: float
    ) -> list[dict[str, Any]]:
        stage_index = worker["stage"]
        timeout = project.stages[stage_index].lease_timeout
        picked = []
        stale = []
        for key, raw_id in tx.scan("queue", tx.p + bytes([stage_index])):
            job = tx.job(U64.unpack(raw_id)[0])
            if job is None or job["state"] != "pending" or job.get("qseq") != U64.unpack(key[-8:])[0]:
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
            tx.put("leases", lease_key(job["lease_expires"], tx.p, job["id"]), b"")
            tx.put_job(job)
            worker["leases"].append(job["id"])
            worker["last_claimed"] = job["id"]
            out.append(public_job(project, job))
        if picked:
            tx.bump(f"s{stage_index}.pending", -len(picked))
            tx.bump(f"s{stage_index}.leased", len(picked))
            worker["progress"] = f"Received {len(picked)} job(s)"
        worker["last_seen"] = now
        return out

    def _complete_one(
        self, tx: Tx, project: Project, worker: dict[str, Any], job_id: int, output: Any, now: float
    ) -> dict[str, Any]:
        # Every check comes before the first write, so a refused item changes nothing.
        self.check_payload(output, "job output")
        job = tx.job(job_id)
        if job is None:
            raise JobNotFound(f"project {project.name!r} has no job {job_id}")
        worker["last_seen"] = now
        if job["state"] == "done" and job.get("done_token") == worker["token"]:
            return {"id": job_id, "status": "already_done", "children": job.get("children", [])}
        rules.check_lease(job, worker)
        stage = job["stage"]
        last, inputs = rules.next_inputs(project, stage, output)
        children: list[int] = []
        if not last:
            for value in inputs:
                children.append(self._new_job(tx, project, stage + 1, value, now, parent=job_id, root=job["root"]))
        else:
            seq = tx.bump("results")
            tx.put("results", tx.p + U64.pack(seq), dumps(rules.result(job, worker, output, now)))
            job["result_seq"] = seq
        self._unlease(tx, job)
        rules.mark_done(job, worker, now, children)
        tx.put_job(job)
        tx.bump(f"s{stage}.leased", -1)
        tx.bump(f"s{stage}.done")
        worker["leases"] = [j for j in worker["leases"] if j != job_id]
        if not tx.count(f"s{stage}.first_ms"):
            tx.bump(f"s{stage}.first_ms", int(now * 1000))  # where the stage's rate window may start
        self._credit(tx, worker, stage, now)
        return {"id": job_id, "status": "done", "children": children}

    def _credit(self, tx: Tx, worker: dict[str, Any], stage: int, now: float) -> None:
        hour = U32.pack(int(now // 3600))
        minute = U32.pack(int(now // 60))
        for kind, who in ((b"u", worker["user"]), (b"w", worker["name"])):
            tail = kind + who.encode() + b"\x00" + bytes([stage])
            tx.add("board", tx.p + b"A" + tail)
            tx.add("board", tx.p + b"H" + hour + tail)
        tx.add("series", tx.p + minute + bytes([stage]))

    def _retry_or_fail(self, tx: Tx, project: Project, job: dict[str, Any], error: str, now: float) -> str:
        """A lease ended without a result: back to pending, or failed once attempts are used up."""
        self._unlease(tx, job)
        rules.add_error(job, now, error)
        stage = job["stage"]
        tx.bump(f"s{stage}.leased", -1)
        seq = tx.bump("failure_seq")
        tx.put("failures", tx.p + U64.pack(seq), dumps(rules.failure(project, job, error, now)))
        if seq > MAX_FAILURES_KEPT:
            tx.delete("failures", tx.p + U64.pack(seq - MAX_FAILURES_KEPT))
        if job["attempts"] >= project.max_attempts:
            job["state"] = "failed"
            tx.put_job(job)
            tx.bump(f"s{stage}.failed")
            return "failed"
        tx.bump(f"s{stage}.pending")
        self._enqueue(tx, job)
        return "pending"

    def _rollback(self, tx: Tx, project: Project, parent: dict[str, Any], note: str, now: float) -> None:
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
        rules.redo(parent, note, now)
        tx.bump(f"s{stage}.done", -1)
        tx.bump(f"s{stage}.pending")
        self._enqueue(tx, parent)
