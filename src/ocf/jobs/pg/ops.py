"""The operations a request or the clock performs on the PostgreSQL store, each one transaction.

Same names, arguments, answers and errors as :class:`ocf.jobs.store.JobStore`
(the tests run the same cases against both). What differs is how several
nodes share the rows: a claim skips jobs another node's batch has locked
(``FOR UPDATE SKIP LOCKED``), the reaper on each node locks the due leases it
expires and skips those another reaper holds, and every row an operation
changes is re-read under its lock, so a state check never acts on a stale
copy.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from typing import Any
from collections.abc import Iterable

from ...errors import InvalidJobRequest, JobNotFound, JobsError, ProjectNotFound, StoreCorrupt, WorkerNotFound
from ..core import public_job
from ..keys import check_limit, parse_job_id
from ..names import worker_name
from ..store import MAX_PROGRESS, SERIES_KEEP_MINUTES
from ..workers import MAX_NICKNAME
from .machine import MAX_FAILURES_KEPT, PgMachine
from .schema import PREFIX
from .tx import JOB_COLS, PgTx, jsonb, row_to_job


class PgOps(PgMachine):
    """Creating jobs, the job cycle, workers, and the clock's sweeps."""

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
        project = self.project(name)
        values = list(inputs)
        for value in values:  # before any id is taken, so a refused request leaves no gap
            self.check_payload(value, "job input")

        def op(tx: PgTx) -> dict[str, Any]:
            if idempotency_key:
                row = tx.execute(
                    f"SELECT rec FROM {PREFIX}idem WHERE project = %s AND key = %s FOR UPDATE", (name, idempotency_key)
                ).fetchone()
                if row is not None:
                    record = dict(row[0])
                    if record.pop("done", True):
                        return dict(record, repeated=True)
            ids = self._new_jobs(tx, project, 0, values, now, parent=None, root=None)
            created = (carry["created"] if carry else 0) + len(ids)
            first = carry["first_id"] if carry else None
            first = ids[0] if first is None and ids else first
            last = ids[-1] if ids else (carry["last_id"] if carry else None)
            answer = {"created": created, "first_id": first, "last_id": last}
            if idempotency_key:
                tx.execute(
                    f"""INSERT INTO {PREFIX}idem (project, key, rec) VALUES (%s, %s, %s)
                        ON CONFLICT (project, key) DO UPDATE SET rec = excluded.rec""",
                    (name, idempotency_key, jsonb(dict(answer, done=final))),
                )
            return answer

        return self._write(op)

    def creation_record(self, name: str, idempotency_key: str) -> dict[str, Any] | None:
        self.project(name)
        row = self._read(
            lambda tx: tx.execute(
                f"SELECT rec FROM {PREFIX}idem WHERE project = %s AND key = %s", (name, idempotency_key)
            ).fetchone()
        )
        return dict(row[0]) if row is not None else None

    def job(self, name: str, job_id: int) -> dict[str, Any]:
        project = self.project(name)
        job = self._read(lambda tx: tx.job(name, job_id))
        if job is None:
            raise JobNotFound(f"project {name!r} has no job {job_id}")
        return public_job(project, job)

    # --- the job cycle --------------------------------------------------------------------

    def claim(
        self, name: str, token: Any, now: float, *, limit: int = 1, stage: Any = None, release_held: bool = False
    ) -> list[dict[str, Any]]:
        project = self.project(name)
        check_limit(limit)

        def op(tx: PgTx) -> list[dict[str, Any]]:
            worker = self._worker(tx, name, token, now)
            stage_index = worker["stage"] if stage is None else project.stage_index(stage)
            if stage_index != worker["stage"]:
                registered, asked = project.stages[worker["stage"]].name, project.stages[stage_index].name
                raise InvalidJobRequest(
                    f"worker {worker['name']} registered for stage {registered!r}, not {asked!r}", code="wrong_stage"
                )
            if release_held:
                self._release(tx, name, self._leased_to(tx, name, worker["token"]))
            out = self._claim_in(tx, project, worker, limit, now)
            tx.put_worker(name, worker)
            return out

        return self._write(op)

    def heartbeat(self, name: str, token: Any, now: float, *, progress: Any = None, jobs: Any = None) -> dict[str, Any]:
        project = self.project(name)
        if jobs is not None and (not isinstance(jobs, list) or len(jobs) > 10_000):
            raise InvalidJobRequest("'jobs' must be a list of job ids", code="bad_jobs")
        believed = [parse_job_id(j) for j in jobs] if jobs is not None else []
        if progress is not None and (not isinstance(progress, str) or len(progress) > MAX_PROGRESS):
            raise InvalidJobRequest(
                f"progress must be a string of at most {MAX_PROGRESS} characters", code="bad_progress"
            )

        def op(tx: PgTx) -> dict[str, Any]:
            worker = self._worker(tx, name, token, now)
            expires = now + project.stages[worker["stage"]].lease_timeout
            rows = tx.execute(
                f"""UPDATE {PREFIX}jobs SET lease_expires = %s
                    WHERE project = %s AND worker = %s AND state = 'leased' RETURNING id""",
                (expires, name, worker["token"]),
            ).fetchall()
            held = {row[0]: expires for row in sorted(rows)}
            lost = [j for j in believed if j not in held]
            worker["last_seen"] = now
            if progress is not None:
                worker["progress"] = progress
            tx.put_worker(name, worker)
            return {"leases": {str(k): v for k, v in held.items()}, "lost": lost}

        return self._write(op)

    def complete(self, name: str, token: Any, job_id: Any, output: Any, now: float) -> dict[str, Any]:
        project = self.project(name)
        job_id = parse_job_id(job_id)

        def op(tx: PgTx) -> dict[str, Any]:
            worker = self._worker(tx, name, token, now)
            result = self._complete_one(tx, project, worker, job_id, output, now)
            tx.put_worker(name, worker)
            return result

        return self._write(op)

    def complete_many(
        self, name: str, token: Any, items: Any, now: float, *, claim: int = 0
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        project = self.project(name)
        if not isinstance(items, list) or len(items) > 1000 or (not items and not claim):
            raise InvalidJobRequest("'results' must be a list of 1..1000 {id, output} objects", code="bad_results")
        if claim:
            check_limit(claim)

        def op(tx: PgTx) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            out = []
            ids = []
            for item in items:
                if isinstance(item, dict):
                    with contextlib.suppress(InvalidJobRequest):  # the loop below answers it as this item's error
                        ids.append(parse_job_id(item.get("id")))
            # One round trip for what the completions read: the worker, its jobs (one statement, locked in
            # id order) and, if its stage has a next one, the ids of the jobs they make there.
            if isinstance(token, str) and token:
                tx.want_worker(name, token)
                tx.prefetch(name, ids)
                if ids and len(project.stages) > 1:
                    self._reserve_ids(tx, name, token, len(ids))
            worker = self._worker(tx, name, token, now)
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
                        {"id": ident, "status": "error", "kind": exc.kind, "code": exc.code, "message": exc.message}
                    )
            claimed = self._claim_in(tx, project, worker, claim, now) if claim else []
            tx.put_worker(name, worker)
            return out, claimed

        return self._write(op)

    def fail(self, name: str, token: Any, job_id: Any, error: Any, now: float) -> dict[str, Any]:
        project = self.project(name)
        job_id = parse_job_id(job_id)
        if not isinstance(error, str) or not error:
            error = "worker reported failure" if error in (None, "") else json.dumps(error)[:MAX_PROGRESS]
        error = error[:MAX_PROGRESS]

        def op(tx: PgTx) -> dict[str, Any]:
            worker, job = self._held_job(tx, project, token, job_id, now)
            state = self._retry_or_fail(tx, project, job, f"{worker['name']}: {error}", now)
            return {"id": job_id, "status": state, "attempts": job["attempts"]}

        return self._write(op)

    def flag(self, name: str, token: Any, job_id: Any, now: float, reason: Any = None) -> dict[str, Any]:
        project = self.project(name)
        job_id = parse_job_id(job_id)

        def op(tx: PgTx) -> dict[str, Any]:
            worker, job = self._held_job(tx, project, token, job_id, now)
            flagger = worker["name"] if self.flag_per_worker else "user:" + worker["user"]
            if flagger not in job["flags"]:
                job["flags"].append(flagger)
            stage = job["stage"]
            job.pop("worker", None)
            job.pop("lease_expires", None)
            job["attempts"] = max(0, job["attempts"] - 1)
            tx.bump(name, f"s{stage}.leased", -1)
            if len(job["flags"]) < project.flag_threshold:
                tx.bump(name, f"s{stage}.pending")
                self._enqueue(tx, name, job)
                return {"id": job_id, "status": "flagged", "flags": len(job["flags"])}
            note = f"input flagged invalid by {len(job['flags'])} {'workers' if self.flag_per_worker else 'users'}" + (
                f" ({str(reason)[:200]})" if reason else ""
            )
            if job["parent"] is None:
                job["state"] = "failed"
                job["errors"].append({"time": now, "error": note})
                tx.put_job(name, job)
                tx.bump(name, f"s{stage}.failed")
                return {"id": job_id, "status": "failed", "flags": len(job["flags"])}
            tx.bump(name, f"s{stage}.pending")
            self._enqueue(tx, name, job)
            parent = tx.job(name, job["parent"])
            if parent is None:
                raise StoreCorrupt(f"job {job['parent']} (the producer of job {job_id}) is missing")
            self._rollback(tx, project, parent, note, now)
            return {"id": job_id, "status": "rolled_back", "flags": len(job["flags"]), "redo": parent["id"]}

        return self._write(op)

    # --- time-driven ----------------------------------------------------------------------

    def next_expiry(self) -> float | None:
        row = self._read(
            lambda tx: tx.execute(f"SELECT min(lease_expires) FROM {PREFIX}jobs WHERE state = 'leased'").fetchone()
        )
        return row[0] if row is not None else None

    def expire(self, now: float, *, limit: int = 10_000) -> list[tuple[str, int, str]]:
        """Expire due leases; each node's reaper may run this at once: locked rows are another's to expire."""

        def op(tx: PgTx) -> list[tuple[str, int, str]]:
            rows = tx.execute(
                f"""SELECT j.project, {", ".join("j." + c.strip() for c in JOB_COLS.split(","))}, w.rec->>'name'
                    FROM {PREFIX}jobs j
                    LEFT JOIN {PREFIX}workers w ON w.project = j.project AND w.token = j.worker
                    WHERE j.state = 'leased' AND j.lease_expires <= %s
                    ORDER BY j.lease_expires LIMIT %s FOR UPDATE OF j SKIP LOCKED""",
                (now, limit),
            ).fetchall()
            out = []
            for row in rows:
                name, holder = row[0], row[-1]
                try:
                    project = self.project(name)
                except (ProjectNotFound, WorkerNotFound):
                    continue
                job = row_to_job(row[1:-1])
                tx.cache_job(name, job)
                holder_name = holder if holder is not None else "a forgotten worker"
                state = self._retry_or_fail(tx, project, job, f"{holder_name}: lease expired without a result", now)
                out.append((name, job["id"], state))
            return out

        return self._write(op)

    def forget_idle_workers(self, now: float) -> int:
        """Drop workers silent for ``worker_timeout``, returning their leases; prune old series and failures."""

        def op(tx: PgTx) -> int:
            rows = tx.execute(
                f"""SELECT project, token, rec FROM {PREFIX}workers
                    WHERE (rec->>'last_seen')::float8 + %s < %s FOR UPDATE SKIP LOCKED""",
                (self.worker_timeout, now),
            ).fetchall()
            for name, token, worker in rows:
                try:
                    project = self.project(name)
                except (ProjectNotFound, WorkerNotFound):
                    continue
                for job in self._leased_to(tx, name, token):
                    self._retry_or_fail(tx, project, job, f"{worker['name']}: worker timed out", now)
                tx.execute(f"DELETE FROM {PREFIX}workers WHERE project = %s AND token = %s", (name, token))
            self._prune(tx, now)
            return len(rows)

        return self._write(op)

    def _prune(self, tx: PgTx, now: float) -> None:
        tx.execute(f"DELETE FROM {PREFIX}series WHERE minute < %s", (int(now // 60) - SERIES_KEEP_MINUTES,))
        tx.execute(f"DELETE FROM {PREFIX}board WHERE hour >= 0 AND hour < %s", (int(now // 3600) - 48,))
        tx.execute(
            f"""DELETE FROM {PREFIX}failures f USING (
                    SELECT project, seq FROM (
                        SELECT project, seq, row_number() OVER (PARTITION BY project ORDER BY seq DESC) AS n
                        FROM {PREFIX}failures) ranked WHERE n > %s) old
                WHERE f.project = old.project AND f.seq = old.seq""",
            (MAX_FAILURES_KEPT,),
        )

    # --- workers ----------------------------------------------------------------------------

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

        def op(tx: PgTx) -> dict[str, Any]:
            display = worker_name(secrets.randbits(32))
            while tx.execute(
                f"SELECT 1 FROM {PREFIX}workers WHERE project = %s AND name = %s", (name, display)
            ).fetchone():
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
                "completed": 0,
            }
            tx.new_worker(name, worker)
            return dict(worker, leases=[])

        return self._write(op)

    def worker_stage(self, name: str, token: Any, now: float) -> int:
        self.project(name)
        stage: int = self._read(lambda tx: self._worker(tx, name, token, now)["stage"])
        return stage

    def held_jobs(self, name: str, token: Any, now: float) -> tuple[list[int], int | None]:
        self.project(name)

        def op(tx: PgTx) -> tuple[list[int], int | None]:
            worker = self._worker(tx, name, token, now)
            rows = tx.execute(
                f"SELECT id FROM {PREFIX}jobs WHERE project = %s AND worker = %s AND state = 'leased' ORDER BY id",
                (name, token),
            ).fetchall()
            return [r[0] for r in rows], worker.get("last_claimed", worker.get("last_done"))

        return self._read(op)

    def validate_worker(self, name: str, token: Any, now: float) -> bool:
        self.project(name)
        try:
            self._read(lambda tx: self._worker(tx, name, token, now))
        except (ProjectNotFound, WorkerNotFound):
            return False
        return True

    def bye(self, name: str, token: Any, now: float) -> int:
        self.project(name)

        def op(tx: PgTx) -> int:
            worker = self._worker(tx, name, token, now)
            released = self._release(tx, name, self._leased_to(tx, name, worker["token"]))
            tx.flush()
            tx.execute(f"DELETE FROM {PREFIX}workers WHERE project = %s AND token = %s", (name, worker["token"]))
            return released

        return self._write(op)

    def release(self, name: str, token: Any, job_ids: list[int], now: float) -> int:
        self.project(name)
        wanted = set(job_ids)

        def op(tx: PgTx) -> int:
            worker = self._worker(tx, name, token, now)
            give = [job for job in self._leased_to(tx, name, worker["token"]) if job["id"] in wanted]
            released = self._release(tx, name, give)
            tx.put_worker(name, worker)
            return released

        return self._write(op)
