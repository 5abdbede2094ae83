"""Moving a project between stores (LMDB <-> PostgreSQL) as a stream of JSON lines.

``ocf jobs export`` writes one project as records, one a line; ``ocf jobs
import`` reads them into another store. Both stream: the exporter walks the
store's rows in key order (LMDB in one read snapshot, PostgreSQL through a
server-side cursor) and the importer writes them in chunks of
:data:`CHUNK` records per transaction, so a project of millions of jobs
moves in constant memory. The order is: the project, its counters, jobs,
workers (after the jobs, so an LMDB importer can rebuild each worker's list
of leases from the jobs it saw), leaderboard, throughput, results, failures,
idempotency records. Store-internal bookkeeping (queue numbers, id counters)
is not exported; the importer rebuilds it, keeping jobs in their queue order.
"""

from __future__ import annotations

import json
from typing import Any
from collections.abc import Iterable, Iterator

from ..errors import InvalidJobRequest, ProjectExists
from .keys import U32, U64, dumps, lease_key, loads
from .model import Project
from .store import JobStore

CHUNK = 5000
FORMAT = "ocf-jobs-export/1"
#: Counters that mean something outside a store (per-stage state counts, results); the rest is rebuilt.
COUNTER_PREFIXES = ("s",)
MAX_LINE = 64 << 20  # a record line longer than this is refused before it is parsed


def export_lmdb(store: JobStore, name: str) -> Iterator[dict[str, Any]]:
    """The records of project ``name`` in an LMDB store, read from one snapshot."""
    project = store.project(name)
    with store._read(project) as tx:
        yield {"type": "project", "format": FORMAT, "definition": project.to_json()}
        counters = {}
        for key, raw in tx.scan("counters", tx.p):
            counter = bytes(key[len(tx.p) :]).decode()
            if counter == "results" or (counter.startswith("s") and "." in counter):
                counters[counter] = U64.unpack(raw)[0]
        yield {"type": "counters", "values": counters}
        for _, raw in tx.scan("jobs", tx.p):
            job = loads(raw, "job")
            job.pop("qseq", None)
            yield {"type": "job", "job": job}
        for _, raw in tx.scan("workers", tx.p):
            worker = loads(raw, "worker")
            worker.pop("leases", None)
            yield {"type": "worker", "worker": worker}
        for key, raw in tx.scan("board", tx.p):
            rest = bytes(key[len(tx.p) :])
            if rest[:1] == b"A":
                hour, rest = -1, rest[1:]
            else:
                hour, rest = U32.unpack(rest[1:5])[0], rest[5:]
            yield {
                "type": "board",
                "hour": hour,
                "kind": rest[:1].decode(),
                "who": rest[1:-2].decode(),
                "stage": rest[-1],
                "n": U64.unpack(raw)[0],
            }
        for key, raw in tx.scan("series", tx.p):
            rest = bytes(key[len(tx.p) :])
            yield {"type": "series", "minute": U32.unpack(rest[:4])[0], "stage": rest[4], "n": U64.unpack(raw)[0]}
        for key, raw in tx.scan("results", tx.p):
            yield {"type": "result", "seq": U64.unpack(bytes(key[-8:]))[0], "result": loads(raw, "result")}
        for _, raw in tx.scan("failures", tx.p):
            yield {"type": "failure", "failure": loads(raw, "failure")}
        for key, raw in tx.scan("idem", tx.p):
            yield {"type": "idem", "key": bytes(key[len(tx.p) :]).decode(), "record": loads(raw, "idempotency record")}


def import_lmdb(store: JobStore, records: Iterable[dict[str, Any]], now: float) -> dict[str, int]:
    """Write exported records into an LMDB store, :data:`CHUNK` records per transaction."""
    it = iter(records)
    project = _project_from(next(it, None))
    if project.name in {p.name for p in store.projects()}:
        raise ProjectExists(f"project {project.name!r} already exists in the target store; nothing was imported")
    store.create_project(project.name, definition(project), project.created or now)
    counts: dict[str, int] = {}
    held: dict[str, list[int]] = {}
    max_id = 0
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        nonlocal max_id
        with store._write(project) as tx:
            for record in chunk:
                kind = record["type"]
                counts[kind] = counts.get(kind, 0) + 1
                if kind == "counters":
                    for counter, value in record["values"].items():
                        tx.bump(counter, int(value) - tx.count(counter))
                elif kind == "job":
                    job = dict(record["job"])
                    max_id = max(max_id, job["id"])
                    if job["state"] == "pending":
                        seq = tx.bump("seq")
                        job["qseq"] = seq
                        tx.put("queue", tx.p + bytes([job["stage"]]) + U64.pack(seq), U64.pack(job["id"]))
                    elif job["state"] == "leased":
                        tx.put("leases", lease_key(job["lease_expires"], tx.p, job["id"]), b"")
                        held.setdefault(job["worker"], []).append(job["id"])
                    tx.put_job(job)
                elif kind == "worker":
                    worker = dict(record["worker"], leases=held.get(record["worker"]["token"], []))
                    tx.put_worker(worker)
                    tx.put("names", tx.p + worker["name"].encode(), worker["token"].encode())
                elif kind == "board":
                    tail = record["kind"].encode() + record["who"].encode() + b"\x00" + bytes([record["stage"]])
                    head = b"A" if record["hour"] < 0 else b"H" + U32.pack(record["hour"])
                    tx.put("board", tx.p + head + tail, U64.pack(record["n"]))
                elif kind == "series":
                    tx.put(
                        "series", tx.p + U32.pack(record["minute"]) + bytes([record["stage"]]), U64.pack(record["n"])
                    )
                elif kind == "result":
                    tx.put("results", tx.p + U64.pack(record["seq"]), dumps(record["result"]))
                elif kind == "failure":
                    tx.put("failures", tx.p + U64.pack(tx.bump("failure_seq")), dumps(record["failure"]))
                elif kind == "idem":
                    tx.put("idem", tx.p + record["key"].encode(), dumps(record["record"]))
            tx.bump("next_id", max(0, max_id - tx.count("next_id")))
        chunk.clear()

    for record in it:
        chunk.append(_checked(record))
        if len(chunk) >= CHUNK:
            flush()
    flush()
    return counts


def definition(project: Project) -> dict[str, Any]:
    """A project's definition as ``create_project`` takes it (what a client sent, not the stored extras)."""
    data = project.to_json()
    return {key: data[key] for key in ("stages", "max_attempts", "flag_threshold")}


def _project_from(record: dict[str, Any] | None) -> Project:
    if not isinstance(record, dict) or record.get("type") != "project" or record.get("format") != FORMAT:
        raise InvalidJobRequest(f"not an ocf jobs export (the first line must be the {FORMAT} project record)")
    return Project.from_json(record["definition"])


KINDS = {"counters", "job", "worker", "board", "series", "result", "failure", "idem"}


def _checked(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict) or record.get("type") not in KINDS:
        raise InvalidJobRequest(f"unexpected record in an ocf jobs export: {str(record)[:200]}")
    return record


def read_lines(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Records from JSON lines, each line's size bounded before it is parsed."""
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE:
            raise InvalidJobRequest(f"line {number} of the export is longer than {MAX_LINE} bytes")
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                raise InvalidJobRequest(f"line {number} of the export is not JSON") from None


def write_lines(records: Iterable[dict[str, Any]], out: Any) -> int:
    n = 0
    for record in records:
        out.write(dumps(record) + b"\n")
        n += 1
    return n
