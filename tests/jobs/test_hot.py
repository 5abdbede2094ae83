"""claim, complete and heartbeat as raw ASGI (ocf.jobs.hot): the edges the Quart routes used to cover."""

from __future__ import annotations

import httpx
import pytest
import trio

from ocf.node import open_node

from .test_http import auth, register, setup_project

pytestmark = pytest.mark.timeout(60)


async def test_other_methods_get_405_with_allow_and_options_204(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        for path in ("/v1/jobs/crawl/claim", "/v1/jobs/crawl/complete", "/v1/jobs/crawl/heartbeat"):
            r = await client.get(path)
            assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"POST", "OPTIONS"}, r.text
            assert r.json()["error"]["code"] == "method_not_allowed"
            r = await client.request("OPTIONS", path)
            assert r.status_code == 204 and "POST" in r.headers["allow"]
        r = await client.post("/v1/jobs/crawl/claim/extra")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


async def test_bad_bodies_get_clear_400s_and_oversize_413(node_config):
    async with (
        open_node(node_config(jobs=True, max_body_size=1000)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        await setup_project(client)
        token = await register(client)
        cases = [
            ({"content": b"{not json"}, 400, "bad_json"),
            ({"content": b"\xff\xfe"}, 400, "bad_json"),
            ({"json": {"wait": 3600}}, 400, "bad_wait"),
            ({"json": {"wait": "soon"}}, 400, "bad_wait"),
            ({"json": {"pad": "x" * 2000}}, 413, "body_too_large"),  # declared length over the limit
        ]
        for kwargs, status, code in cases:
            r = await client.post("/v1/jobs/crawl/claim", headers=auth(token), **kwargs)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (kwargs, r.text)

        async def chunked():  # no Content-Length: the limit is enforced while reading
            for _ in range(5):
                yield b" " * 400

        r = await client.post("/v1/jobs/crawl/complete", headers=auth(token), content=chunked())
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        # Nothing above leased or completed anything.
        assert (await client.get("/v1/jobs/crawl")).json()["stages"][0]["pending"] == 3
        r = await client.post("/v1/jobs/crawl/claim", headers=auth(token), json={"max": 3})
        assert len(r.json()["jobs"]) == 3


async def test_node_without_tracker_answers_404(node_config):
    async with (
        open_node(node_config()) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        r = await client.post("/v1/jobs/crawl/claim", json={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_tracker"


async def test_requests_are_counted_by_route_template(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        await setup_project(client)
        token = await register(client)
        await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(token))
        await client.post("/v1/jobs/crawl/heartbeat", json={}, headers=auth("forged"))
        text = (await client.get("/metrics")).text
        assert 'ocf_http_requests_total{method="POST",route="/v1/jobs/<project>/claim",status="200"} 1.0' in text
        assert 'ocf_http_requests_total{method="POST",route="/v1/jobs/<project>/heartbeat",status="404"} 1.0' in text


async def test_long_polling_claimer_that_hangs_up_leases_nothing(node_config):
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}) as client,
    ):
        await setup_project(client, inputs=[])
        gone, present = await register(client, nickname="gone"), await register(client, nickname="present")
        tracker = node.jobs
        port = int(node.gateway_url.rsplit(":", 1)[1])
        body = b'{"wait": 30}'
        request = (
            f"POST /v1/jobs/crawl/claim HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gone}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        sock = await trio.open_tcp_stream("127.0.0.1", port)
        await sock.send_all(request)
        with trio.fail_after(10):
            await tracker.wait_until(lambda: tracker.waiting_claims == 1)
            assert "ocf_jobs_waiting_claims 1.0" in (await client.get("/metrics")).text
            await sock.aclose()
            await tracker.wait_until(lambda: tracker.waiting_claims == 0)
        await client.post("/v1/jobs/crawl/jobs", json=["only"])
        r = await client.post("/v1/jobs/crawl/claim", json={}, headers=auth(present))
        assert [j["input"] for j in r.json()["jobs"]] == ["only"]
        assert tracker.store.held_jobs("crawl", gone, tracker.clock())[0] == []
