"""Read-only reports from PostgreSQL: counts, dashboard statistics, leaderboard, results, failures.

Each report reads in one ``REPEATABLE READ`` snapshot, so its numbers add up
as the LMDB store's do, and computes its answer with the same functions
(:func:`ocf.jobs.reports.build_stats`, :func:`ocf.jobs.reports.board_page`).
"""

from __future__ import annotations

from typing import Any

from ...errors import WorkerNotFound
from ..core import ACTIVE_WINDOW
from ..model import STAGE_LETTERS
from ..reports import BoardTables, board_page, build_stats
from .ops import PgOps
from .schema import ALL_TIME, PREFIX
from .tx import PgTx

STATES = ("pending", "leased", "done", "failed", "superseded")


class PgReports(PgOps):
    """What the dashboard, the leaderboard, /metrics and the result export read."""

    def _counters(self, tx: PgTx, name: str) -> dict[str, int]:
        rows = tx.execute(f"SELECT name, value FROM {PREFIX}counters WHERE project = %s", (name,)).fetchall()
        return {n: max(0, v) for n, v in rows}

    def counts(self, name: str) -> list[dict[str, int]]:
        project = self.project(name)
        values = self._read(lambda tx: self._counters(tx, name))
        return [{state: values.get(f"s{i}.{state}", 0) for state in STATES} for i in range(len(project.stages))]

    def result_count(self, name: str) -> int:
        self.project(name)
        return self._read(lambda tx: self._counters(tx, name)).get("results", 0)

    def pending_count(self, name: str, stage: Any) -> int:
        index = self.project(name).stage_index(stage)
        return self._read(lambda tx: self._counters(tx, name)).get(f"s{index}.pending", 0)

    def stats(self, name: str, now: float) -> dict[str, Any]:
        project = self.project(name)
        n = len(project.stages)
        minute_now = int(now // 60)

        def op(tx: PgTx) -> dict[str, Any]:
            values = self._counters(tx, name)
            series: dict[int, list[int]] = {}
            for minute, stage, count in tx.execute(
                f"SELECT minute, stage, n FROM {PREFIX}series WHERE project = %s AND minute >= %s",
                (name, max(0, minute_now - 59)),
            ):
                series.setdefault(minute, [0] * n)[stage] += count
            workers_active = [0] * n
            workers_total = 0
            for stage, last_seen in tx.execute(
                f"SELECT (rec->>'stage')::int, (rec->>'last_seen')::float8 FROM {PREFIX}workers WHERE project = %s",
                (name,),
            ):
                workers_total += 1
                if last_seen + ACTIVE_WINDOW >= now:
                    workers_active[stage] += 1
            failures = [
                r[0]
                for r in tx.execute(
                    f"SELECT rec FROM {PREFIX}failures WHERE project = %s ORDER BY seq DESC LIMIT 10", (name,)
                )
            ]
            counts = [{state: values.get(f"s{i}.{state}", 0) for state in STATES} for i in range(n)]
            first_done = [values.get(f"s{i}.first_ms", 0) / 1000.0 for i in range(n)]
            return build_stats(
                project,
                counts,
                series,
                workers_active,
                workers_total,
                failures,
                values.get("results", 0),
                first_done,
                now,
            )

        return self._read(op, snapshot=True)

    def leaderboard(self, name: str, now: float, *, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        project = self.project(name)
        stage_names = [s.name for s in project.stages]
        tables: BoardTables = {"users": {}, "workers": {}}
        rows = self._read(
            lambda tx: tx.execute(
                f"""SELECT hour, kind, who, stage, n FROM {PREFIX}board
                    WHERE project = %s AND (hour = %s OR hour >= %s)""",
                (name, ALL_TIME, max(0, int(now // 3600) - 23)),
            ).fetchall()
        )
        for hour, kind, who, stage, count in rows:
            row = tables["users" if kind == "u" else "workers"].setdefault(who, {"all_time": {}, "last_24h": {}})
            bucket = row["all_time" if hour == ALL_TIME else "last_24h"]
            bucket[stage_names[stage]] = bucket.get(stage_names[stage], 0) + count
        return board_page(project, tables, offset=offset, limit=limit)

    def results(
        self, name: str, *, after: int = 0, limit: int = 1000, with_input: bool = False
    ) -> list[dict[str, Any]]:
        self.project(name)

        def op(tx: PgTx) -> list[dict[str, Any]]:
            rows = tx.execute(
                f"SELECT seq, rec FROM {PREFIX}results WHERE project = %s AND seq > %s ORDER BY seq LIMIT %s",
                (name, after, limit),
            ).fetchall()
            out = [dict(rec, seq=seq) for seq, rec in rows]
            if with_input and out:
                ids = {r["job"] for r in out} | {r["root"] for r in out}
                inputs = dict(
                    tx.execute(
                        f"SELECT id, input FROM {PREFIX}jobs WHERE project = %s AND id = ANY(%s)", (name, sorted(ids))
                    ).fetchall()
                )
                for result in out:
                    result["input"] = inputs.get(result["job"])
                    if result["root"] != result["job"]:
                        result["root_input"] = inputs.get(result["root"])
            return out

        return self._read(op, snapshot=with_input)

    def failures(self, name: str, *, limit: int = 100) -> list[dict[str, Any]]:
        self.project(name)
        rows = self._read(
            lambda tx: tx.execute(
                f"SELECT rec FROM {PREFIX}failures WHERE project = %s ORDER BY seq DESC LIMIT %s", (name, limit)
            ).fetchall()
        )
        return [r[0] for r in rows]

    def worker_records(self, name: str) -> list[dict[str, Any]]:
        self.project(name)

        def op(tx: PgTx) -> list[dict[str, Any]]:
            held: dict[str, list[int]] = {}
            for token, job_id in tx.execute(
                f"SELECT worker, id FROM {PREFIX}jobs WHERE project = %s AND state = 'leased' ORDER BY id", (name,)
            ):
                held.setdefault(token, []).append(job_id)
            rows = tx.execute(f"SELECT token, rec FROM {PREFIX}workers WHERE project = %s", (name,)).fetchall()
            return [dict(rec, leases=held.get(token, [])) for token, rec in rows]

        return self._read(op, snapshot=True)

    def worker_by_name(self, name: str, display: str, now: float) -> dict[str, Any]:
        project = self.project(name)

        def op(tx: PgTx) -> dict[str, Any]:
            row = tx.execute(
                f"SELECT token, rec FROM {PREFIX}workers WHERE project = %s AND name = %s", (name, display)
            ).fetchone()
            if row is None:
                raise WorkerNotFound(f"no worker named {display!r} in project {name!r}")
            token, worker = row
            leases = [
                r[0]
                for r in tx.execute(
                    f"SELECT id FROM {PREFIX}jobs WHERE project = %s AND worker = %s AND state = 'leased' ORDER BY id",
                    (name, token),
                )
            ]
            board = dict(
                tx.execute(
                    f"SELECT stage, n FROM {PREFIX}board WHERE project = %s AND hour = %s AND kind = 'w' AND who = %s",
                    (name, ALL_TIME, display),
                ).fetchall()
            )
            hours = max((worker["last_seen"] - worker["created"]) / 3600.0, 1 / 60)
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
                "current_jobs": leases,
                "completed_by_stage": {s.name: board.get(i, 0) for i, s in enumerate(project.stages)},
            }

        return self._read(op, snapshot=True)
