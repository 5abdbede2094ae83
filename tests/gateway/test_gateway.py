"""One node's gateway against real local backends: /v1/_service, /v1/service, errors, limits, CORS, metrics."""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from ocf.config import ServiceSpec
from ocf.node import open_node

from .util import chat, running_mock_llm


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "code"} <= set(body["error"])
    assert response.headers["x-ocf-error-code"] == body["error"]["code"]
    return body["error"]


@pytest.fixture
async def worker(node_config):
    """A node offering an ``llm`` (models m1, m2) backed by the mock LLM; yields (node, mock, client)."""
    async with running_mock_llm(["m1", "m2"]) as mock:
        config = node_config(services=(ServiceSpec("llm", mock.port, "127.0.0.1"),))
        async with open_node(config) as node:
            await node.services.refresh()
            async with httpx.AsyncClient(base_url=node.gateway_url, timeout=30) as client:
                yield node, mock, client


async def test_local_service_forward_plain_and_streaming(worker):
    node, mock, client = worker
    r = await client.post("/v1/_service/llm/v1/chat/completions", json=chat("m1", "hello"))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "[m1] you said: hello"
    tokens = []
    async with client.stream(
        "POST", "/v1/_service/llm/v1/chat/completions", json=chat("m2", "a b c", stream=True)
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                tokens.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    assert "".join(tokens) == "[m2] you said: a b c" and len(tokens) > 5
    r = await client.get("/v1/_service/llm/v1/models?x=1")
    assert [m["id"] for m in r.json()["data"]] == ["m1", "m2"]


async def test_large_unicode_body_both_ways(worker):
    _, _, client = worker
    text = "ünïcødé ✓ 日本語 " * 30_000  # ≈ 0.7 MB of UTF-8, many transport frames
    r = await client.post("/v1/_service/llm/v1/chat/completions", json=chat("m1", text))
    assert r.json()["choices"][0]["message"]["content"] == "[m1] you said: " + text
    r = await client.post("/v1/service/llm/v1/completions", json={"model": "m2", "prompt": text})
    assert r.json()["choices"][0]["text"] == "[m2] you said: " + text


async def test_service_route_picks_this_node_and_names_it(worker):
    node, _, client = worker
    r = await client.post("/v1/service/llm/v1/chat/completions", json=chat("m2", "hi"))
    assert r.status_code == 200
    assert r.headers["x-computing-node"] == str(node.peer_id)
    r = await client.post(
        "/v1/service/llm/v1/chat/completions", json=chat("m2", "hi"), headers={"X-OCF-Identity-Group": "model=m1"}
    )
    assert r.json()["model"] == "m2"  # the header routed it (to the same backend); the body is untouched
    r = await client.get("/v1/service/llm/v1/models")
    assert [(m["id"], m["providers"]) for m in r.json()["data"]] == [
        ("m1", [str(node.peer_id)]),
        ("m2", [str(node.peer_id)]),
    ]
    r = await client.get("/v1/service/llm/v1/models/m2")
    assert r.json()["id"] == "m2"


async def test_error_shapes_and_statuses(worker):
    node, _, client = worker
    r = await client.post("/v1/service/llm/v1/chat/completions", json=chat("nope", "x"))
    err = _error(r)
    assert r.status_code == 404 and err["code"] == "model_not_found" and "m1, m2" in err["message"]
    r = await client.post("/v1/service/llm/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and _error(r)["code"] == "no_routable_identity"
    r = await client.post(
        "/v1/service/llm/v1/chat/completions", content=b"not json", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 400 and _error(r)["code"] == "no_routable_identity"
    r = await client.post(  # a model name that is no text (a lone surrogate escape): refused at the parser
        "/v1/service/llm/v1/chat/completions",
        content=b'{"model": "m1\\ud800"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and _error(r)["code"] == "no_routable_identity" and "surrogate" in _error(r)["message"]
    r = await client.post(
        "/v1/service/llm/v1/chat/completions", content=b"x", headers={"X-OCF-Identity-Group": "garbage"}
    )
    assert r.status_code == 400 and _error(r)["code"] == "bad_identity_header"
    r = await client.get("/v1/service/imaginary/x")
    assert r.status_code == 404 and "llm" in _error(r)["message"]
    r = await client.get("/v1/_service/imaginary/x")
    assert r.status_code == 404 and _error(r)["code"] == "service_not_found"
    r = await client.get("/v1/models/m9")
    assert r.status_code == 404 and _error(r)["code"] == "not_found"
    r = await client.post("/v1/health")
    assert r.status_code == 405 and _error(r)["code"] == "method_not_allowed"
    r = await client.get("/v1/p2p/not-a-peer/v1/health")
    assert r.status_code == 400 and _error(r)["code"] == "bad_peer_id"
    r = await client.get("/v1/p2p/12D3KooWN8BC61AeXAzJuCFFe9ktc7LzgtsM6tPvatBxPm3nmLwr/v1/health")
    assert r.status_code == 404 and _error(r)["code"] == "peer_not_found"
    r = await client.get(f"/v1/p2p/{node.peer_id}/v1/health", headers={"X-OCF-Hops": "8"})
    assert r.status_code == 508 and _error(r)["code"] == "loop_detected"
    r = await client.get(f"/v1/p2p/{node.peer_id}/v1/health", headers={"Origin": "https://x.example"})
    assert r.status_code == 200 and r.json()["peer_id"] == str(node.peer_id)
    assert r.headers.get_list("access-control-allow-origin") == ["*"]  # once, though dispatched twice


async def test_backend_down_is_502_and_service_route_503(worker):
    node, mock, client = worker
    mock.stop()
    r = await client.post("/v1/_service/llm/v1/chat/completions", json=chat("m1", "x"))
    assert r.status_code == 502 and _error(r)["code"] == "backend_unreachable"
    await node.services.refresh("llm")  # the registrar notices and marks it unhealthy
    assert node.services.status("llm") == "unhealthy"
    r = await client.post("/v1/service/llm/v1/chat/completions", json=chat("m1", "x"))
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    assert _error(r)["code"] == "no_provider_available"


async def test_body_limit_on_every_route(node_config):
    async with running_mock_llm(["m1"]) as mock:
        config = node_config(max_body_size=1000, services=(ServiceSpec("llm", mock.port, "127.0.0.1"),))
        async with open_node(config) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
            await node.services.refresh()
            big = chat("m1", "x" * 2000)
            for path in ("/v1/_service/llm/v1/chat/completions", "/v1/service/llm/v1/chat/completions"):
                r = await client.post(path, json=big)
                assert r.status_code == 413 and _error(r)["code"] == "body_too_large"

            async def chunked():
                for _ in range(10):
                    yield b"y" * 500

            r = await client.post("/v1/_service/llm/v1/chat/completions", content=chunked())
            assert r.status_code == 413
            assert mock.requests == 0


async def test_request_timeout_is_504(node_config):
    accepted = trio.Event()

    async def silent(stream):  # accepts, reads, never answers
        accepted.set()
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        import functools

        listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = node_config(request_timeout=0.5, services=(ServiceSpec("slow", port, "127.0.0.1"),))
        async with open_node(config) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
            r = await client.get("/v1/_service/slow/anything")
            assert accepted.is_set()
            assert r.status_code == 504 and _error(r)["code"] == "timeout"
        nursery.cancel_scope.cancel()


async def test_client_disconnect_cancels_the_backend_stream(node_config):
    async with running_mock_llm(["m1"], token_delay=0.05) as mock:
        config = node_config(services=(ServiceSpec("llm", mock.port, "127.0.0.1"),))
        async with open_node(config) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
            await node.services.refresh()
            async with client.stream(
                "POST", "/v1/service/llm/v1/chat/completions", json=chat("m1", "word " * 500, stream=True)
            ) as r:
                async for _ in r.aiter_bytes():
                    break  # read one chunk, then hang up
            with trio.fail_after(10):
                await mock.app.config["STREAM_CUT"].wait()
            assert mock.app.config["STREAMS_CUT"] == 1


async def test_cors_preflight_and_headers(worker):
    """By default a page may read public routes from any origin but write from none."""
    _, _, client = worker
    r = await client.options(
        "/v1/service/llm/v1/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = await client.post(
        "/v1/service/llm/v1/chat/completions", json=chat("m1", "x"), headers={"Origin": "https://app.example"}
    )
    assert r.status_code == 403 and _error(r)["code"] == "origin_not_allowed"
    r = await client.get("/v1/health", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    r = await client.get("/v1/service/llm/v1/models", headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


async def test_cors_restricted_origins(node_config):
    async with running_mock_llm(["m1"]) as mock:
        config = node_config(cors_origins="https://ok.example", services=(ServiceSpec("llm", mock.port, "127.0.0.1"),))
        async with open_node(config) as node, httpx.AsyncClient(base_url=node.gateway_url) as client:
            await node.services.refresh()
            path = "/v1/service/llm/v1/chat/completions"
            r = await client.options(
                path,
                headers={
                    "Origin": "https://ok.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization, content-type",
                },
            )
            assert (
                r.status_code == 204
                and r.headers["access-control-allow-origin"] == "https://ok.example"
                and r.headers["vary"] == "Origin"
            )
            assert (
                "POST" in r.headers["access-control-allow-methods"]
                and r.headers["access-control-allow-headers"] == "authorization, content-type"
            )
            r = await client.options(
                path,
                headers={
                    "Origin": "https://ok.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "x-anything",
                },
            )
            assert r.status_code == 403  # only the headers the allowlist permits
            r = await client.post(path, json=chat("m1", "x"), headers={"Origin": "https://ok.example"})
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ok.example"
            assert "X-Computing-Node" in r.headers["access-control-expose-headers"]
            r = await client.get("/v1/health", headers={"Origin": "https://ok.example"})
            assert r.headers["access-control-allow-origin"] == "https://ok.example" and r.headers["vary"] == "Origin"
            r = await client.get("/v1/health", headers={"Origin": "https://evil.example"})
            assert r.headers["access-control-allow-origin"] == "*"  # a public read
            r = await client.post(path, json=chat("m1", "x"), headers={"Origin": "https://evil.example"})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


async def test_metrics_per_node_registry(worker, node_config):
    node, _, client = worker
    await client.post("/v1/service/llm/v1/chat/completions", json=chat("m1", "x"))
    await client.get("/v1/health")
    await client.get("/v1/nothing-here")
    async with open_node(node_config()) as other, httpx.AsyncClient(base_url=other.gateway_url) as other_client:
        other_text = (await other_client.get("/metrics")).text
    text = (await client.get("/metrics")).text
    assert 'ocf_http_requests_total{method="POST",route="/v1/service/<service>/<path>",status="200"} 1.0' in text
    assert 'ocf_http_requests_total{method="GET",route="/v1/health",status="200"} 1.0' in text
    assert 'route="unmatched",status="404"' in text
    assert "ocf_forward_latency_seconds_bucket" in text and 'kind="backend"' in text
    assert f'ocf_forward_in_flight{{provider="{node.peer_id}"}} 0.0' in text
    assert "ocf_connected_peers 0.0" in text
    assert "/v1/service/" not in other_text  # another node in the same process has its own numbers


async def test_internal_service_is_served_by_the_own_gateway(worker):
    node, _, client = worker
    node.services.register_internal("status", "/v1")
    r = await client.get("/v1/_service/status/health")
    assert r.status_code == 200 and r.json()["peer_id"] == str(node.peer_id)
    await node.services.wait_published()
    assert "status" in [s["name"] for s in node.services.records()]
    r = await client.get("/v1/service/status/health")
    assert r.status_code == 200 and r.headers["x-computing-node"] == str(node.peer_id)


async def test_response_arriving_in_one_piece_is_relayed_whole(node_config):
    """A backend that writes a whole chunked response at once: every chunk must reach the client."""
    chunks = [f"data: {i}\n\n".encode() for i in range(50)]
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    wire += b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"

    async def backend(stream):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some()
        await stream.send_all(wire)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        import functools

        listeners = await nursery.start(functools.partial(trio.serve_tcp, backend, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with (
            open_node(node_config(services=(ServiceSpec("sse", port, "127.0.0.1"),))) as node,
            httpx.AsyncClient(base_url=node.gateway_url) as client,
        ):
            r = await client.get("/v1/_service/sse/events")
            assert r.status_code == 200 and r.content == b"".join(chunks)
        nursery.cancel_scope.cancel()


async def test_concurrent_forwards_per_provider_are_limited(node_config):
    async with running_mock_llm(["m1"]) as mock:
        config = node_config(max_forwards_per_peer=1, services=(ServiceSpec("llm", mock.port, "127.0.0.1"),))
        async with open_node(config) as node, httpx.AsyncClient(base_url=node.gateway_url, timeout=30) as client:
            await node.services.refresh()
            release, gate = trio.open_memory_channel(0)
            mock.app.config["TOKEN_GATE"] = gate
            async with client.stream(
                "POST", "/v1/service/llm/v1/chat/completions", json=chat("m1", "hold", stream=True)
            ) as held:
                assert held.status_code == 200  # its answer is held open by the gate
                r = await client.post("/v1/service/llm/v1/chat/completions", json=chat("m1", "second"))
                assert (
                    r.status_code == 503 and _error(r)["code"] == "providers_busy" and r.headers["retry-after"] == "1"
                )
                mock.app.config["TOKEN_GATE"] = None
                await release.aclose()
            r = await client.post("/v1/service/llm/v1/chat/completions", json=chat("m1", "third"))
            assert r.status_code == 200
