"""What only the PostgreSQL store has to get right: several nodes' stores on one database at once."""

from __future__ import annotations

import pytest

from ocf.jobs.pg import PgJobStore

T0 = 1_800_000_000.0


@pytest.fixture
def two(pg_url: str):
    a, b = PgJobStore(pg_url), PgJobStore(pg_url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_two_reapers_expire_each_lease_exactly_once(two):
    a, b = two
    a.create_project("p", {"stages": [{"name": "crawl", "lease_timeout": 10}], "max_attempts": 5}, T0)
    a.add_jobs("p", range(20), T0)
    token = a.register_worker("p", nickname="w", stage="crawl", now=T0)["token"]
    assert len(a.claim("p", token, T0, limit=20)) == 20
    with a.batch():  # node A's reaper holds the leases it is expiring until its batch commits
        first = a.expire(T0 + 11, limit=10)
        second = b.expire(T0 + 11)  # node B's reaper skips those, takes the rest
    assert b.expire(T0 + 11) == [] and a.expire(T0 + 11) == []
    assert len(first) == 10 and len(second) == 10
    assert {j for _, j, _ in first}.isdisjoint({j for _, j, _ in second})
    assert b.counts("p")[0] == {"pending": 20, "leased": 0, "done": 0, "failed": 0, "superseded": 0}
    assert len(a.failures("p")) == 20  # one "lease expired" per job, none twice


def test_a_completion_and_another_nodes_reaper_racing_for_one_job(two):
    a, b = two
    a.create_project("p", {"stages": [{"name": "crawl", "lease_timeout": 10}]}, T0)
    a.add_jobs("p", ["x"], T0)
    token = a.register_worker("p", nickname="w", stage="crawl", now=T0)["token"]
    job = a.claim("p", token, T0)[0]
    with a.batch():  # the holder completes (late, but before any reaper took the lease) on node A
        assert a.complete("p", token, job["id"], "out", T0 + 11)["status"] == "done"
        assert b.expire(T0 + 11) == []  # node B's reaper skips the locked row
    assert b.expire(T0 + 11) == []  # and after A's commit the job is done, not due
    assert b.job("p", job["id"])["state"] == "done" and b.failures("p") == []


def test_claims_and_expiry_read_partial_indexes(two):
    a, _ = two
    a.create_project("p", {"stages": ["crawl"]}, T0)
    a.add_jobs("p", range(2000), T0)
    token = a.register_worker("p", nickname="w", stage="crawl", now=T0)["token"]
    a.claim("p", token, T0, limit=1000)
    with a.pool.connection() as conn:
        conn.execute("ANALYZE ocf_jobs_jobs")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                """EXPLAIN SELECT id, qseq FROM ocf_jobs_jobs WHERE project = 'p' AND stage = 0
                   AND state = 'pending' ORDER BY qseq LIMIT 10 FOR UPDATE SKIP LOCKED"""
            )
        )
        assert "ocf_jobs_queue" in plan and "Sort" not in plan
        plan = "\n".join(
            r[0] for r in conn.execute("EXPLAIN SELECT min(lease_expires) FROM ocf_jobs_jobs WHERE state = 'leased'")
        )
        assert "ocf_jobs_leases" in plan
