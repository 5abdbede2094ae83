"""Strict framing and the connection cap on a real node's gateway port: what a hostile client is told."""

from __future__ import annotations

import json

import pytest
import trio

from ocf.config import ServiceSpec
from ocf.node import open_node

from ..gateway.util import chat, running_mock_llm
from ._http_attacker import connect, get, read_until_close, status_of


def _addr(node) -> tuple[str, int]:
    host, port = node.gateway_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@pytest.fixture
async def gateway(node_config):
    async with open_node(node_config()) as node:
        yield _addr(node)


CHUNKED_POST = (
    b"POST /v1/health HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
)


@pytest.mark.parametrize(
    "raw, status, code",
    [
        (CHUNKED_POST + b"2\n{}\r\n0\r\n\r\n", 400, "bad_request"),  # bare LF after a chunk size
        (CHUNKED_POST + b"2\r\n{}\n0\r\n\r\n", 400, "bad_request"),  # bare LF after chunk data
        (CHUNKED_POST + b"0\r\n\n", 400, "bad_request"),  # bare LF ending the trailer section
        (b"get /v1/health HTTP/1.1\r\nHost: t\r\n\r\n", 501, "method_not_implemented"),  # methods are case-sensitive
        (b"TRACE /v1/health HTTP/1.1\r\nHost: t\r\n\r\n", 501, "method_not_implemented"),
        (b"GET /v1/health HTTP/1.9\r\nHost: t\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /v1/health HTTP/2.0\r\nHost: t\r\n\r\n", 505, "http_version_not_supported"),
    ],
)
async def test_loose_framing_is_refused_before_the_app(gateway, raw, status, code):
    reply = await read_until_close(await connect(gateway, raw))
    assert status_of(reply) == status
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"connection: close" in head and json.loads(body)["error"]["code"] == code


async def test_no_redirect_names_the_clients_host(gateway):
    reply = await read_until_close(
        await connect(gateway, b"GET /v1//health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    )
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert status_of(reply) != 308 and b"evil.example" not in head and b"\r\nlocation:" not in head


async def test_gateway_health_answers_while_streams_fill_the_cap(node_config):
    """The node's own cap: every connection streams a slow completion, yet /v1/health answers."""
    async with running_mock_llm(["m1"], token_delay=0.5) as mock:
        config = node_config(
            services=(ServiceSpec("llm", mock.port, "127.0.0.1"),), http_max_connections=2, http_reserve_connections=1
        )
        async with open_node(config) as node:
            await node.services.refresh()
            addr = _addr(node)
            body = json.dumps(chat("m1", "one two three four five six seven eight", stream=True)).encode()
            request = (
                b"POST /v1/_service/llm/v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
            )
            streams = [await connect(addr, request) for _ in range(2)]
            for stream in streams:  # both responses have started: the cap is full of busy connections
                with trio.fail_after(10):
                    assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
            with trio.fail_after(5):
                reply = await read_until_close(await connect(addr, get("/v1/health")))
            assert status_of(reply) == 200 and b'"status"' in reply
            reply = await read_until_close(await connect(addr, get("/v1/dnt/table")))
            assert status_of(reply) == 503  # the reserve serves the health check only
            for stream in streams:
                await stream.aclose()


async def test_refusals_are_counted_on_metrics(gateway):
    for raw in (
        b"get / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET / HTTP/1.9\r\nHost: t\r\n\r\n",
    ):
        await read_until_close(await connect(gateway, raw))
    reply = await read_until_close(await connect(gateway, get("/metrics", close=True)))
    assert status_of(reply) == 200
    text = reply.partition(b"\r\n\r\n")[2].decode()
    assert 'ocf_http_refusals_total{reason="501 method_not_implemented"} 2.0' in text
    assert 'ocf_http_refusals_total{reason="505 http_version_not_supported"} 1.0' in text
    assert 'ocf_http_connections{admission="normal"} 1.0' in text  # this one
    assert "ocf_http_connection_cap " in text  # 1024 unless the descriptor limit could not fit it
