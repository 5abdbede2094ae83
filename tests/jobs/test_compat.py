"""A real ``distcompute-client`` (the original tracker's worker library, unchanged) against our tracker.

The client is blocking (requests), so it runs in worker threads while the
node runs in this test's Trio loop. Three stages a -> b -> c: each stage's
worker must receive the previous stage's output (the original lost it).
"""

from __future__ import annotations

import distcompute_client.client as distcompute
import distcompute_client.errors as errors
import httpx
import pytest
import trio

from ocf.node import open_node

pytestmark = pytest.mark.timeout(120)


def run_stage(url: str, stage: str, nickname: str) -> list[tuple[int, object]]:
    """A worker loop as distcompute-client's README writes it, until no job is left."""
    client = distcompute.init(url, stage, nickname, verbose=False)
    seen = []
    assert client.is_alive()
    while client.job_count() > 0:
        client.new_job()
        client.log("working")
        job = client.job
        if stage == "a":
            output = {"shard": job, "urls": 2}
        elif stage == "b":
            output = dict(job, embedded=True)
        else:
            output = f"done:{job['shard']}:{job['embedded']}"
        seen.append((client.job_id, job))
        client.complete_job(output)
    client.bye()
    return seen


async def test_distcompute_client_runs_every_stage(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        r = await http.put("/v1/jobs/crawl", json={"stages": ["cpu", "gpu", "filter"]})
        assert r.status_code == 201
        await http.post("/v1/jobs/crawl/jobs", json=[f"shard-{i}" for i in range(5)])
        url = f"{node.gateway_url}/v1/jobs/crawl"
        seen = {}
        for stage in "abc":
            seen[stage] = await trio.to_thread.run_sync(run_stage, url, stage, "alice")
        assert sorted(job for _, job in seen["a"]) == [f"shard-{i}" for i in range(5)]
        # stage b received stage a's JSON output, stage c stage b's: the data flows
        assert all(job["urls"] == 2 for _, job in seen["b"])
        assert all(job["embedded"] is True for _, job in seen["c"])
        results = sorted(line for line in (await http.get("/v1/jobs/crawl/results")).text.splitlines())
        assert len(results) == 5 and '"output":"done:shard-0:True"' in results[0]
        board = (await http.get("/v1/jobs/crawl/leaderboard")).json()
        assert board["users"][0] == {
            "name": "alice",
            "all_time": {"cpu": 5, "gpu": 5, "filter": 5},
            "last_24h": {"cpu": 5, "gpu": 5, "filter": 5},
            "total": 15,
            "total_24h": 15,
        }


def compat_errors(url: str) -> dict[str, object]:
    out: dict[str, object] = {}
    with pytest.raises(ValueError):  # 400: bad stage
        distcompute.init(url, "z", "x", verbose=False)
    with pytest.raises(ValueError):  # 400: stage beyond the project's
        distcompute.init(url, "d", "x", verbose=False)
    client = distcompute.init(url, "a", "x", verbose=False)
    with pytest.raises(errors.ZeroJobError):  # 403: completing with no open job
        client.complete_job("nothing")
    with pytest.raises(errors.ZeroJobError):  # 403: flagging with no open job
        client.flag_invalid_data()
    client.new_job()
    out["first"] = client.job_id
    client.complete_job("ok")
    client.complete_job("ok")  # a retried completion is idempotent: 200, counted once
    with pytest.raises(errors.ZeroJobError):  # 403: no job left at stage a
        client.new_job()
    client.bye()
    assert not client.is_alive()
    with pytest.raises(errors.WorkerTimedOutError):  # 404: progress from an unknown worker
        client.log("still here?")
    out["url_page"] = client.display_name
    return out


async def test_compat_status_codes_and_idempotent_completion(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await http.put("/v1/jobs/crawl", json={"stages": ["cpu", "gpu"]})
        await http.post("/v1/jobs/crawl/jobs", json=[{"k": 1}])
        url = f"{node.gateway_url}/v1/jobs/crawl"
        out = await trio.to_thread.run_sync(compat_errors, url)
        assert out["first"] and out["url_page"]
        counts = (await http.get("/v1/jobs/crawl")).json()["stages"]
        assert counts[0]["done"] == 1 and counts[1]["pending"] == 1
        r = await http.get("/v1/jobs/crawl/api/jobCount", params={"stage": "b"})
        assert r.text == "1"
        r = await http.get("/v1/jobs/crawl/api/jobCount", params={"stage": "q"})
        assert r.status_code == 400 and "Invalid worker stage" in r.text
        r = await http.post("/v1/jobs/crawl/api/updateProgress", json={"token": "nope", "progress": "x"})
        assert r.status_code == 404


async def test_compat_flags_roll_back_and_worker_page(node_config):
    async with (
        open_node(node_config(jobs=True, jobs_flag_threshold=2)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await http.put("/v1/jobs/crawl", json={"stages": ["cpu", "gpu"]})
        await http.post("/v1/jobs/crawl/jobs", json=["in"])
        url = f"{node.gateway_url}/v1/jobs/crawl"

        def flow() -> str:
            a = distcompute.init(url, "a", "alice", verbose=False)
            a.new_job()
            a.complete_job(["bad", "output"])
            for name in ("bob", "carol"):
                b = distcompute.init(url, "b", name, verbose=False)
                b.new_job()
                assert b.job == ["bad", "output"]
                b.flag_invalid_data()
            a.new_job()  # rolled back: stage a gets its job again
            assert a.job == "in"
            return a.display_name

        name = await trio.to_thread.run_sync(flow)
        r = await http.get(f"/v1/jobs/crawl/worker/a/{name}")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"] and name in r.text
        r = await http.get("/v1/jobs/crawl/worker/a/nobody-here-000")
        assert r.status_code == 404


async def test_late_completion_is_refused_not_swallowed(node_config):
    """A worker whose lease expired gets 403 for its completeJob, even after completing an earlier job.

    ``distcompute-client`` heartbeats only when user code calls ``log()``, so a
    job longer than its lease is common; the answer used to be 200 while the
    output was thrown away. The tracker's clock is driven by the test.
    """
    now = [1_000_000.0]
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        node.jobs.clock = lambda: now[0]
        await http.put("/v1/jobs/crawl", json={"stages": [{"name": "cpu", "lease_timeout": 3}], "max_attempts": 5})
        await http.post("/v1/jobs/crawl/jobs", json=["first", "second"])
        url = f"{node.gateway_url}/v1/jobs/crawl"
        client = await trio.to_thread.run_sync(lambda: distcompute.init(url, "a", "alice", verbose=False))
        await trio.to_thread.run_sync(client.new_job)
        await trio.to_thread.run_sync(client.complete_job, "first done")
        await trio.to_thread.run_sync(client.new_job)
        assert client.job == "second"
        now[0] += 4  # the 4 s job outlives its 3 s lease
        assert [state for *_, state in await node.jobs.expire_now()] == ["pending"]
        with pytest.raises(errors.ZeroJobError) as refused:
            await trio.to_thread.run_sync(client.complete_job, "second done, late")
        assert "not recorded" in str(refused.value)
        counts = (await http.get("/v1/jobs/crawl")).json()["stages"][0]
        assert (counts["done"], counts["pending"]) == (1, 1)
        results = (await http.get("/v1/jobs/crawl/results")).text.splitlines()
        assert len(results) == 1 and "first done" in results[0]
        # The job is still there to be done, by this worker or another.
        await trio.to_thread.run_sync(client.new_job)
        assert client.job == "second"
        await trio.to_thread.run_sync(client.complete_job, "second done")
        assert (await http.get("/v1/jobs/crawl")).json()["stages"][0]["done"] == 2


async def test_compat_route_details(node_config):
    async with (
        open_node(node_config(jobs=True, max_body_size=4096)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await http.put("/v1/jobs/crawl", json={"stages": ["cpu"]})
        await http.post("/v1/jobs/crawl/jobs", json=["x"])
        r = await http.get("/v1/jobs/crawl/api/new", params={"stage": "a", "nickname": "n"})
        assert r.status_code == 200 and not r.text.endswith("\n")
        token = r.json()["token"]
        r = await http.post("/v1/jobs/crawl/api/newJob", json={"token": token})
        assert r.status_code == 200 and not r.text.endswith("\n") and r.json()["data"] == "x"
        for route in ("newJob", "completeJob", "updateProgress", "flagInvalidData", "validateWorker", "bye"):
            r = await http.post(f"/v1/jobs/crawl/api/{route}", json={"data": "x"})
            assert r.status_code == 400 and "token" in r.text, (route, r.status_code, r.text)
        r = await http.post("/v1/jobs/crawl/api/completeJob", json={"token": token, "data": 5})
        assert r.status_code == 400 and r.headers["content-type"].startswith("text/plain")
        r = await http.post("/v1/jobs/crawl/api/completeJob", json={"token": token, "data": "y" * 8000})
        assert r.status_code == 413 and r.headers["content-type"].startswith("text/plain"), r.text
        await http.put("/v1/jobs/secret-project", json={"stages": ["cpu"]})
        r = await http.get("/v1/jobs/nothing/api/jobCount", params={"stage": "a"})
        assert r.status_code == 404 and "secret-project" not in r.text and "crawl" not in r.text
        r = await http.get("/v1/jobs/nothing")
        assert r.status_code == 404 and "secret-project" not in r.text
