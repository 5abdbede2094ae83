"""The lease state machine on PostgreSQL rows: the same transitions as :mod:`ocf.jobs.lifecycle`.

Each step edits job and worker records (the same dicts as the LMDB store's)
inside an operation's :class:`~ocf.jobs.pg.tx.PgTx` and records counter
deltas. What LMDB keeps as index entries (queue, lease index, a worker's
lease list) is columns here: ``state``/``qseq`` put a job in its stage's
queue, ``state``/``lease_expires`` in the lease index, ``worker`` in its
holder's leases. So requeueing is "state pending, no qseq": the write-back
takes the next queue number.
"""

from __future__ import annotations

from typing import Any

from ...errors import JobNotFound, WorkerNotFound
from ..core import public_job
from .. import rules
from ..rules import MAX_FAILURES_KEPT
from ..model import Project
from .core import PgCore
from .schema import PREFIX
from .tx import JOB_COLS, PgTx, Record, jsonb, row_to_job

__all__ = ["MAX_FAILURES_KEPT", "PgMachine"]


class PgMachine(PgCore):
    """Job state transitions inside an open operation."""

    def _new_jobs(
        self,
        tx: PgTx,
        project: Project,
        stage: int,
        values: list[Any],
        now: float,
        *,
        parent: int | None,
        root: int | None,
    ) -> list[int]:
        ids = self._ids(tx, project.name, len(values)) if values else []
        for job_id, value in zip(ids, values, strict=True):
            tx.new_job(project.name, rules.new_job(job_id, stage, value, now, parent=parent, root=root))
        if ids:
            tx.bump(project.name, f"s{stage}.pending", len(ids))
            tx.deltas.enqueued.add((project.name, stage))
        return ids

    def _enqueue(self, tx: PgTx, project: str, job: Record) -> None:
        tx.deltas.enqueued.add((project, job["stage"]))
        job["state"] = "pending"
        for key in ("worker", "lease_expires", "qseq"):
            job.pop(key, None)
        tx.put_job(project, job)

    def _worker(self, tx: PgTx, project: str, token: Any, now: float) -> Record:
        if not isinstance(token, str) or not token:
            raise WorkerNotFound("a worker token is required (register with /workers or /api/new first)")
        worker = tx.worker(project, token)
        if worker is None or worker["last_seen"] + self.worker_timeout < now:
            raise WorkerNotFound("the tracker does not know this worker; did it time out? Register again.")
        return worker

    def _leased_to(self, tx: PgTx, project: str, token: str) -> list[Record]:
        """The jobs leased to ``token`` (locked), oldest lease first."""
        rows = tx.execute(
            f"""SELECT {JOB_COLS} FROM {PREFIX}jobs WHERE project = %s AND worker = %s AND state = 'leased'
                ORDER BY id FOR UPDATE""",
            (project, token),
        ).fetchall()
        jobs = [row_to_job(row) for row in rows]
        for job in jobs:
            tx.cache_job(project, job)
        return jobs

    def _held_job(self, tx: PgTx, project: Project, token: Any, job_id: int, now: float) -> tuple[Record, Record]:
        worker = self._worker(tx, project.name, token, now)
        job = tx.job(project.name, job_id)
        if job is None:
            raise JobNotFound(f"project {project.name!r} has no job {job_id}")
        rules.check_lease(job, worker)
        worker["last_seen"] = now
        tx.put_worker(project.name, worker)
        return worker, job

    def _release(self, tx: PgTx, project: str, jobs: list[Record]) -> int:
        for job in jobs:
            job["attempts"] = max(0, job["attempts"] - 1)
            tx.bump(project, f"s{job['stage']}.leased", -1)
            tx.bump(project, f"s{job['stage']}.pending")
            self._enqueue(tx, project, job)
        return len(jobs)

    def _claim_in(self, tx: PgTx, project: Project, worker: Record, limit: int, now: float) -> list[Record]:
        stage = worker["stage"]
        tx.flush()  # jobs this operation requeued must be visible to the claim below
        expires = now + project.stages[stage].lease_timeout
        rows = tx.execute(
            f"""WITH picked AS (
                    SELECT id, qseq FROM {PREFIX}jobs
                    WHERE project = %(p)s AND stage = %(s)s AND state = 'pending'
                    ORDER BY qseq LIMIT %(n)s FOR UPDATE SKIP LOCKED)
                UPDATE {PREFIX}jobs j SET state = 'leased', qseq = NULL, worker = %(w)s,
                    attempts = j.attempts + 1, lease_expires = %(e)s
                FROM picked WHERE j.project = %(p)s AND j.id = picked.id
                RETURNING picked.qseq, j.id, j.stage, j.state, j.qseq, j.worker, j.lease_expires, j.attempts,
                    j.parent, j.root, j.input, j.extra""",
            {"p": project.name, "s": stage, "n": limit, "w": worker["token"], "e": expires},
        ).fetchall()
        rows.sort(key=lambda r: r[0])
        out = []
        for row in rows:
            job = row_to_job(row[1:])
            tx.cache_job(project.name, job)
            worker["last_claimed"] = job["id"]
            out.append(public_job(project, job))
        if rows:
            tx.bump(project.name, f"s{stage}.pending", -len(rows))
            tx.bump(project.name, f"s{stage}.leased", len(rows))
            worker["progress"] = f"Received {len(rows)} job(s)"
        worker["last_seen"] = now
        return out

    def _complete_one(
        self, tx: PgTx, project: Project, worker: Record, job_id: int, output: Any, now: float
    ) -> dict[str, Any]:
        self.check_payload(output, "job output")
        job = tx.job(project.name, job_id)
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
            children = self._new_jobs(tx, project, stage + 1, inputs, now, parent=job_id, root=job["root"])
        else:
            tx.bump(project.name, "results")
            tx.deltas.results.append((project.name, rules.result(job, worker, output, now)))
        job.pop("worker", None)
        job.pop("lease_expires", None)
        rules.mark_done(job, worker, now, children)
        tx.put_job(project.name, job)
        tx.bump(project.name, f"s{stage}.leased", -1)
        tx.bump(project.name, f"s{stage}.done")
        if not self.first_known(project.name, stage):
            tx.deltas.firsts.setdefault((project.name, stage), int(now * 1000))
        tx.credit(project.name, worker["user"], worker["name"], stage, now)
        return {"id": job_id, "status": "done", "children": children}

    def _retry_or_fail(self, tx: PgTx, project: Project, job: Record, error: str, now: float) -> str:
        job.pop("worker", None)
        job.pop("lease_expires", None)
        rules.add_error(job, now, error)
        stage = job["stage"]
        tx.bump(project.name, f"s{stage}.leased", -1)
        tx.execute(
            f"INSERT INTO {PREFIX}failures (project, seq, rec) VALUES (%s, nextval('{PREFIX}failure_seq'), %s)",
            (project.name, jsonb(rules.failure(project, job, error, now))),
        )
        if job["attempts"] >= project.max_attempts:
            job["state"] = "failed"
            tx.put_job(project.name, job)
            tx.bump(project.name, f"s{stage}.failed")
            return "failed"
        tx.bump(project.name, f"s{stage}.pending")
        self._enqueue(tx, project.name, job)
        return "pending"

    def _rollback(self, tx: PgTx, project: Project, parent: Record, note: str, now: float) -> None:
        tx.prefetch(project.name, list(parent.get("children", [])))
        for child_id in parent.get("children", []):
            child = tx.job(project.name, child_id)
            if child is None or child["state"] in ("done", "failed", "superseded"):
                continue
            stage = child["stage"]
            if child["state"] == "pending":
                tx.bump(project.name, f"s{stage}.pending", -1)
            else:
                tx.bump(project.name, f"s{stage}.leased", -1)
            for key in ("worker", "lease_expires", "qseq"):
                child.pop(key, None)
            child["state"] = "superseded"
            tx.put_job(project.name, child)
            tx.bump(project.name, f"s{stage}.superseded")
        stage = parent["stage"]
        rules.redo(parent, note, now)
        tx.bump(project.name, f"s{stage}.done", -1)
        tx.bump(project.name, f"s{stage}.pending")
        self._enqueue(tx, project.name, parent)
