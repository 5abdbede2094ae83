"""The tracker's tables in PostgreSQL, created on first start, and the connection settings.

Why this layout (the LMDB store keeps separate index sub-databases; here the
indexes are PostgreSQL's):

* **The queue is a partial index.** ``jobs_queue`` covers only pending jobs,
  ordered by ``qseq`` (a sequence number taken at each enqueue), so a claim
  is ``ORDER BY qseq LIMIT n FOR UPDATE SKIP LOCKED`` reading the head of the
  index: the same few pages whether 10 thousand or 10 million jobs wait. The
  original tracker's ``ORDER BY RANDOM()`` sorted every open job per claim.
* **Leases are a partial index too** (``jobs_leases``, leased jobs by expiry),
  so the reaper on every node reads only what is due; ``FOR UPDATE SKIP
  LOCKED`` there lets several nodes reap at once without expiring a job twice.
* **A worker's leases are not stored in the worker's row** but found by
  ``jobs_held``: the reaper never has to lock a worker row (which the
  worker's own requests lock), so the two never wait on each other in a cycle.
* **Counters are applied as deltas at commit** (sorted, one upsert per
  batch): every node's batches take the hot counter rows in one order and only
  at the end, so they cannot deadlock on them.
* **Job ids come from a sequence per project** (``nextval`` takes no row
  lock), so nodes creating jobs at once do not serialize on an id counter.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

SCHEMA_VERSION = 1
PREFIX = "ocf_jobs_"

DDL = f"""
CREATE TABLE IF NOT EXISTS {PREFIX}meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {PREFIX}projects (
    name text PRIMARY KEY,
    pid serial UNIQUE,
    definition json NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS {PREFIX}qseq;
CREATE SEQUENCE IF NOT EXISTS {PREFIX}result_seq;
CREATE SEQUENCE IF NOT EXISTS {PREFIX}failure_seq;
CREATE TABLE IF NOT EXISTS {PREFIX}jobs (
    project text NOT NULL,
    id bigint NOT NULL,
    stage smallint NOT NULL,
    state text NOT NULL,
    qseq bigint,
    worker text,
    lease_expires double precision,
    attempts integer NOT NULL DEFAULT 0,
    parent bigint,
    root bigint NOT NULL,
    input json,
    extra json NOT NULL,
    PRIMARY KEY (project, id)
);
CREATE INDEX IF NOT EXISTS {PREFIX}queue ON {PREFIX}jobs (project, stage, qseq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS {PREFIX}leases ON {PREFIX}jobs (lease_expires) WHERE state = 'leased';
CREATE INDEX IF NOT EXISTS {PREFIX}held ON {PREFIX}jobs (project, worker) WHERE state = 'leased';
CREATE TABLE IF NOT EXISTS {PREFIX}workers (
    project text NOT NULL,
    token text NOT NULL,
    name text NOT NULL,
    rec json NOT NULL,
    PRIMARY KEY (project, token),
    UNIQUE (project, name)
);
CREATE TABLE IF NOT EXISTS {PREFIX}counters (
    project text NOT NULL,
    name text NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (project, name)
);
CREATE TABLE IF NOT EXISTS {PREFIX}board (
    project text NOT NULL,
    hour integer NOT NULL,
    kind text NOT NULL,
    who text NOT NULL,
    stage smallint NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (project, hour, kind, who, stage)
);
CREATE TABLE IF NOT EXISTS {PREFIX}series (
    project text NOT NULL,
    minute integer NOT NULL,
    stage smallint NOT NULL,
    n bigint NOT NULL,
    PRIMARY KEY (project, minute, stage)
);
CREATE TABLE IF NOT EXISTS {PREFIX}results (
    project text NOT NULL,
    seq bigint NOT NULL,
    rec json NOT NULL,
    PRIMARY KEY (project, seq)
);
CREATE TABLE IF NOT EXISTS {PREFIX}failures (
    project text NOT NULL,
    seq bigint NOT NULL,
    rec json NOT NULL,
    PRIMARY KEY (project, seq)
);
CREATE TABLE IF NOT EXISTS {PREFIX}idem (
    project text NOT NULL,
    key text NOT NULL,
    rec json NOT NULL,
    PRIMARY KEY (project, key)
);
"""

#: All-time leaderboard rows use this hour.
ALL_TIME = -1
#: The channel every tracker node LISTENs on; payloads are small JSON (see :mod:`ocf.jobs.pg.notify`).
CHANNEL = "ocf_jobs"
#: Serializes schema creation between nodes starting at once (an arbitrary, fixed advisory lock key).
SCHEMA_LOCK = 0x6F63666A6F6273


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, for logs and error lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = re.sub(r":[^@]*@", ":***@", parts.netloc, count=1)
    return parts._replace(netloc=netloc).geturl()


def id_sequence(pid: int) -> str:
    return f"{PREFIX}ids_{pid}"
