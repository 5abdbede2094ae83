"""The admin token, on by default: created on first start, needed by every state-changing admin route."""

from __future__ import annotations

import logging
import stat

import httpx
import pytest

from ocf.gateway.ratelimit import MAX_CLIENTS, RateLimiter
from ocf.node import open_node

pytestmark = pytest.mark.timeout(60)

PROJECT = {"stages": ["one"]}


def _openai_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"])
    return body["error"]


async def test_first_start_writes_a_private_token_and_logs_where_not_what(node_config, caplog):
    caplog.set_level(logging.INFO)
    config = node_config(jobs=True)
    async with open_node(config) as node:
        path = config.data_dir / "admin.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) >= 32 and node.admin_token == token
    assert any(str(path) in r.getMessage() for r in caplog.records)
    assert not any(token in r.getMessage() for r in caplog.records)
    async with open_node(config) as node:  # a restart keeps it
        assert node.admin_token == token


async def test_admin_routes_answer_401_without_the_token_and_work_with_it(node_config):
    async with open_node(node_config(jobs=True)) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
        calls = [
            ("POST", "/v1/dnt/_node", {"role": ["x"]}),
            ("DELETE", "/v1/dnt/_node", None),
            ("PUT", "/v1/jobs/p", PROJECT),
            ("POST", "/v1/jobs/p/jobs", ["a"]),
        ]
        for method, path, body in calls:
            for headers in ({}, {"X-OCF-Admin-Token": "wrong"}, {"Authorization": "Bearer wrong"}):
                r = await client.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.headers["www-authenticate"].startswith("Bearer ")
                assert _openai_error(r)["code"] in ("admin_token_required", "invalid_admin_token")
        assert node.jobs.store.projects() == [] and node.table.own_entry().get("role") != ["x"]
        good = ({"X-OCF-Admin-Token": node.admin_token}, {"Authorization": f"Bearer {node.admin_token}"})
        for i, (method, path, body) in enumerate(calls):
            r = await client.request(method, path, json=body, headers=good[i % 2])
            assert r.status_code in (200, 201), (method, path, r.text)
        # Reads stay open, and an unknown project's error names no other project.
        r = await client.get("/v1/jobs/nope/stats")
        assert r.status_code == 404 and "'p'" not in r.text and "projects" not in r.json()["error"]["message"]


async def test_admin_calls_are_rate_limited_per_client(node_config):
    async with (
        open_node(node_config(admin_burst=5, admin_rate=0.01)) as node,
        httpx.AsyncClient(base_url=node.gateway_url) as client,
    ):
        statuses = [
            (
                await client.post("/v1/dnt/_node", json={"role": ["x"]}, headers={"X-OCF-Admin-Token": "guess"})
            ).status_code
            for _ in range(20)
        ]
        assert statuses == [401] * 5 + [429] * 15  # brute force gets 5 tries, then waits
        r = await client.post("/v1/dnt/_node", json={"role": ["x"]}, headers={"X-OCF-Admin-Token": node.admin_token})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert _openai_error(r)["type"] == "rate_limit_error"
        assert (await client.get("/v1/health")).status_code == 200  # reads are not limited


async def test_worker_registration_is_rate_limited_per_client(node_config):
    async with (
        open_node(node_config(jobs=True, register_burst=3, register_rate=0.01)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        assert (await client.put("/v1/jobs/p", json=PROJECT)).status_code == 201
        statuses = [
            (await client.post("/v1/jobs/p/workers", json={"nickname": f"w{i}", "stage": "one"})).status_code
            for i in range(5)
        ]
        assert statuses == [201, 201, 201, 429, 429]
        r = await client.get(
            "/v1/jobs/p/api/new", params={"stage": "a", "nickname": "compat"}
        )  # the original's route shares the budget
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert node.jobs.store.stats("p", node.jobs.clock())["workers"]["total"] == 3


def test_rate_limiter_memory_is_bounded_under_many_addresses():
    limiter = RateLimiter(1.0, 5)
    for i in range(50_000):
        limiter.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", i * 1e-4)
    assert len(limiter) <= MAX_CLIENTS
    assert (
        limiter.take("a", 0.0) == 0.0
        and all(limiter.take("a", 0.0) == 0.0 for _ in range(4))
        and limiter.take("a", 0.0) > 0
    )
