"""Export and import of one project in the PostgreSQL store (see :mod:`ocf.jobs.transfer` for the format).

Export reads through server-side cursors inside one ``REPEATABLE READ``
transaction (one consistent snapshot, rows fetched :data:`CHUNK` at a time);
import writes :data:`CHUNK` records per statement with ``unnest``, pending
jobs taking queue numbers in the order they arrive.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Iterable, Iterator

import psycopg

from ...errors import ProjectExists
from ..transfer import CHUNK, FORMAT, _checked, _project_from, definition
from . import PgJobStore
from .schema import PREFIX, id_sequence
from .tx import COLUMN_KEYS, JOB_COLS, dumps, row_to_job


def _stream(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...]) -> Iterator[tuple[Any, ...]]:
    with conn.cursor(name="ocf_export") as cur:
        cur.itersize = CHUNK
        cur.execute(sql, params)
        yield from cur


def export_pg(store: PgJobStore, name: str) -> Iterator[dict[str, Any]]:
    project = store.project(name)
    with store.pool.connection() as conn, conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield {"type": "project", "format": FORMAT, "definition": project.to_json()}
        rows = conn.execute(f"SELECT name, value FROM {PREFIX}counters WHERE project = %s", (name,)).fetchall()
        yield {"type": "counters", "values": {n: max(0, v) for n, v in rows}}
        for row in _stream(conn, f"SELECT {JOB_COLS} FROM {PREFIX}jobs WHERE project = %s ORDER BY id", (name,)):
            job = row_to_job(row)
            job.pop("qseq", None)
            yield {"type": "job", "job": job}
        for (rec,) in _stream(conn, f"SELECT rec FROM {PREFIX}workers WHERE project = %s ORDER BY token", (name,)):
            yield {"type": "worker", "worker": rec}
        sql = f"SELECT hour, kind, who, stage, n FROM {PREFIX}board WHERE project = %s ORDER BY hour, kind, who, stage"
        for hour, kind, who, stage, n in _stream(conn, sql, (name,)):
            yield {"type": "board", "hour": hour, "kind": kind, "who": who, "stage": stage, "n": n}
        sql = f"SELECT minute, stage, n FROM {PREFIX}series WHERE project = %s ORDER BY minute, stage"
        for minute, stage, n in _stream(conn, sql, (name,)):
            yield {"type": "series", "minute": minute, "stage": stage, "n": n}
        for seq, rec in _stream(conn, f"SELECT seq, rec FROM {PREFIX}results WHERE project = %s ORDER BY seq", (name,)):
            yield {"type": "result", "seq": seq, "result": rec}
        for (rec,) in _stream(conn, f"SELECT rec FROM {PREFIX}failures WHERE project = %s ORDER BY seq", (name,)):
            yield {"type": "failure", "failure": rec}
        for key, rec in _stream(conn, f"SELECT key, rec FROM {PREFIX}idem WHERE project = %s ORDER BY key", (name,)):
            yield {"type": "idem", "key": key, "record": rec}


def import_pg(store: PgJobStore, records: Iterable[dict[str, Any]], now: float) -> dict[str, int]:
    it = iter(records)
    project = _project_from(next(it, None))
    if project.name in {p.name for p in store.projects()}:
        raise ProjectExists(f"project {project.name!r} already exists in the target store; nothing was imported")
    store.create_project(project.name, definition(project), project.created or now)
    pid = store._project_entry(project.name)[1]
    name = project.name
    counts: dict[str, int] = {}
    max_id = 0
    chunk: list[dict[str, Any]] = []

    def flush(conn: psycopg.Connection[Any]) -> None:
        nonlocal max_id
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for record in chunk:
            by_kind.setdefault(record["type"], []).append(record)
            counts[record["type"]] = counts.get(record["type"], 0) + 1
        with conn.transaction():
            for record in by_kind.get("counters", []):
                values = record["values"]
                conn.execute(
                    f"""INSERT INTO {PREFIX}counters (project, name, value)
                        SELECT %s, n, v FROM unnest(%s::text[], %s::bigint[]) AS t(n, v)
                        ON CONFLICT (project, name) DO UPDATE SET value = excluded.value""",
                    (name, list(values), [int(v) for v in values.values()]),
                )
            jobs = [r["job"] for r in by_kind.get("job", [])]
            if jobs:
                max_id = max(max_id, *(j["id"] for j in jobs))
                conn.execute(
                    f"""INSERT INTO {PREFIX}jobs (project, id, stage, state, qseq, worker, lease_expires, attempts,
                            parent, root, input, extra)
                        SELECT %s, i, s, st, CASE WHEN st = 'pending' THEN nextval('{PREFIX}qseq') END, w, e, a,
                            par, r, inp::json, ex::json
                        FROM unnest(%s::bigint[], %s::smallint[], %s::text[], %s::text[], %s::float8[], %s::int[],
                            %s::bigint[], %s::bigint[], %s::text[], %s::text[]) WITH ORDINALITY
                            AS t(i, s, st, w, e, a, par, r, inp, ex, n)
                        ORDER BY n""",
                    (
                        name,
                        [j["id"] for j in jobs],
                        [j["stage"] for j in jobs],
                        [j["state"] for j in jobs],
                        [j.get("worker") for j in jobs],
                        [j.get("lease_expires") for j in jobs],
                        [j["attempts"] for j in jobs],
                        [j["parent"] for j in jobs],
                        [j["root"] for j in jobs],
                        [dumps(j["input"]) for j in jobs],
                        [dumps({k: v for k, v in j.items() if k not in COLUMN_KEYS}) for j in jobs],
                    ),
                )
            workers = [dict(r["worker"]) for r in by_kind.get("worker", [])]
            for w in workers:
                w.pop("leases", None)
            if workers:
                conn.execute(
                    f"""INSERT INTO {PREFIX}workers (project, token, name, rec)
                        SELECT %s, t, n, r::json FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(t, n, r)""",
                    (name, [w["token"] for w in workers], [w["name"] for w in workers], [dumps(w) for w in workers]),
                )
            board = by_kind.get("board", [])
            if board:
                conn.execute(
                    f"""INSERT INTO {PREFIX}board (project, hour, kind, who, stage, n)
                        SELECT %s, h, k, w, s, n
                        FROM unnest(%s::int[], %s::text[], %s::text[], %s::smallint[], %s::bigint[])
                            AS t(h, k, w, s, n)""",
                    (name, *([r[f] for r in board] for f in ("hour", "kind", "who", "stage", "n"))),
                )
            series = by_kind.get("series", [])
            if series:
                conn.execute(
                    f"""INSERT INTO {PREFIX}series (project, minute, stage, n)
                        SELECT %s, m, s, n FROM unnest(%s::int[], %s::smallint[], %s::bigint[]) AS t(m, s, n)""",
                    (name, *([r[f] for r in series] for f in ("minute", "stage", "n"))),
                )
            results = by_kind.get("result", [])
            if results:
                conn.execute(
                    f"""INSERT INTO {PREFIX}results (project, seq, rec)
                        SELECT %s, s, r::json FROM unnest(%s::bigint[], %s::text[]) AS t(s, r)""",
                    (name, [r["seq"] for r in results], [dumps(r["result"]) for r in results]),
                )
            failures = by_kind.get("failure", [])
            if failures:
                conn.execute(
                    f"""INSERT INTO {PREFIX}failures (project, seq, rec)
                        SELECT %s, nextval('{PREFIX}failure_seq'), r::json
                        FROM unnest(%s::text[]) WITH ORDINALITY AS t(r, n) ORDER BY n""",
                    (name, [dumps(r["failure"]) for r in failures]),
                )
            idem = by_kind.get("idem", [])
            if idem:
                conn.execute(
                    f"""INSERT INTO {PREFIX}idem (project, key, rec)
                        SELECT %s, k, r::json FROM unnest(%s::text[], %s::text[]) AS t(k, r)""",
                    (name, [r["key"] for r in idem], [dumps(r["record"]) for r in idem]),
                )
            if max_id:
                conn.execute(f"SELECT setval('{id_sequence(pid)}', %s)", (max_id,))
        chunk.clear()

    with store.pool.connection() as conn:
        for record in it:
            chunk.append(_checked(record))
            if len(chunk) >= CHUNK:
                flush(conn)
        flush(conn)
    return counts
