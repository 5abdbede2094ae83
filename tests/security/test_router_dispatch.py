"""Quart dispatches from the router's Route: it does not match the path a second time."""

from __future__ import annotations

import json

import trio

from ocf.gateway.router import classify
from ocf.node import open_node


async def test_quart_serves_the_route_it_is_given_not_the_path(node_config):
    async with open_node(node_config(jobs=True)) as node:
        inner = node.gateway.app.asgi_app.inner  # Quart itself, below the gateway's ASGI layer
        route = classify("GET", b"/v1/jobs/from-route/stats")
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/v1/health",
            "raw_path": b"/v1/health",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"x")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 2),
            "extensions": {},
            "ocf.route": route,
        }
        sent: list[dict] = []
        done = trio.Event()
        calls = 0

        async def receive() -> dict:
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()  # as a server does: the client is gone once the answer is out
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done.set()

        with trio.fail_after(10):
            await inner(scope, receive, send)
        status = sent[0]["status"]
        body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        # The stats view ran for the route's project (unknown: 404), not the health view of the path.
        assert status == 404 and body["error"]["code"] == "unknown_project" and "from-route" in body["error"]["message"]
