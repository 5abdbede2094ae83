"""The worker client and the native API: no silent loss, under Trio and asyncio."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import trio

from ocf.jobs.client import connect, connect_sync
from ocf.node import open_node

pytestmark = pytest.mark.timeout(120)


async def _project(http: httpx.AsyncClient, inputs: list, stages=("crawl",), **extra) -> None:
    r = await http.put("/v1/jobs/p", json={"stages": list(stages), **extra})
    assert r.status_code == 201, r.text
    r = await http.post("/v1/jobs/p/jobs", json=inputs)
    assert r.status_code == 201, r.text


async def _counts(http: httpx.AsyncClient) -> dict:
    return (await http.get("/v1/jobs/p")).json()["stages"][0]


async def test_native_late_completion_is_refused_and_not_recorded(node_config):
    now = [1_000_000.0]
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        node.jobs.clock = lambda: now[0]
        await _project(http, ["a", "b"], stages=[{"name": "crawl", "lease_timeout": 3}])
        token = (await http.post("/v1/jobs/p/workers", json={"nickname": "w", "stage": "crawl"})).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        jobs = (await http.post("/v1/jobs/p/claim", json={"max": 2}, headers=headers)).json()["jobs"]
        r = await http.post(f"/v1/jobs/p/jobs/{jobs[0]['id']}/complete", json={"output": 1}, headers=headers)
        assert r.status_code == 200
        now[0] += 4
        assert len(await node.jobs.expire_now()) == 1
        r = await http.post(f"/v1/jobs/p/jobs/{jobs[1]['id']}/complete", json={"output": 2}, headers=headers)
        assert r.status_code == 409 and r.json()["error"]["code"] == "lease_lost"
        r = await http.post(
            "/v1/jobs/p/complete", json={"results": [{"id": jobs[1]["id"], "output": 2}]}, headers=headers
        )
        assert r.json()["results"][0]["http_status"] == 409
        counts = await _counts(http)
        assert (counts["done"], counts["pending"]) == (1, 1)
        assert len((await http.get("/v1/jobs/p/results")).text.splitlines()) == 1


async def test_breaking_out_of_a_batch_keeps_its_completions(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await _project(http, list(range(10)))
        async with connect(node.gateway_url, "p", nickname="alice") as tracker:
            seen = 0
            async for job in tracker.jobs("crawl", batch=10):
                job.output = job.input * 2
                seen += 1
                if seen == 5:
                    break
        counts = await _counts(http)
        # The five outputs set (the one the loop broke at included) are recorded; the rest go back at once.
        assert (counts["done"], counts["pending"], counts["leased"]) == (5, 5, 0)
        outputs = sorted(line for line in (await http.get("/v1/jobs/p/results")).text.splitlines())
        assert len(outputs) == 5


def _sync_break(url: str) -> None:
    with connect_sync(url, "p", nickname="bob") as tracker:
        for n, job in enumerate(tracker.jobs("crawl", batch=10, until_empty=True), 1):
            job.output = "ok"
            if n == 3:
                break


async def test_breaking_out_of_a_sync_batch_keeps_its_completions(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await _project(http, list(range(10)))
        await trio.to_thread.run_sync(_sync_break, node.gateway_url)
        counts = await _counts(http)
        assert (counts["done"], counts["pending"], counts["leased"]) == (3, 7, 0)


def _asyncio_worker(url: str, out: list) -> None:
    async def main() -> None:
        async with connect(url, "p", nickname="carol") as tracker:
            async for job in tracker.jobs("crawl", batch=4, until_empty=True):
                await asyncio.sleep(0)
                job.output = f"asyncio:{job.input}"
                out.append(job.id)

    asyncio.run(main())


async def test_client_runs_under_asyncio(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await _project(http, list(range(9)))
        out: list = []
        # asyncio.run in its own thread: the node's Trio loop keeps serving meanwhile.
        await trio.to_thread.run_sync(_asyncio_worker, node.gateway_url, out)
        assert len(out) == 9
        counts = await _counts(http)
        assert counts["done"] == 9
        assert "asyncio:0" in (await http.get("/v1/jobs/p/results")).text


async def test_flags_count_distinct_users(node_config):
    async with (
        open_node(node_config(jobs=True, jobs_flag_threshold=2)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await _project(http, ["bad"], stages=["crawl"])

        async def flag_as(user: str) -> dict:
            token = (
                await http.post("/v1/jobs/p/workers", json={"nickname": "n", "user": user, "stage": "crawl"})
            ).json()["token"]
            headers = {"Authorization": f"Bearer {token}"}
            job = (await http.post("/v1/jobs/p/claim", json={"max": 1}, headers=headers)).json()["jobs"][0]
            return (await http.post(f"/v1/jobs/p/jobs/{job['id']}/flag", json={}, headers=headers)).json()

        # One person's five workers count once.
        assert [(await flag_as("mallory"))["flags"] for _ in range(5)] == [1] * 5
        assert (await flag_as("alice"))["status"] == "failed"  # a second user: threshold reached
