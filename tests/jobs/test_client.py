"""The worker client (Trio and blocking) against a real node."""

from __future__ import annotations

import httpx
import pytest
import trio

from ocf.jobs.client import TrackerError, connect, connect_sync
from ocf.node import open_node

pytestmark = pytest.mark.timeout(120)


async def make_project(http: httpx.AsyncClient, n: int, lease: float = 30) -> None:
    stages = [{"name": s, "lease_timeout": lease} for s in ("crawl", "embed", "filter")]
    assert (await http.put("/v1/jobs/p", json={"stages": stages})).status_code == 201
    await http.post("/v1/jobs/p/jobs", json=list(range(n)))


async def test_async_for_completes_jobs_through_all_stages(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await make_project(http, 25)
        async with connect(node.gateway_url, "p", nickname="alice") as tracker:
            for stage, step in (("crawl", lambda x: x * 2), ("embed", lambda x: x + 1), ("filter", lambda x: {"v": x})):
                async for job in tracker.jobs(stage, batch=10, until_empty=True):
                    job.output = step(job.input)
        results = [line for line in (await http.get("/v1/jobs/p/results")).text.splitlines()]
        assert len(results) == 25
        stats = (await http.get("/v1/jobs/p/stats")).json()
        assert stats["completion"] == 1.0
        assert (await http.get("/v1/jobs/p/leaderboard")).json()["users"][0]["total"] == 75


async def test_heartbeats_keep_a_slow_job_leased(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await make_project(http, 1, lease=0.3)
        tracker_state = node.jobs
        async with connect(node.gateway_url, "p", nickname="slow") as tracker:
            async for job in tracker.jobs("crawl", until_empty=True):
                # outlive the lease several times over; the client's heartbeats must keep it
                version = tracker_state.version
                for _ in range(8):
                    version = await tracker_state.wait_changed(version)
                assert tracker_state.store.job("p", job.id)["state"] == "leased"
                job.output = "slow but fine"
        assert tracker_state.store.job("p", 1)["attempts"] == 1
        assert tracker_state.store.counts("p")[0]["done"] == 1


async def test_leaving_the_loop_hands_jobs_back_at_once(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await make_project(http, 10)
        with pytest.raises(RuntimeError):
            async with connect(node.gateway_url, "p", nickname="crashy") as tracker:
                async for _job in tracker.jobs("crawl", batch=5):
                    raise RuntimeError("worker code crashed")
        counts = node.jobs.store.counts("p")[0]
        assert counts == {"pending": 10, "leased": 0, "done": 0, "failed": 0, "superseded": 0}


async def test_run_fails_jobs_whose_handler_raises(node_config):
    async with (
        open_node(node_config(jobs=True, jobs_max_attempts=1)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await make_project(http, 4)

        async def handle(value):
            if value == 2:
                raise ValueError("cannot handle 2")
            return value

        async with connect(node.gateway_url, "p") as tracker:
            assert await tracker.run("crawl", handle, batch=2, until_empty=True) == 3
        counts = node.jobs.store.counts("p")[0]
        assert counts["done"] == 3 and counts["failed"] == 1
        assert "cannot handle 2" in node.jobs.store.failures("p")[0]["error"]


async def test_errors_are_typed(node_config):
    async with open_node(node_config(jobs=True)) as node:
        async with connect(node.gateway_url, "nope") as tracker:
            with pytest.raises(TrackerError) as info:
                await tracker.worker("crawl")
        assert info.value.status == 404 and info.value.code == "unknown_project"


async def test_blocking_client(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await make_project(http, 6)

        def work() -> int:
            n = 0
            with connect_sync(node.gateway_url, "p", nickname="bob") as tracker:
                for job in tracker.jobs("crawl", batch=4, until_empty=True):
                    job.output = -job.input
                    n += 1
            return n

        assert await trio.to_thread.run_sync(work) == 6
        assert node.jobs.store.counts("p")[1]["pending"] == 6
