"""Read-only reports on a project: counts, the dashboard's statistics, the leaderboard, results, failures.

Each report reads one snapshot (a read transaction), so it never waits for
the writer and always adds up: counts and series are from the same moment.
"""

from __future__ import annotations

from typing import Any

from ..errors import WorkerNotFound
from .core import ACTIVE_WINDOW, StoreCore
from .keys import U32, U64, loads
from .model import STAGE_LETTERS
from .txn import Tx


class Reports(StoreCore):
    """What the dashboard, the leaderboard, /metrics and the result export read."""

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
            start = tx.p + U32.pack(max(0, minute_now - 59))
            for key, raw in tx.scan("series", tx.p, start):
                minute = U32.unpack(key[len(tx.p) : len(tx.p) + 4])[0]
                series.setdefault(minute, [0] * len(project.stages))[key[-1]] += U64.unpack(raw)[0]
            workers_active = [0] * len(project.stages)
            workers_total = 0
            for _, raw in tx.scan("workers", tx.p):
                worker = loads(raw, "worker")
                workers_total += 1
                if worker["last_seen"] + ACTIVE_WINDOW >= now:
                    workers_active[worker["stage"]] += 1
            failures = [loads(raw, "failure") for _, raw in tx.scan_reverse("failures", tx.p, 10)]
            results = tx.count("results")
            first_done = [tx.count(f"s{i}.first_ms") / 1000.0 for i in range(len(project.stages))]
        stages: list[dict[str, Any]] = []
        expected_prev = None
        eta: float | None = 0.0
        for i, (stage, c) in enumerate(zip(project.stages, counts, strict=True)):
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
                {"minute": m * 60, "completed": series.get(m, [0] * len(project.stages))}
                for m in range(minute_now - 59, minute_now + 1)
            ],
            "recent_failures": failures,
        }

    def _board_count(self, tx: Tx, kind: bytes, who: str, stage: int) -> int:
        raw = tx.get("board", tx.p + b"A" + kind + who.encode() + b"\x00" + bytes([stage]))
        return U64.unpack(raw)[0] if raw else 0

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
                add("all_time", rest[:1], who, stage, U64.unpack(raw)[0])
            first_hour = U32.pack(max(0, int(now // 3600) - 23))
            for key, raw in tx.scan("board", tx.p + b"H", tx.p + b"H" + first_hour):
                rest = key[len(tx.p) + 5 :]
                who, stage = rest[1:-2].decode(), rest[-1]
                add("last_24h", rest[:1], who, stage, U64.unpack(raw)[0])
        out: dict[str, Any] = {
            "project": project.name,
            "stages": stage_names,
            "offset": offset,
            "limit": limit,
            "total": {},
        }
        for kind, table in tables.items():
            rows: list[dict[str, Any]] = [
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

    def results(
        self, name: str, *, after: int = 0, limit: int = 1000, with_input: bool = False
    ) -> list[dict[str, Any]]:
        """Last-stage outputs in completion order; page with ``after`` = the last ``seq`` seen.

        ``with_input`` adds the input of the job that produced each result and,
        for a multi-stage project, ``root_input``: what was created at stage 1.
        """
        project = self.project(name)
        with self._read(project) as tx:
            out = []
            for key, raw in tx.scan("results", tx.p, tx.p + U64.pack(after + 1)):
                result = dict(loads(raw, "result"), seq=U64.unpack(key[-8:])[0])
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
            return [loads(raw, "failure") for _, raw in tx.scan_reverse("failures", tx.p, limit)]

    def worker_by_name(self, name: str, display: str, now: float) -> dict[str, Any]:
        project = self.project(name)
        with self._read(project) as tx:
            token = tx.get("names", tx.p + display.encode())
            worker = tx.worker(bytes(token).decode()) if token is not None else None
            if worker is None:
                raise WorkerNotFound(f"no worker named {display!r} in project {name!r}")
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
