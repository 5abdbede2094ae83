"""Web pages cannot change a node: CORS allowlist for writes, foreign-origin writes refused, 415 on non-JSON bodies."""

from __future__ import annotations

import httpx
import pytest

from ocf.node import open_node

pytestmark = pytest.mark.timeout(60)

EVIL = "https://evil.example"


async def test_preflight_for_a_foreign_origin_is_refused(node_config):
    async with open_node(node_config(jobs=True)) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
        for path, method in (
            ("/v1/dnt/_node", "DELETE"),
            ("/v1/dnt/_node", "POST"),
            ("/v1/jobs/p", "PUT"),
            ("/v1/service/llm/v1/chat/completions", "POST"),
        ):
            r = await client.options(
                path,
                headers={
                    "Origin": EVIL,
                    "Access-Control-Request-Method": method,
                    "Access-Control-Request-Headers": "content-type, x-ocf-admin-token",
                },
            )
            assert r.status_code == 403, (path, method)
            assert not any(h.startswith("access-control-allow") for h in r.headers)


async def test_a_page_of_a_foreign_origin_cannot_write_even_without_preflight(node_config):
    async with open_node(node_config(jobs=True)) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
        before = node.table.own_entry()
        # A form post or a "simple" fetch skips the preflight; the browser still says where it comes from.
        for method, path in (
            ("POST", "/v1/dnt/_node"),
            ("DELETE", "/v1/dnt/_node"),
            ("PUT", "/v1/jobs/p"),
            ("POST", "/v1/jobs/p/workers"),
        ):
            r = await client.request(
                method,
                path,
                content=b'{"status": "left"}',
                headers={"Origin": EVIL, "Content-Type": "text/plain", "X-OCF-Admin-Token": node.admin_token},
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        assert node.table.own_entry()["service"] == before["service"] and node.table.own_entry().get(
            "status"
        ) == before.get("status")
        assert node.jobs.store.projects() == []
        # The gateway's own pages (same origin) may write.
        r = await client.post(
            "/v1/dnt/_node",
            json={"role": ["x"]},
            headers={"Origin": node.gateway_url, "X-OCF-Admin-Token": node.admin_token},
        )
        assert r.status_code == 200


async def test_json_routes_answer_415_to_other_body_types(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        assert (await client.put("/v1/jobs/p", json={"stages": ["one"]})).status_code == 201
        cases = [
            ("POST", "/v1/dnt/_node", b'{"role": ["x"]}'),
            ("PUT", "/v1/jobs/q", b'{"stages": ["one"]}'),
            ("POST", "/v1/jobs/p/jobs", b'["a"]'),
            ("POST", "/v1/jobs/p/workers", b'{"stage": "one"}'),
            ("POST", "/v1/jobs/p/claim", b"{}"),
        ]
        for ctype in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain; charset=utf-8",
        ):
            for method, path, body in cases:
                r = await client.request(method, path, content=body, headers={"Content-Type": ctype})
                assert r.status_code == 415, (ctype, path)
                assert r.json()["error"]["code"] == "unsupported_media_type"
        assert node.table.own_entry().get("role") != ["x"] and [p.name for p in node.jobs.store.projects()] == ["p"]
        r = await client.post(
            "/v1/jobs/p/jobs", content=b'"a"\n"b"\n', headers={"Content-Type": "application/x-ndjson"}
        )
        assert r.status_code == 201  # JSON lines stay accepted where they always were
        r = await client.post(
            "/v1/dnt/_node", content=b'{"role": ["y"]}', headers={"Content-Type": "application/json; charset=utf-8"}
        )
        assert r.status_code == 200
