"""One operation's view of the PostgreSQL store: its rows, its writes, and its share of the batch's deltas.

An operation (a claim, a completion...) reads rows it will change with
``FOR UPDATE`` (so another node's batch cannot change them under it), edits
them as the same dicts the LMDB store uses, and writes them back in a few
statements at its end (:meth:`PgTx.flush`): one ``INSERT`` for new jobs, one
``UPDATE`` for changed ones, each with its rows as one JSON parameter. Counter, leaderboard and
throughput changes are only *deltas* here; the batch applies them once, sorted,
just before its commit (:class:`BatchState`), so hot rows are locked briefly
and always in the same order on every node. Last-stage results are numbered
there too, under the project's ``results`` counter lock, so a result's
``seq`` follows commit order and paging by ``after=seq`` never skips one that
committed late.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from psycopg.types.json import Json

from .pipe import Pipe, Result
from .schema import ALL_TIME, PREFIX

Record = dict[str, Any]
JOB_COLS = "id, stage, state, qseq, worker, lease_expires, attempts, parent, root, input, extra"
COLUMN_KEYS = frozenset(
    ("id", "stage", "state", "qseq", "worker", "lease_expires", "attempts", "parent", "root", "input")
)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def jsonb(value: Any) -> Json:
    return Json(value, dumps=dumps)


def row_to_job(row: tuple[Any, ...]) -> Record:
    job_id, stage, state, qseq, worker, expires, attempts, parent, root, value, extra = row
    job: Record = dict(extra)
    job.update(id=job_id, stage=stage, state=state, attempts=attempts, parent=parent, root=root, input=value)
    if qseq is not None:
        job["qseq"] = qseq
    if worker is not None:
        job["worker"] = worker
    if expires is not None:
        job["lease_expires"] = expires
    return job


K = TypeVar("K")


def _add(into: dict[K, int], deltas: dict[K, int]) -> None:
    for key, delta in deltas.items():
        into[key] = into.get(key, 0) + delta


class BatchState:
    """What a group commit accumulates from its operations, applied once before the commit."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str], int] = {}
        self.board: dict[tuple[str, int, str, str, int], int] = {}
        self.series: dict[tuple[str, int, int], int] = {}
        self.firsts: dict[tuple[str, int], int] = {}
        self.results: list[tuple[str, Record]] = []
        self.enqueued: set[tuple[str, int]] = set()
        self.wrote = False

    def merge(self, other: BatchState) -> None:
        _add(self.counters, other.counters)
        _add(self.board, other.board)
        _add(self.series, other.series)
        for key, ms in other.firsts.items():
            self.firsts.setdefault(key, ms)
        self.results.extend(other.results)
        self.enqueued |= other.enqueued
        self.wrote = self.wrote or other.wrote

    def apply(self, tx: PgTx) -> None:
        """Write the deltas in key order (no two batches deadlock on them) and number the results.

        Nothing here is read back: these statements travel with the batch's
        ``COMMIT``, in its one round trip. Each set of rows is one JSON
        parameter (``json_to_recordset``), which costs less to send and to
        parse than a parameter per column.
        """
        if self.counters:
            counters = dumps([{"p": p, "n": n, "v": self.counters[(p, n)]} for p, n in sorted(self.counters)])
            upsert = f"""INSERT INTO {PREFIX}counters AS c (project, name, value)
                SELECT p, n, v FROM json_to_recordset(%s::json) AS t(p text, n text, v bigint) ORDER BY p, n
                ON CONFLICT (project, name) DO UPDATE SET value = GREATEST(0, c.value + excluded.value)"""
            if self.results:
                # The project's results counter, raised in the same statement under its row lock, numbers
                # them: a result's seq follows commit order, so paging by after=seq never skips a late one.
                tx.execute(
                    f"""WITH t AS ({upsert} RETURNING project, name, value)
                        INSERT INTO {PREFIX}results (project, seq, rec)
                        SELECT r.p, t.value - r.m + r.i, r.rec
                        FROM json_to_recordset(%s::json) AS r(p text, i bigint, m bigint, rec json)
                        JOIN t ON t.project = r.p AND t.name = 'results'""",
                    (counters, self._numbered_results()),
                )
            else:
                tx.execute(upsert, (counters,))
        if self.firsts:
            tx.execute(
                f"""INSERT INTO {PREFIX}counters (project, name, value)
                    SELECT p, 's' || s || '.first_ms', v
                    FROM json_to_recordset(%s::json) AS t(p text, s int, v bigint) ORDER BY 1, 2
                    ON CONFLICT (project, name) DO NOTHING""",
                (dumps([{"p": p, "s": s, "v": self.firsts[(p, s)]} for p, s in sorted(self.firsts)]),),
            )
        if self.board:
            board = self.board
            tx.execute(
                f"""INSERT INTO {PREFIX}board AS b (project, hour, kind, who, stage, n)
                    SELECT * FROM json_to_recordset(%s::json)
                        AS t(p text, h int, k text, w text, s smallint, n bigint)
                    ORDER BY 1, 2, 3, 4, 5
                    ON CONFLICT (project, hour, kind, who, stage) DO UPDATE SET n = b.n + excluded.n""",
                (
                    dumps(
                        [
                            {"p": p, "h": h, "k": k, "w": w, "s": s, "n": board[p, h, k, w, s]}
                            for p, h, k, w, s in sorted(board)
                        ]
                    ),
                ),
            )
        if self.series:
            series = self.series
            tx.execute(
                f"""INSERT INTO {PREFIX}series AS s (project, minute, stage, n)
                    SELECT * FROM json_to_recordset(%s::json) AS t(p text, m int, s smallint, n bigint)
                    ORDER BY 1, 2, 3
                    ON CONFLICT (project, minute, stage) DO UPDATE SET n = s.n + excluded.n""",
                (dumps([{"p": p, "m": m, "s": s, "n": series[p, m, s]} for p, m, s in sorted(series)]),),
            )

    def _numbered_results(self) -> str:
        """The results as rows of (project, 1-based place among the project's, how many it has, record)."""
        per_project: dict[str, list[Record]] = {}
        for project, result in self.results:
            per_project.setdefault(project, []).append(result)
        return dumps(
            [
                {"p": project, "i": i, "m": len(results), "rec": result}
                for project, results in per_project.items()
                for i, result in enumerate(results, 1)
            ]
        )


class PgTx:
    """The rows one operation read and will write back, and its deltas (merged into the batch on success)."""

    def __init__(self, pipe: Pipe, *, write: bool) -> None:
        self.pipe = pipe
        self.write = write
        self.lock = " FOR UPDATE" if write else ""
        self.deltas = BatchState()
        #: Job ids taken from a project's sequence in advance, for the children a batch of completions makes.
        self.spare_ids: dict[str, list[int]] = {}
        self._jobs: dict[tuple[str, int], Record | None] = {}
        self._dirty_jobs: dict[tuple[str, int], Record] = {}
        self._new_jobs: list[tuple[str, Record]] = []
        #: Ids queued for (``SELECT nextval``) but not read yet, per project.
        self.pending_ids: dict[str, Result] = {}
        self._prefetched: list[tuple[str, Result]] = []  # queued job reads whose rows are not read yet
        self._pending_workers: dict[tuple[str, str], Result] = {}
        self._workers: dict[tuple[str, str], Record | None] = {}
        self._dirty_workers: dict[tuple[str, str], Record] = {}
        self._new_workers: list[tuple[str, Record]] = []

    def execute(self, sql: str, params: Any = None) -> Result:
        """Queue a statement on the pipe (:class:`~ocf.jobs.pg.pipe.Pipe`); its rows come when first read."""
        return self.pipe.execute(sql, params)

    def sync(self) -> None:
        self.pipe.sync()

    # --- jobs ------------------------------------------------------------------------------

    def job(self, project: str, job_id: int) -> Record | None:
        key = (project, job_id)
        if self._prefetched:
            self._take_prefetched()
        if key not in self._jobs:
            row = self.execute(
                f"SELECT {JOB_COLS} FROM {PREFIX}jobs WHERE project = %s AND id = %s{self.lock}", (project, job_id)
            ).fetchone()
            self._jobs[key] = row_to_job(row) if row is not None else None
        return self._jobs[key]

    def prefetch(self, project: str, job_ids: list[int]) -> None:
        """Queue the read (and lock, in id order) of many jobs in one statement; :meth:`job` then has them."""
        missing = sorted({j for j in job_ids if (project, j) not in self._jobs})
        if not missing:
            return
        rows = self.execute(
            f"SELECT {JOB_COLS} FROM {PREFIX}jobs WHERE project = %s AND id = ANY(%s) ORDER BY id{self.lock}",
            (project, missing),
        )
        for job_id in missing:
            self._jobs[(project, job_id)] = None
        self._prefetched.append((project, rows))

    def _take_prefetched(self) -> None:
        prefetched, self._prefetched = self._prefetched, []
        for project, rows in prefetched:
            for row in rows.fetchall():
                if self._jobs.get((project, row[0])) is None:  # not replaced by this operation's own copy
                    self._jobs[(project, row[0])] = row_to_job(row)

    def cache_job(self, project: str, job: Record) -> None:
        self._jobs[(project, job["id"])] = job

    def put_job(self, project: str, job: Record) -> None:
        key = (project, job["id"])
        self._dirty_jobs[key] = job
        self._jobs[key] = job

    def new_job(self, project: str, job: Record) -> None:
        self._new_jobs.append((project, job))
        self._jobs[(project, job["id"])] = job

    # --- workers ---------------------------------------------------------------------------

    def want_worker(self, project: str, token: str) -> None:
        """Queue the read (and lock) of a worker's row; :meth:`worker` then reads its answer."""
        key = (project, token)
        if key not in self._workers and key not in self._pending_workers:
            self._pending_workers[key] = self.execute(
                f"SELECT rec FROM {PREFIX}workers WHERE project = %s AND token = %s{self.lock}", (project, token)
            )

    def worker(self, project: str, token: str) -> Record | None:
        key = (project, token)
        if key not in self._workers:
            self.want_worker(project, token)
            row = self._pending_workers.pop(key).fetchone()
            self._workers[key] = row[0] if row is not None else None
        return self._workers[key]

    def put_worker(self, project: str, worker: Record) -> None:
        key = (project, worker["token"])
        self._workers[key] = worker
        self._dirty_workers[key] = worker

    def new_worker(self, project: str, worker: Record) -> None:
        self._workers[(project, worker["token"])] = worker
        self._new_workers.append((project, worker))

    # --- deltas ----------------------------------------------------------------------------

    def bump(self, project: str, name: str, delta: int = 1) -> None:
        key = (project, name)
        self.deltas.counters[key] = self.deltas.counters.get(key, 0) + delta
        self.deltas.wrote = True

    def credit(self, project: str, user: str, worker: str, stage: int, now: float) -> None:
        hour = int(now // 3600)
        board = self.deltas.board
        for kind, who in (("u", user), ("w", worker)):
            for h in (ALL_TIME, hour):
                key = (project, h, kind, who, stage)
                board[key] = board.get(key, 0) + 1
        skey = (project, int(now // 60), stage)
        self.deltas.series[skey] = self.deltas.series.get(skey, 0) + 1

    # --- writing back ----------------------------------------------------------------------

    def flush(self) -> None:
        """Write new and changed rows, one statement each kind; a pending job without ``qseq`` joins its queue's tail.

        Statements whose results nobody reads: in the batch's pipeline they travel
        with the next statement that is read, not in round trips of their own.
        """
        new_keys = {(p, job["id"]) for p, job in self._new_jobs}
        if self._new_jobs:
            self.deltas.wrote = True
            rows = self._new_jobs
            self.execute(
                f"""INSERT INTO {PREFIX}jobs (project, id, stage, state, qseq, attempts, parent, root, input, extra)
                    SELECT p, i, s, st, CASE WHEN st = 'pending' THEN nextval('{PREFIX}qseq') END, 0, par, r,
                        COALESCE(inp, 'null'), ex
                    FROM json_to_recordset(%s::json)
                        AS t(n int, p text, i bigint, s smallint, st text, par bigint, r bigint, inp json, ex json)
                    ORDER BY n""",
                (
                    dumps(
                        [
                            {
                                "n": n,
                                "p": p,
                                "i": j["id"],
                                "s": j["stage"],
                                "st": j["state"],
                                "par": j["parent"],
                                "r": j["root"],
                                "inp": j["input"],
                                "ex": {k: v for k, v in j.items() if k not in COLUMN_KEYS},
                            }
                            for n, (p, j) in enumerate(rows)
                        ]
                    ),
                ),
            )
            self._new_jobs = []
        dirty = [(p, j) for (p, jid), j in self._dirty_jobs.items() if (p, jid) not in new_keys]
        if dirty:
            self.deltas.wrote = True
            # A job's input never changes once made: its column is not rewritten (nor sent again).
            self.execute(
                f"""UPDATE {PREFIX}jobs j SET state = u.st,
                        qseq = CASE WHEN u.st = 'pending' THEN COALESCE(u.q, nextval('{PREFIX}qseq')) END,
                        worker = u.w, lease_expires = u.e, attempts = u.a, extra = u.ex
                    FROM json_to_recordset(%s::json)
                        AS u(p text, i bigint, st text, q bigint, w text, e float8, a int, ex json)
                    WHERE j.project = u.p AND j.id = u.i""",
                (
                    dumps(
                        [
                            {
                                "p": p,
                                "i": j["id"],
                                "st": j["state"],
                                "q": j.get("qseq"),
                                "w": j.get("worker"),
                                "e": j.get("lease_expires"),
                                "a": j["attempts"],
                                "ex": {k: v for k, v in j.items() if k not in COLUMN_KEYS},
                            }
                            for p, j in dirty
                        ]
                    ),
                ),
            )
            # A requeued job's new qseq is the database's; forget our copy rather than guess it.
            for project, job in dirty:
                if job["state"] == "pending" and job.get("qseq") is None:
                    self._jobs.pop((project, job["id"]), None)
        self._dirty_jobs = {}
        new_workers = {(p, w["token"]) for p, w in self._new_workers}
        for project, worker in self._new_workers:
            self.deltas.wrote = True
            self.execute(
                f"INSERT INTO {PREFIX}workers (project, token, name, rec) VALUES (%s, %s, %s, %s)",
                (project, worker["token"], worker["name"], jsonb(worker)),
            )
        self._new_workers = []
        dirty_workers = [(key[0], w) for key, w in self._dirty_workers.items() if key not in new_workers]
        if dirty_workers:
            self.deltas.wrote = True
            self.execute(
                f"""UPDATE {PREFIX}workers w SET rec = u.rec
                    FROM json_to_recordset(%s::json) AS u(p text, t text, rec json)
                    WHERE w.project = u.p AND w.token = u.t""",
                (dumps([{"p": p, "t": w["token"], "rec": w} for p, w in dirty_workers]),),
            )
        self._dirty_workers = {}
