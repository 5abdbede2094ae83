"""Several tracker nodes on one PostgreSQL database; the database or a node dying under them.

These run real ``ocf`` nodes (in process, on loopback) against the session's
throwaway cluster, or against a cluster of their own when they kill it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from ocf.config import load
from ocf.errors import ConfigError
from ocf.node import open_node
from tests.conftest import free_port
from tests.pgcluster import Cluster

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
PROJECT = {"stages": [{"name": "crawl", "lease_timeout": 30}, {"name": "embed", "lease_timeout": 30}]}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(client: httpx.AsyncClient, stage: str = "crawl", nickname: str = "alice") -> str:
    r = await client.post("/v1/jobs/crawl/workers", json={"nickname": nickname, "stage": stage})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


async def test_two_nodes_serve_one_project_and_wake_each_others_claimers(node_config, pg_url):
    async with (
        open_node(node_config(jobs=True, jobs_store=pg_url)) as a,
        open_node(node_config(jobs=True, jobs_store=pg_url)) as b,
        httpx.AsyncClient(base_url=a.gateway_url, headers={"X-OCF-Admin-Token": a.admin_token}) as ca,
        httpx.AsyncClient(base_url=b.gateway_url, headers={"X-OCF-Admin-Token": b.admin_token}) as cb,
    ):
        assert (await ca.put("/v1/jobs/crawl", json=PROJECT)).status_code == 201
        token = await register(cb, "embed")  # node B learns of the project from the database
        got: list[dict] = []

        async def long_poll() -> None:
            r = await cb.post("/v1/jobs/crawl/claim", json={"max": 5, "wait": 30}, headers=auth(token))
            got.extend(r.json()["jobs"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_poll)
            await b.jobs.wait_until(lambda: b.jobs.waiting_claims == 1)
            # A stage-1 job completed on node A creates the stage-2 job B's claimer waits for.
            await ca.post("/v1/jobs/crawl/jobs", json=["x"])
            crawler = await register(ca)
            job = (await ca.post("/v1/jobs/crawl/claim", json={}, headers=auth(crawler))).json()["jobs"][0]
            r = await ca.post(f"/v1/jobs/crawl/jobs/{job['id']}/complete", json={"output": "y"}, headers=auth(crawler))
            assert r.json()["status"] == "done"
        assert [j["input"] for j in got] == ["y"]
        # The worker registered on B completes through A: both nodes are one tracker.
        r = await ca.post(
            "/v1/jobs/crawl/complete", json={"results": [{"id": got[0]["id"], "output": 1}]}, headers=auth(token)
        )
        assert r.json()["results"][0]["status"] == "done"
        for client in (ca, cb):
            stages = (await client.get("/v1/jobs/crawl")).json()["stages"]
            assert [s["done"] for s in stages] == [1, 1]
        board = (await cb.get("/v1/jobs/crawl/leaderboard")).json()
        assert board["users"][0] == {
            "name": "alice",
            "all_time": {"crawl": 1, "embed": 1},
            "last_24h": {"crawl": 1, "embed": 1},
            "total": 2,
            "total_24h": 2,
        }
        assert b.jobs.store.retries >= 0 and a.jobs.store.unavailable == 0


async def test_bad_url_or_credentials_stop_the_node_with_one_line(node_config, pg_cluster):
    for url in (pg_cluster.url(user="nobody"), "postgresql://postgres:secret@127.0.0.1:1/x"):
        with pytest.raises(ConfigError) as failed:
            async with open_node(node_config(jobs=True, jobs_store=url)):
                pass
        message = str(failed.value)
        assert message.startswith("--jobs.store: cannot use PostgreSQL at ") and "\n" not in message
        assert "secret" not in message
    with pytest.raises(ConfigError) as failed:
        load({"jobs.store": "mysql://user:secret@x/db"}, env={})
    assert str(failed.value).startswith("--jobs.store: must be 'lmdb' or a postgresql://") and "secret" not in str(
        failed.value
    )
    assert load({}, env={"OCF_JOBS_STORE": pg_cluster.url()}).jobs_store == pg_cluster.url()


async def test_database_killed_gives_503_with_retry_after_then_recovers(node_config):
    cluster = Cluster()
    cluster.init()
    cluster.start()
    try:
        url = cluster.create_database("k")
        async with (
            open_node(node_config(jobs=True, jobs_store=url)) as node,
            httpx.AsyncClient(
                base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}, timeout=30
            ) as client,
        ):
            assert (await client.put("/v1/jobs/crawl", json=PROJECT)).status_code == 201
            await client.post("/v1/jobs/crawl/jobs", json=["a", "b"])
            token = await register(client)
            first = (await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(token))).json()["jobs"]
            await trio.to_thread.run_sync(cluster.kill9)
            for path, body in (("/v1/jobs/crawl/claim", {}), ("/v1/jobs/crawl/heartbeat", {})):
                r = await client.post(path, json=body, headers=auth(token))
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "store_unavailable"
            r = await client.get("/v1/jobs/crawl/stats")
            assert r.status_code == 503 and "retry-after" in r.headers
            await trio.to_thread.run_sync(cluster.start)
            # Pooled connections died with the server: each is found broken once, then replaced.
            for _ in range(20):
                r = await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(token))
                if r.status_code == 200:
                    break
                assert r.status_code == 503
            assert [j["input"] for j in r.json()["jobs"]] == ["b"]
            r = await client.post(
                "/v1/jobs/crawl/complete",
                json={"results": [{"id": first[0]["id"], "output": 1}]},
                headers=auth(token),
            )
            assert r.json()["results"][0]["status"] == "done"
            assert node.jobs.store.unavailable >= 3
    finally:
        await trio.to_thread.run_sync(cluster.cleanup)


async def _start_node_process(url: str, data_dir: Path, port: int, token: str) -> trio.Process:
    """``ocf start --jobs --jobs.store URL`` as its own process; returns once it says it is ready."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OCF_ADMIN_TOKEN=token, OCF_JOBS_STORE=url)
    argv = [sys.executable, "-m", "ocf", "start", "--mode", "standalone", "--jobs", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--tcpport", "0", "--data-dir", str(data_dir), "--log-level", "warning"]
    proc = await trio.lowlevel.open_process(argv, env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    with trio.fail_after(60):
        while b" ready; gateway " not in seen:
            chunk = await proc.stderr.receive_some(4096)
            assert chunk, f"node exited: {seen.decode(errors='replace')}"
            seen += chunk
    return proc


async def test_kill9_of_one_tracker_node_loses_and_duplicates_no_job(node_config, pg_url, tmp_path):
    token = "t" * 32
    port = free_port()
    async with (
        open_node(node_config(jobs=True, jobs_store=pg_url)) as b,
        httpx.AsyncClient(base_url=b.gateway_url, headers={"X-OCF-Admin-Token": b.admin_token}) as cb,
    ):
        assert (
            await cb.put("/v1/jobs/crawl", json={"stages": [{"name": "crawl", "lease_timeout": 60}]})
        ).status_code == 201
        assert (await cb.post("/v1/jobs/crawl/jobs", json=[f"in{i}" for i in range(60)])).status_code == 201
        proc = await _start_node_process(pg_url, tmp_path / "a", port, token)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as ca:
                workers = [await register(ca, nickname=f"w{i}") for i in range(4)]
                held: dict[str, list[int]] = {}
                for w in workers:  # each worker completes a batch through A and holds the next one
                    jobs = (await ca.post("/v1/jobs/crawl/claim", json={"max": 5}, headers=auth(w))).json()["jobs"]
                    r = await ca.post(
                        "/v1/jobs/crawl/complete",
                        json={"results": [{"id": j["id"], "output": j["input"]} for j in jobs], "claim": 5},
                        headers=auth(w),
                    )
                    held[w] = [j["id"] for j in r.json()["jobs"]]
        finally:
            proc.kill()  # SIGKILL: node A dies mid-run, its workers' leases stay in the database
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        # The same workers carry on through node B: their tokens and leases are the project's, not A's.
        for w in workers:
            items = [{"id": i, "output": f"in{i - 1}"} for i in held[w]]
            while True:
                r = await cb.post("/v1/jobs/crawl/complete", json={"results": items, "claim": 5}, headers=auth(w))
                assert all(x["status"] == "done" for x in r.json()["results"]), r.text
                jobs = r.json()["jobs"]
                if not jobs:
                    break
                items = [{"id": j["id"], "output": j["input"]} for j in jobs]
        results = [json.loads(line) for line in (await cb.get("/v1/jobs/crawl/results")).text.splitlines()]
        assert sorted(r["job"] for r in results) == list(range(1, 61))  # each job exactly once
        assert all(r["output"] == f"in{r['job'] - 1}" for r in results)
        stage = (await cb.get("/v1/jobs/crawl")).json()["stages"][0]
        assert (stage["done"], stage["pending"], stage["leased"], stage["failed"]) == (60, 0, 0, 0)
