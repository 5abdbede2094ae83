"""What operators read: rates over the real window, the live worker list, the whole leaderboard, results with inputs."""

from __future__ import annotations

import json

import httpx
import pytest

from ocf.jobs.store import JobStore
from ocf.node import open_node
from ocf.store import Store

pytestmark = pytest.mark.timeout(120)
T0 = 1_800_000_000.0


def test_rate_and_eta_use_the_real_elapsed_window(tmp_path):
    with Store.open(tmp_path / "data") as raw:
        store = JobStore(raw)
        store.create_project("p", {"stages": [{"name": "crawl", "lease_timeout": 60}]}, T0)
        store.add_jobs("p", range(1000), T0)
        token = store.register_worker("p", nickname="w", stage="crawl", now=T0)["token"]
        # 500 jobs done over 14 s, as in the report that read 0.56/s.
        for i in range(500):
            now = T0 + 14 * i / 499
            job = store.claim("p", token, now)[0]
            store.complete("p", token, job["id"], "ok", now)
        stats = store.stats("p", T0 + 14)
        rate = stats["stages"][0]["rate_per_s"]
        assert 34 <= rate <= 37, stats["stages"][0]  # 500 / 14 s = 35.7/s, not 500 / 900 s
        assert 13 <= stats["eta_seconds"] <= 15, stats["eta_seconds"]  # 500 left at ~35.7/s


async def test_worker_list_leaderboard_pages_and_results_with_input(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as http,
    ):
        await http.put("/v1/jobs/p", json={"stages": ["crawl", "embed"]})
        await http.post("/v1/jobs/p/jobs", json=[f"in-{i}" for i in range(20)])
        tokens = {}
        for i in range(6):
            r = await http.post("/v1/jobs/p/workers", json={"nickname": f"n{i}", "user": f"user{i}", "stage": "crawl"})
            tokens[r.json()["name"]] = r.json()["token"]
        names = list(tokens)
        # Worker i completes i jobs of stage 1, then holds one more with a progress message.
        for i, name in enumerate(names):
            headers = {"Authorization": f"Bearer {tokens[name]}"}
            if i:
                jobs = (await http.post("/v1/jobs/p/claim", json={"max": i}, headers=headers)).json()["jobs"]
                await http.post(
                    "/v1/jobs/p/complete",
                    json={"results": [{"id": j["id"], "output": j["input"] + "!"} for j in jobs]},
                    headers=headers,
                )
        headers = {"Authorization": f"Bearer {tokens[names[5]]}"}
        held = (await http.post("/v1/jobs/p/claim", json={"max": 1}, headers=headers)).json()["jobs"]
        await http.post("/v1/jobs/p/heartbeat", json={"progress": "halfway"}, headers=headers)

        page = (await http.get("/v1/jobs/p/workers", params={"limit": 4})).json()
        assert page["total"] == 6 and len(page["workers"]) == 4
        top = page["workers"][0]
        assert (top["name"], top["jobs_completed"], top["current_jobs"], top["progress"], top["user"]) == (
            names[5],
            5,
            [held[0]["id"]],
            "halfway",
            "user5",
        )
        rest = (await http.get("/v1/jobs/p/workers", params={"limit": 4, "offset": 4})).json()["workers"]
        assert [w["jobs_completed"] for w in rest] == [1, 0]
        assert (await http.get("/v1/jobs/p/workers", params={"stage": "embed"})).json()["total"] == 0
        assert (await http.get("/v1/jobs/p/workers", params={"all": "1"})).json()["total"] == 6

        board = (await http.get("/v1/jobs/p/leaderboard", params={"limit": 2, "offset": 2})).json()
        assert board["total"] == {"users": 5, "workers": 5}
        assert [row["total"] for row in board["users"]] == [3, 2]

        # Stage 2 completes everything stage 1 produced: results carry their own and the root's input.
        r = await http.post("/v1/jobs/p/workers", json={"nickname": "e", "stage": "embed"})
        headers = {"Authorization": f"Bearer {r.json()['token']}"}
        jobs = (await http.post("/v1/jobs/p/claim", json={"max": 100}, headers=headers)).json()["jobs"]
        await http.post(
            "/v1/jobs/p/complete",
            json={"results": [{"id": j["id"], "output": len(j["input"])} for j in jobs]},
            headers=headers,
        )
        lines = [
            json.loads(line) for line in (await http.get("/v1/jobs/p/results", params={"input": "1"})).text.splitlines()
        ]
        assert len(lines) == 15
        assert all(line["input"] == line["root_input"] + "!" and line["output"] == len(line["input"]) for line in lines)
        plain = json.loads((await http.get("/v1/jobs/p/results")).text.splitlines()[0])
        assert "input" not in plain
