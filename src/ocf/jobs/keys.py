"""The job tracker's key layout in LMDB, its record codec and the request-argument checks.

Layout (sub-databases; ``P`` is the project name + NUL, ids are 8-byte big-endian)::

    jobs.projects  name                      -> project JSON
    jobs.jobs      P id                      -> job JSON
    jobs.queue     P stage seq               -> id          (pending jobs, FIFO per stage)
    jobs.leases    expires_ms P id           -> ""          (lease expiry index, all projects)
    jobs.workers   P token                   -> worker JSON
    jobs.names     P display_name            -> token
    jobs.counters  P name                    -> 8-byte count (ids, per-stage state counts)
    jobs.board     P "A" kind name NUL stage -> count        (all-time, kind u=user w=worker)
                   P "H" hour kind name NUL stage -> count  (hourly, for "last 24 h")
    jobs.series    P minute stage            -> completions (throughput plot)
    jobs.results   P seq                     -> result JSON (last stage's outputs)
    jobs.failures  P seq                     -> failure JSON (recent errors, trimmed)
    jobs.idem      P key                     -> answer JSON (idempotent job creation)

Big-endian integers make LMDB's byte order the numeric order, so a cursor
walks the queue oldest first and the lease index soonest-due first.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ..errors import InvalidJobRequest, StoreCorrupt

U64 = struct.Struct(">Q")
U32 = struct.Struct(">I")
DBS = (
    "projects",
    "jobs",
    "queue",
    "leases",
    "workers",
    "names",
    "counters",
    "board",
    "series",
    "results",
    "failures",
    "idem",
)

#: A job or worker record as stored: the JSON object, decoded.
Record = dict[str, Any]


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def loads(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise StoreCorrupt(f"job tracker {what} is not JSON; start with --cleanslate") from None


def payload_size(value: Any) -> int:
    return len(dumps(value))


def pkey(name: str) -> bytes:
    return name.encode() + b"\x00"


def lease_key(expires: float, project_key: bytes, job_id: int) -> bytes:
    return U64.pack(int(expires * 1000)) + project_key + U64.pack(job_id)


def check_limit(limit: Any) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidJobRequest(f"max must be an integer in 1..1000, got {limit!r}", code="bad_limit")


def parse_job_id(value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidJobRequest(f"job id must be a positive integer, got {value!r}", code="bad_job_id")
    return value
