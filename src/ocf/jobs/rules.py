"""The tracker's pure rules, the same for both stores: what a job record looks like at each step.

:mod:`ocf.jobs.lifecycle` (LMDB) and :mod:`ocf.jobs.pg.machine`
(PostgreSQL) keep their indexes, counters and rows differently, but a job
record, a lease check, a failure or a result must be the same on both, so
those are decided here, with no store in sight.
"""

from __future__ import annotations

from typing import Any

from ..errors import JobsPayloadTooLarge, LeaseNotHeld
from .model import MAX_FANOUT, Project

Record = dict[str, Any]

MAX_FAILURES_KEPT = 1000
MAX_ERRORS_PER_JOB = 20

_NOT_HELD = {
    "done": "was already completed by another worker",
    "failed": "has failed and is closed",
    "superseded": "was rolled back after its input was flagged invalid",
    "pending": "is pending again after your lease expired",
    "leased": "is leased to another worker after your lease expired",
}


def new_job(job_id: int, stage: int, value: Any, now: float, *, parent: int | None, root: int | None) -> Record:
    return {
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


def check_lease(job: Record, worker: Record) -> None:
    """Only the lease holder may complete, fail or flag a job; anyone else learns why not."""
    if job["state"] == "leased" and job.get("worker") == worker["token"]:
        return
    what = _NOT_HELD.get(job["state"], f"is {job['state']}")
    raise LeaseNotHeld(f"job {job['id']} {what}; your result was not recorded")


def add_error(job: Record, now: float, error: str) -> None:
    job["errors"] = (job["errors"] + [{"time": now, "error": error}])[-MAX_ERRORS_PER_JOB:]


def next_inputs(project: Project, stage: int, output: Any) -> tuple[bool, list[Any]]:
    """Whether ``stage`` is the last, and the inputs of the next-stage jobs a completion makes (fan-out)."""
    last = stage == len(project.stages) - 1
    inputs = output if project.stages[stage].fanout and isinstance(output, list) else [output]
    if not last and len(inputs) > MAX_FANOUT:
        raise JobsPayloadTooLarge(f"a fan-out output may have at most {MAX_FANOUT} elements", code="fanout_too_large")
    return last, inputs


def result(job: Record, worker: Record, output: Any, now: float) -> Record:
    """A last-stage completion's entry in the project's results."""
    return {
        "job": job["id"],
        "root": job["root"],
        "output": output,
        "worker": worker["name"],
        "user": worker["user"],
        "time": now,
    }


def mark_done(job: Record, worker: Record, now: float, children: list[int]) -> None:
    """The job record, and its worker's, once a completion is accepted (the lease already removed)."""
    job["state"] = "done"
    job["done_token"] = worker["token"]
    job["done_by"] = worker["name"]
    job["user"] = worker["user"]
    job["finished"] = now
    job["children"] = children
    worker["completed"] += 1
    worker["last_done"] = job["id"]
    worker["progress"] = "Completed job"


def failure(project: Project, job: Record, error: str, now: float) -> Record:
    """An entry of the project's failure log (a lease that ended without a result)."""
    return {
        "job": job["id"],
        "stage": project.stages[job["stage"]].name,
        "time": now,
        "error": error,
        "attempt": job["attempts"],
    }


def redo(parent: Record, note: str, now: float) -> None:
    """A completed job whose output was flagged invalid, made ready to run again (its children superseded)."""
    parent["children"] = []
    add_error(parent, now, f"redone: {note}")
    parent["attempts"] = 0
    for key in ("done_token", "done_by", "user", "finished"):
        parent.pop(key, None)
