"""The tracker's state machine, driven with an explicit clock (no sleeps, no HTTP)."""

from __future__ import annotations

import pytest

from ocf.jobs.edge import item_answers
from ocf.errors import (
    InvalidJobRequest,
    JobsPayloadTooLarge,
    LeaseNotHeld,
    ProjectExists,
    ProjectNotFound,
    WorkerNotFound,
)
from ocf.jobs.store import JobStore
from ocf.store import Store

T0 = 1_800_000_000.0


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "data") as raw:
        yield JobStore(raw, max_payload=4096, worker_timeout=3600)


def three_stage(store: JobStore, **extra) -> None:
    store.create_project(
        "crawl",
        {
            "stages": [
                {"name": "crawl", "lease_timeout": 60},
                {"name": "embed", "lease_timeout": 60},
                {"name": "filter", "lease_timeout": 60},
            ],
            **extra,
        },
        T0,
    )


def worker(store: JobStore, stage="crawl", nickname="alice", **kw):
    return store.register_worker("crawl", nickname=nickname, stage=stage, now=T0, **kw)["token"]


def test_outputs_flow_through_every_stage_to_results(store):
    three_stage(store)
    store.add_jobs("crawl", ["a", "b"], T0)
    tokens = [worker(store, s) for s in ("crawl", "embed", "filter")]
    for stage, token in enumerate(tokens):
        jobs = store.claim("crawl", token, T0, limit=10)
        assert len(jobs) == 2
        for job in jobs:
            assert (
                store.complete("crawl", token, job["id"], {"from": job["input"], "stage": stage}, T0)["status"]
                == "done"
            )
    results = store.results("crawl")
    assert [r["output"]["stage"] for r in results] == [2, 2]
    # stage 3's input was stage 2's output, whose input was stage 1's output: the chain is intact
    assert results[0]["output"]["from"] == {"from": {"from": "a", "stage": 0}, "stage": 1}
    counts = store.counts("crawl")
    assert [c["done"] for c in counts] == [2, 2, 2]
    assert all(c["pending"] == c["leased"] == 0 for c in counts)


def test_fanout_stage_makes_one_job_per_element(store):
    store.create_project("crawl", {"stages": [{"name": "list", "fanout": True}, "fetch"]}, T0)
    store.add_jobs("crawl", ["index"], T0)
    token = worker(store, "list")
    job = store.claim("crawl", token, T0)[0]
    done = store.complete("crawl", token, job["id"], ["u1", "u2", "u3"], T0)
    assert len(done["children"]) == 3
    assert store.pending_count("crawl", "fetch") == 3


def test_claims_never_share_a_job(store):
    three_stage(store)
    store.add_jobs("crawl", range(500), T0)
    tokens = [worker(store) for _ in range(200)]
    seen = set()
    for token in tokens:
        for job in store.claim("crawl", token, T0, limit=3):
            assert job["id"] not in seen
            seen.add(job["id"])
    assert len(seen) == 500


def test_expired_lease_returns_to_pending_then_fails_after_max_attempts(store):
    store.create_project("crawl", {"stages": [{"name": "crawl", "lease_timeout": 10}], "max_attempts": 2}, T0)
    store.add_jobs("crawl", ["x"], T0)
    token = worker(store)
    job = store.claim("crawl", token, T0)[0]
    assert store.next_expiry() == pytest.approx(T0 + 10)
    assert store.expire(T0 + 9) == []
    assert store.expire(T0 + 10.5) == [("crawl", job["id"], "pending")]
    # the late worker's result is refused and not counted
    with pytest.raises(LeaseNotHeld):
        store.complete("crawl", token, job["id"], "late", T0 + 11)
    again = store.claim("crawl", token, T0 + 12)[0]
    assert again["attempts"] == 2
    assert store.expire(T0 + 30) == [("crawl", job["id"], "failed")]
    failed = store.job("crawl", job["id"])
    assert failed["state"] == "failed" and len(failed["errors"]) == 2
    assert store.counts("crawl")[0] == {"pending": 0, "leased": 0, "done": 0, "failed": 1, "superseded": 0}


def test_heartbeat_extends_leases_and_reports_lost_ones(store):
    store.create_project("crawl", {"stages": [{"name": "crawl", "lease_timeout": 10}]}, T0)
    store.add_jobs("crawl", ["x", "y"], T0)
    token = worker(store)
    a, b = store.claim("crawl", token, T0, limit=2)
    beat = store.heartbeat("crawl", token, T0 + 8, progress="half way")
    assert beat["leases"] == {str(a["id"]): T0 + 18, str(b["id"]): T0 + 18}
    assert store.expire(T0 + 12) == []
    assert store.complete("crawl", token, a["id"], 1, T0 + 12)["status"] == "done"
    assert store.expire(T0 + 19) == [("crawl", b["id"], "pending")]
    assert store.heartbeat("crawl", token, T0 + 20, jobs=[b["id"]])["lost"] == [b["id"]]


def test_completion_is_idempotent_for_the_holder_and_refused_for_others(store):
    three_stage(store)
    store.add_jobs("crawl", ["x"], T0)
    alice, bob = worker(store), worker(store, nickname="bob")
    job = store.claim("crawl", alice, T0)[0]
    with pytest.raises(LeaseNotHeld):
        store.complete("crawl", bob, job["id"], "stolen", T0)
    first = store.complete("crawl", alice, job["id"], "out", T0)
    second = store.complete("crawl", alice, job["id"], "out", T0)
    assert second["status"] == "already_done" and second["children"] == first["children"]
    assert store.pending_count("crawl", "embed") == 1
    board = store.leaderboard("crawl", T0)
    assert board["users"] == [
        {"name": "alice", "all_time": {"crawl": 1}, "last_24h": {"crawl": 1}, "total": 1, "total_24h": 1}
    ]


def test_batch_completion_reports_each_item(store):
    three_stage(store)
    store.add_jobs("crawl", ["x", "y"], T0)
    token = worker(store)
    a, b = store.claim("crawl", token, T0, limit=2)
    out, claimed = store.complete_many(
        "crawl",
        token,
        [{"id": a["id"], "output": 1}, {"id": 999, "output": 2}, {"id": b["id"], "output": "x" * 5000}],
        T0,
    )
    assert claimed == []
    assert [o["status"] for o in out] == ["done", "error", "error"]
    # The store answers in domain terms; the HTTP edge (ocf.jobs.edge) turns each kind into a status.
    assert (out[1]["kind"], out[1]["code"]) == ("not_found", "unknown_job")
    assert (out[2]["kind"], out[2]["code"]) == ("too_large", "payload_too_large")
    assert [o.get("http_status") for o in item_answers(out)] == [None, 404, 413]
    assert store.job("crawl", b["id"])["state"] == "leased"


def test_complete_and_claim_in_one_call(store):
    three_stage(store)
    store.add_jobs("crawl", range(5), T0)
    token = worker(store)
    jobs = store.claim("crawl", token, T0, limit=2)
    out, more = store.complete_many("crawl", token, [{"id": j["id"], "output": j["input"]} for j in jobs], T0, claim=2)
    assert [o["status"] for o in out] == ["done", "done"] and [j["input"] for j in more] == [2, 3]
    _, last = store.complete_many("crawl", token, [], T0, claim=10)
    assert [j["input"] for j in last] == [4]
    with pytest.raises(InvalidJobRequest):
        store.complete_many("crawl", token, [], T0)


def test_flags_from_distinct_workers_roll_back_to_the_previous_stage(store):
    three_stage(store, flag_threshold=2)
    store.add_jobs("crawl", ["x"], T0)
    crawler = worker(store)
    parent = store.claim("crawl", crawler, T0)[0]
    store.complete("crawl", crawler, parent["id"], "bad output", T0)
    e1, e2 = worker(store, "embed"), worker(store, "embed", nickname="bob")
    child = store.claim("crawl", e1, T0)[0]
    assert store.flag("crawl", e1, child["id"], T0)["status"] == "flagged"
    # the same worker flagging twice counts once
    store.claim("crawl", e1, T0)
    assert store.flag("crawl", e1, child["id"], T0)["flags"] == 1
    store.claim("crawl", e2, T0)
    outcome = store.flag("crawl", e2, child["id"], T0, reason="corrupt")
    assert outcome == {"id": child["id"], "status": "rolled_back", "flags": 2, "redo": parent["id"]}
    assert store.job("crawl", child["id"])["state"] == "superseded"
    assert store.job("crawl", parent["id"])["state"] == "pending"
    counts = store.counts("crawl")
    assert counts[0]["pending"] == 1 and counts[0]["done"] == 0
    assert counts[1] == {"pending": 0, "leased": 0, "done": 0, "failed": 0, "superseded": 1}
    redo = store.claim("crawl", crawler, T0)[0]
    assert redo["id"] == parent["id"]


def test_stage_one_input_flagged_enough_fails(store):
    store.create_project("crawl", {"stages": ["crawl"], "flag_threshold": 1}, T0)
    store.add_jobs("crawl", ["x"], T0)
    token = worker(store)
    job = store.claim("crawl", token, T0)[0]
    assert store.flag("crawl", token, job["id"], T0)["status"] == "failed"


def test_bye_releases_without_using_an_attempt_and_forgets_the_worker(store):
    three_stage(store)
    store.add_jobs("crawl", ["x"], T0)
    token = worker(store)
    store.claim("crawl", token, T0)
    assert store.bye("crawl", token, T0) == 1
    assert store.job("crawl", 1)["attempts"] == 0 and store.job("crawl", 1)["state"] == "pending"
    with pytest.raises(WorkerNotFound):
        store.heartbeat("crawl", token, T0)


def test_silent_workers_time_out(store):
    three_stage(store)
    store.add_jobs("crawl", ["x"], T0)
    token = worker(store)
    store.claim("crawl", token, T0)
    assert store.forget_idle_workers(T0 + 3601) == 1
    with pytest.raises(WorkerNotFound):
        store.heartbeat("crawl", token, T0 + 3601)
    assert store.job("crawl", 1)["state"] == "pending"


def test_bad_input_is_refused_with_state_intact(store):
    three_stage(store)
    store.add_jobs("crawl", ["x"], T0)
    token = worker(store)
    with pytest.raises(WorkerNotFound):
        store.claim("crawl", "nope", T0)
    with pytest.raises(InvalidJobRequest):
        store.claim("crawl", token, T0, limit=0)
    with pytest.raises(InvalidJobRequest):
        store.claim("crawl", token, T0, stage="embed")
    with pytest.raises(JobsPayloadTooLarge):
        store.add_jobs("crawl", ["y" * 5000], T0)
    with pytest.raises(InvalidJobRequest):
        store.complete("crawl", token, "abc", 1, T0)
    with pytest.raises(ProjectNotFound):
        store.project("nope")
    with pytest.raises(InvalidJobRequest):
        store.register_worker("crawl", nickname="", stage="crawl", now=T0)
    assert store.counts("crawl")[0]["pending"] == 1


def test_project_definition_is_validated_and_idempotent(store):
    three_stage(store)
    _, created = store.create_project(
        "crawl",
        {
            "stages": [
                {"name": "crawl", "lease_timeout": 60},
                {"name": "embed", "lease_timeout": 60},
                {"name": "filter", "lease_timeout": 60},
            ]
        },
        T0,
    )
    assert not created
    with pytest.raises(ProjectExists):
        store.create_project("crawl", {"stages": ["other"]}, T0)
    for bad in (
        {"stages": []},
        {"stages": ["a1"] * 2},
        {"stages": ["s1", "s2", "s3", "s4", "s5", "s6"]},
        {"stages": [{"name": "x1", "lease_timeout": -1}]},
        {"stages": ["ok"], "extra": 1},
        [],
        {"stages": ["b"]},
    ):
        with pytest.raises(InvalidJobRequest):
            store.create_project("other", bad, T0)
    with pytest.raises(InvalidJobRequest):
        store.create_project("bad name!", {"stages": ["ok"]}, T0)


def test_state_survives_reopening(tmp_path):
    with Store.open(tmp_path / "d") as raw:
        js = JobStore(raw)
        three_stage(js)
        js.add_jobs("crawl", ["x", "y"], T0, idempotency_key="batch-1")
        token = js.register_worker("crawl", nickname="n", stage="a", now=T0)["token"]
        js.claim("crawl", token, T0)
    with Store.open(tmp_path / "d") as raw:
        js = JobStore(raw)
        assert js.counts("crawl")[0]["leased"] == 1
        assert js.add_jobs("crawl", ["x", "y"], T0, idempotency_key="batch-1")["repeated"]
        assert js.counts("crawl")[0]["pending"] == 1
        assert js.next_expiry() == pytest.approx(T0 + 60)
        assert js.stats("crawl", T0)["stages"][0]["total"] == 2


def test_group_commit_rolls_back_only_the_failing_operation(store):
    three_stage(store)
    token = worker(store)
    with store.batch():
        store.add_jobs("crawl", ["a", "b"], T0)
        with pytest.raises(JobsPayloadTooLarge):  # fails after inserting "c": its child transaction is undone
            store.add_jobs("crawl", ["c", "x" * 5000], T0)
        claimed = store.claim("crawl", token, T0, limit=5)
    assert [j["input"] for j in claimed] == ["a", "b"]
    assert store.counts("crawl")[0] == {"pending": 0, "leased": 2, "done": 0, "failed": 0, "superseded": 0}
    assert store.add_jobs("crawl", ["d"], T0)["first_id"] == 3
