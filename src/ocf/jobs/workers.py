"""Worker registration and departure: who may hold leases, and handing leases back.

A worker is a registration (a secret token, a public display name, the
stage it works on) that lives while it is heard from: a worker silent for
``worker_timeout`` is forgotten and its leases return to pending.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..errors import InvalidJobRequest, WorkerNotFound
from .lifecycle import LeaseMachine
from .names import worker_name

MAX_NICKNAME = 64


class WorkerOps(LeaseMachine):
    """Registering, checking and releasing workers."""

    def register_worker(
        self, name: str, *, nickname: str, stage: Any, now: float, user: str | None = None
    ) -> dict[str, Any]:
        project = self.project(name)
        stage_index = project.stage_index(stage)
        user = nickname if user is None else user
        for field, value in (("nickname", nickname), ("user", user)):
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_NICKNAME or not value.isprintable():
                raise InvalidJobRequest(f"{field} must be 1-{MAX_NICKNAME} printable characters", code="bad_worker")
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
            except WorkerNotFound:
                return False
        return True

    def bye(self, name: str, token: Any, now: float) -> int:
        """Forget a worker, returning its leased jobs to pending at once (no attempt used)."""
        project = self.project(name)
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            released = self._release_all(tx, project, worker, now)
            tx.delete("workers", tx.p + worker["token"].encode())
            tx.delete("names", tx.p + worker["name"].encode())
        return released

    def release(self, name: str, token: Any, job_ids: list[int], now: float) -> int:
        """Hand back jobs leased to a caller that left before it got them (no attempt used)."""
        project = self.project(name)
        with self._write(project) as tx:
            worker = self._worker(tx, token, now)
            keep: list[int] = []
            give: list[int] = []
            for job_id in worker["leases"]:
                (give if job_id in job_ids else keep).append(job_id)
            worker["leases"] = give
            released = self._release_all(tx, project, worker, now)
            worker["leases"] = keep
            tx.put_worker(worker)
        return released
