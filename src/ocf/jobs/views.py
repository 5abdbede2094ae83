"""Operator views of a project that read the store: the live worker list.

Kept apart from :mod:`ocf.jobs.store` (the state machine) because they only
read. The original tracker's operators watched thousands of volunteer workers
on a page listing, per stage, what each is doing; this is that list, paged.
"""

from __future__ import annotations

from typing import Any

from .model import STAGE_LETTERS
from .core import ACTIVE_WINDOW
from .tracker import TrackerStore

MAX_PAGE = 1000


def list_workers(
    store: TrackerStore,
    name: str,
    now: float,
    *,
    stage: Any = None,
    include_idle: bool = False,
    offset: int = 0,
    limit: int = 100,
) -> dict[str, Any]:
    """Workers of a project (one stage, or all), most productive first, paged.

    Without ``include_idle`` only workers heard from in the last
    ``ACTIVE_WINDOW`` seconds are listed: a volunteer fleet leaves many
    registrations behind, and the operator's question is who works now.
    """
    project = store.project(name)
    stage_index = project.stage_index(stage) if stage is not None else None
    rows = []
    for worker in store.worker_records(name):
        if stage_index is not None and worker["stage"] != stage_index:
            continue
        active = worker["last_seen"] + ACTIVE_WINDOW >= now
        if not active and not include_idle:
            continue
        rows.append(
            {
                "name": worker["name"],
                "user": worker["user"],
                "stage": project.stages[worker["stage"]].name,
                "stage_letter": STAGE_LETTERS[worker["stage"]],
                "current_jobs": list(worker["leases"]),
                "progress": worker["progress"],
                "jobs_completed": worker["completed"],
                "last_seen": worker["last_seen"],
                "active": active,
            }
        )
    rows.sort(key=lambda r: (-r["jobs_completed"], -r["last_seen"], r["name"]))
    return {
        "project": project.name,
        "total": len(rows),
        "offset": offset,
        "limit": limit,
        "workers": rows[offset : offset + limit],
    }
