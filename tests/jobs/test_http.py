"""The tracker's HTTP API on a real node: honest codes, bad input, concurrency, reaching it via the network."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from ocf.node import open_node
from ocf.transport import MemoryNetwork
import trio.lowlevel

pytestmark = pytest.mark.timeout(120)

PROJECT = {
    "stages": [
        {"name": "crawl", "lease_timeout": 30},
        {"name": "embed", "lease_timeout": 30},
        {"name": "filter", "lease_timeout": 30},
    ]
}


async def setup_project(client: httpx.AsyncClient, inputs=("a", "b", "c"), definition=PROJECT) -> None:
    r = await client.put("/v1/jobs/crawl", json=definition)
    assert r.status_code == 201, r.text
    r = await client.post("/v1/jobs/crawl/jobs", json=list(inputs))
    assert r.status_code == 201 and r.json()["created"] == len(inputs)


async def register(client, stage="crawl", nickname="alice") -> str:
    r = await client.post("/v1/jobs/crawl/workers", json={"nickname": nickname, "stage": stage})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def test_three_stage_run_over_http(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        await setup_project(client)
        for stage in ("crawl", "embed", "filter"):
            token = await register(client, stage)
            r = await client.post("/v1/jobs/crawl/claim", json={"max": 10}, headers=auth(token))
            jobs = r.json()["jobs"]
            assert len(jobs) == 3 and {j["stage"] for j in jobs} == {stage}
            r = await client.post(
                "/v1/jobs/crawl/complete",
                json={"results": [{"id": j["id"], "output": [j["input"], stage]} for j in jobs]},
                headers=auth(token),
            )
            assert [x["status"] for x in r.json()["results"]] == ["done"] * 3
        r = await client.get("/v1/jobs/crawl/results")
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert len(lines) == 3 and all(line["output"][1] == "filter" for line in lines)
        stats = (await client.get("/v1/jobs/crawl/stats")).json()
        assert stats["completion"] == 1.0 and [s["done"] for s in stats["stages"]] == [3, 3, 3]
        board = (await client.get("/v1/jobs/crawl/leaderboard")).json()
        assert board["users"][0]["name"] == "alice" and board["users"][0]["total"] == 9
        projects = (await client.get("/v1/jobs")).json()["projects"]
        assert projects[0]["name"] == "crawl" and projects[0]["results"] == 3


async def test_bad_requests_get_clear_errors_and_change_nothing(node_config):
    async with (
        open_node(node_config(jobs=True, jobs_max_payload=1000)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        await setup_project(client)
        token = await register(client)
        cases = [
            ("put", "/v1/jobs/crawl", {"content": b"{not json"}, 400, "bad_json"),
            ("put", "/v1/jobs/crawl", {"json": {"stages": ["other"]}}, 409, "project_exists"),
            ("put", "/v1/jobs/x", {"json": {"stages": ["a1"] * 6}}, 400, "too_many_stages"),
            ("get", "/v1/jobs/nope/stats", {}, 404, "unknown_project"),
            ("post", "/v1/jobs/crawl/jobs", {"json": {"inputs": "x"}}, 400, "bad_inputs"),
            ("post", "/v1/jobs/crawl/jobs", {"json": ["x" * 2000]}, 413, "payload_too_large"),
            (
                "post",
                "/v1/jobs/crawl/jobs",
                {"content": b'"ok"\n{bad', "headers": {"Content-Type": "application/x-ndjson"}},
                400,
                "bad_json",
            ),
            ("post", "/v1/jobs/crawl/workers", {"json": {"nickname": "x", "stage": "nope"}}, 400, "unknown_stage"),
            ("post", "/v1/jobs/crawl/claim", {"json": {"max": 5}}, 404, "unknown_worker"),
            ("post", "/v1/jobs/crawl/claim", {"json": {"max": 5}, "headers": auth("forged")}, 404, "unknown_worker"),
            ("post", "/v1/jobs/crawl/claim", {"json": {"max": "lots"}, "headers": auth(token)}, 400, "bad_limit"),
            ("post", "/v1/jobs/crawl/claim", {"json": [1], "headers": auth(token)}, 400, "bad_json"),
            ("post", "/v1/jobs/crawl/heartbeat", {"json": {"token": "forged"}}, 404, "unknown_worker"),
            (
                "post",
                "/v1/jobs/crawl/jobs/1/complete",
                {"json": {"output": 1}, "headers": auth(token)},
                409,
                "lease_lost",
            ),
            (
                "post",
                "/v1/jobs/crawl/jobs/99/complete",
                {"json": {"output": 1}, "headers": auth(token)},
                404,
                "unknown_job",
            ),
            ("post", "/v1/jobs/crawl/jobs/1/complete", {"json": {}, "headers": auth(token)}, 400, "bad_output"),
        ]
        for method, path, kwargs, status, code in cases:
            r = await getattr(client, method)(path, **kwargs)
            assert r.status_code == status, (path, r.text)
            assert r.json()["error"]["code"] == code, (path, r.text)
        counts = (await client.get("/v1/jobs/crawl")).json()["stages"][0]
        assert counts["pending"] == 3 and counts["leased"] == 0
        # oversize output: 413, lease kept
        job = (await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(token))).json()["jobs"][0]
        r = await client.post(
            f"/v1/jobs/crawl/jobs/{job['id']}/complete", json={"output": "y" * 2000}, headers=auth(token)
        )
        assert r.status_code == 413
        assert (await client.get(f"/v1/jobs/crawl/jobs/{job['id']}")).json()["state"] == "leased"


@pytest.mark.parametrize(
    ("hostile", "says"),
    [
        ('"x\\ud800y"', "surrogate"),  # as a client sends it: an escape, valid JSON text
        ("[" * 2000 + "]" * 2000, "nested"),  # json raised RecursionError, no ValueError
    ],
    ids=["lone-surrogate", "deep-nesting"],
)
async def test_a_body_python_cannot_take_is_a_400_and_changes_nothing(node_config, hostile, says):
    """JSON's \\ud800 escape decodes, in Python, to a string UTF-8 cannot encode. It used to get through the
    parser and fail where the text was stored or answered: a worker's heartbeat, result, failure or flag
    answered 500, and so did job creation and the node's own entry. Every JSON body is now refused at the
    parser (``ocf.strictjson``): 400, and the tracker holds exactly what it held. So is nesting Python's
    parser gives up on (a RecursionError: 500 on every route)."""
    lone = hostile
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        await setup_project(client)
        token = await register(client)
        job = (await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(token))).json()["jobs"][0]
        before = (await client.get("/v1/jobs/crawl")).json()["stages"]
        json_headers = {"Content-Type": "application/json"}
        ndjson = {"Content-Type": "application/x-ndjson"}
        cases = [  # LONE: the hostile string, JOB: the leased job's id
            ("put", "/v1/jobs/other", '{"stages": [{"name": LONE}]}', {}),
            ("post", "/v1/jobs/crawl/jobs", '["ok", LONE]', {}),
            ("post", "/v1/jobs/crawl/jobs", '{"inputs": ["ok", {"u": LONE}]}', {}),
            ("post", "/v1/jobs/crawl/jobs", '"ok"\n{"u": LONE}\n', ndjson),
            ("post", "/v1/jobs/crawl/workers", '{"nickname": LONE, "stage": "crawl"}', {}),
            ("post", "/v1/jobs/crawl/heartbeat", '{"jobs": [JOB], "progress": LONE}', auth(token)),
            ("post", "/v1/jobs/crawl/complete", '{"results": [{"id": JOB, "output": LONE}]}', auth(token)),
            ("post", "/v1/jobs/crawl/jobs/JOB/complete", '{"output": {"k": [LONE]}}', auth(token)),
            ("post", "/v1/jobs/crawl/jobs/JOB/fail", '{"error": LONE}', auth(token)),
            ("post", "/v1/jobs/crawl/jobs/JOB/flag", '{"reason": LONE}', auth(token)),
            ("post", "/v1/jobs/crawl/bye", '{"reason": LONE}', auth(token)),
            ("post", "/v1/jobs/crawl/api/updateProgress", '{"token": "t", "progress": LONE}', {}),
            ("post", "/v1/dnt/_node", '{"owner": LONE}', {}),
        ]
        for method, path, body, headers in cases:
            path, body = (x.replace("JOB", str(job["id"])) for x in (path, body))
            body = body.replace("LONE", lone)
            r = await getattr(client, method)(path, content=body.encode(), headers={**json_headers, **headers})
            assert r.status_code == 400, (path, r.status_code, r.text)
            assert says in r.text, (path, r.text)
        assert (await client.get("/v1/jobs/crawl")).json()["stages"] == before
        assert (await client.get(f"/v1/jobs/crawl/jobs/{job['id']}")).json()["state"] == "leased"
        assert (await client.get("/v1/jobs/other")).status_code == 404
        # An escaped pair is a character, and an escaped backslash is no escape: both are taken.
        r = await client.post(
            "/v1/jobs/crawl/complete",
            content=b'{"results": [{"id": %d, "output": ["\\ud83d\\ude00", "\\\\ud800"]}]}' % job["id"],
            headers={**json_headers, **auth(token)},
        )
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "done", r.text
        child = (await client.get(f"/v1/jobs/crawl/jobs/{job['id']}")).json()["children"][0]
        stored = (await client.get(f"/v1/jobs/crawl/jobs/{child}")).json()  # the next stage's input
        assert stored["input"] == ["\U0001f600", "\\ud800"], stored


async def test_no_tracker_without_jobs_flag(node_config):
    async with (
        open_node(node_config()) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        r = await client.get("/v1/jobs")
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_tracker"


async def test_200_workers_claiming_at_once_never_share_a_job(node_config):
    async with open_node(node_config(jobs=True, register_burst=1000)) as node:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}, limits=limits, timeout=60
        ) as client:
            await setup_project(client, inputs=range(1000))
            tokens = []

            async def reg() -> None:
                tokens.append(await register(client, nickname=f"w{len(tokens)}"))

            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(reg)
            claimed: list[int] = []

            async def worker(token: str) -> None:
                while True:
                    r = await client.post("/v1/jobs/crawl/claim", json={"max": 3}, headers=auth(token))
                    assert r.status_code == 200, r.text
                    jobs = r.json()["jobs"]
                    if not jobs:
                        return
                    claimed.extend(j["id"] for j in jobs)

            async with trio.open_nursery() as nursery:
                for token in tokens:
                    nursery.start_soon(worker, token)
        assert len(claimed) == 1000 and len(set(claimed)) == 1000


async def test_long_poll_claim_wakes_when_jobs_arrive(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(
            base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}, timeout=30
        ) as client,
    ):
        await setup_project(client, inputs=[])
        token = await register(client)
        got = []

        async def waiter() -> None:
            r = await client.post("/v1/jobs/crawl/claim", json={"wait": 20}, headers=auth(token))
            got.extend(r.json()["jobs"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            tracker = node.jobs
            await tracker.wait_until(lambda: tracker.store.stats("crawl", tracker.clock())["workers"]["total"] == 1)
            await trio.lowlevel.checkpoint()  # let the first (empty) claim go through before adding
            await client.post("/v1/jobs/crawl/jobs", json=["late"])
        assert [j["input"] for j in got] == ["late"]


async def test_expired_lease_is_reclaimed_by_the_reaper_and_late_result_refused(node_config):
    definition = {"stages": [{"name": "crawl", "lease_timeout": 0.2}, "embed"]}
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        await setup_project(client, inputs=["x"], definition=definition)
        slow, fast = await register(client, nickname="slow"), await register(client, nickname="fast")
        job = (await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(slow))).json()["jobs"][0]
        tracker = node.jobs
        await tracker.wait_until(lambda: tracker.store.counts("crawl")[0]["pending"] == 1)
        again = (await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(fast))).json()["jobs"][0]
        assert again["id"] == job["id"] and again["attempts"] == 2
        r = await client.post(f"/v1/jobs/crawl/jobs/{job['id']}/complete", json={"output": "late"}, headers=auth(slow))
        assert r.status_code == 409 and r.json()["error"]["code"] == "lease_lost"
        r = await client.post(
            "/v1/jobs/crawl/complete", json={"results": [{"id": job["id"], "output": "ok"}]}, headers=auth(fast)
        )
        assert r.json()["results"][0]["status"] == "done"
        r = await client.post(
            "/v1/jobs/crawl/complete", json={"results": [{"id": job["id"], "output": "ok"}]}, headers=auth(fast)
        )
        assert r.json()["results"][0]["status"] == "already_done"
        assert (await client.get("/v1/jobs/crawl")).json()["stages"][1]["pending"] == 1
        failures = (await client.get("/v1/jobs/crawl/failures")).json()["failures"]
        assert "lease expired" in failures[0]["error"]


async def test_tracker_is_reachable_through_another_node_as_the_jobs_service(node_config):
    network = MemoryNetwork()
    async with open_node(node_config(jobs=True), memory_network=network) as tracker_node:
        addr = str(tracker_node.listen_addrs[0])
        async with (
            open_node(node_config(mode="node", bootstrap_addrs=(addr,)), memory_network=network) as edge,
            httpx.AsyncClient(
                base_url=edge.gateway_url, headers={"X-OCF-Admin-Token": edge.admin_token}, timeout=30
            ) as client,
        ):
            with trio.fail_after(30):  # wait (on table changes) until the edge knows who offers "jobs"
                while not any(
                    s.get("name") == "jobs" for e in edge.table.entries().values() for s in (e.get("service") or [])
                ):
                    await edge.table.wait_changed()
            # Admin routes are never reachable from another node, whatever token the client holds.
            r = await client.put("/v1/service/jobs/crawl", json=PROJECT)
            assert r.status_code == 403 and r.json()["error"]["code"] == "remote_forbidden", r.text
            async with httpx.AsyncClient(
                base_url=tracker_node.gateway_url, headers={"X-OCF-Admin-Token": tracker_node.admin_token}
            ) as admin:
                await setup_project(admin, inputs=["via-network"])
            stats = (await client.get("/v1/service/jobs/crawl/stats")).json()
            assert stats["stages"][0]["pending"] == 1
            r = await client.post("/v1/service/jobs/crawl/workers", json={"nickname": "far", "stage": "crawl"})
            assert r.headers["X-Computing-Node"] == str(tracker_node.peer_id)
            token = r.json()["token"]
            # The gateway drops the client's Authorization on the way: the token travels in its own header.
            worker = {"X-OCF-Worker-Token": token}
            r = await client.post("/v1/service/jobs/crawl/claim", json={"wait": 5}, headers=worker)
            assert [j["input"] for j in r.json()["jobs"]] == ["via-network"]
            r = await client.post(
                "/v1/service/jobs/crawl/complete",
                json={"results": [{"id": r.json()["jobs"][0]["id"], "output": 1}]},
                headers=worker,
            )
            assert r.json()["results"][0]["status"] == "done"


async def test_admin_token_guards_project_and_job_creation_only(node_config):
    async with (
        open_node(node_config(jobs=True, admin_token="s3cret")) as node,
        httpx.AsyncClient(base_url=node.gateway_url) as client,
    ):
        r = await client.put("/v1/jobs/crawl", json=PROJECT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "admin_token_required"
        assert r.headers["www-authenticate"].startswith("Bearer")
        r = await client.put("/v1/jobs/crawl", json=PROJECT, headers=auth("wrong"))
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
        assert (await client.put("/v1/jobs/crawl", json=PROJECT, headers=auth("s3cret"))).status_code == 201
        assert (await client.post("/v1/jobs/crawl/jobs", json=["x"])).status_code == 401
        assert (
            await client.post("/v1/jobs/crawl/jobs", json=["x"], headers={"X-OCF-Admin-Token": "s3cret"})
        ).status_code == 201
        token = await register(client)  # workers need no admin token
        assert len((await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(token))).json()["jobs"]) == 1


async def test_job_counts_in_prometheus_metrics(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        await setup_project(client)
        text = (await client.get("/metrics")).text
        assert 'ocf_jobs{project="crawl",stage="crawl",state="pending"} 3.0' in text
        assert 'ocf_jobs_results{project="crawl"} 0.0' in text
