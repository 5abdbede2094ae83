"""Gateways of two nodes on an in-memory network: /v1/p2p forwarding over /libp2p-http streams."""

from __future__ import annotations

import contextlib
import json

import httpx
import trio

from ocf.config import ServiceSpec
from ocf.node import open_node
from ocf.transport import MemoryNetwork

from ..gateway.util import chat, running_mock_llm


@contextlib.asynccontextmanager
async def pair(node_config, mock, **worker_overrides):
    """A standalone dispatcher and a worker (offering the mock as ``llm``) bootstrapped to it."""
    net = MemoryNetwork()
    async with open_node(node_config(mode="standalone"), memory_network=net) as dispatcher:
        worker_config = node_config(
            mode="node",
            bootstrap_addrs=(str(dispatcher.listen_addrs[0]),),
            services=(ServiceSpec("llm", mock.port, "127.0.0.1"),),
            **worker_overrides,
        )
        async with open_node(worker_config, memory_network=net) as worker:
            await worker.bootstrap.wait_connected()
            await worker.services.refresh()
            async with httpx.AsyncClient(
                base_url=dispatcher.gateway_url, headers={"X-OCF-Admin-Token": dispatcher.admin_token}, timeout=30
            ) as client:
                yield dispatcher, worker, client


def sse_contents(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    return out


async def test_p2p_reaches_the_other_gateway(node_config):
    async with running_mock_llm(["m1"]) as mock, pair(node_config, mock) as (dispatcher, worker, client):
        r = await client.get(f"/v1/p2p/{worker.peer_id}/v1/health")
        assert r.status_code == 200 and r.json()["peer_id"] == str(worker.peer_id)
        r = await client.post(
            f"/v1/p2p/{worker.peer_id}/v1/_service/llm/v1/chat/completions?trace=1", json=chat("m1", "hi")
        )
        assert r.json()["choices"][0]["message"]["content"] == "[m1] you said: hi"
        r = await client.get(f"/v1/p2p/{worker.peer_id}/v1/no-such-route")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        # the worker's gateway relays back to the dispatcher's: a p2p round trip
        async with httpx.AsyncClient(
            base_url=worker.gateway_url, headers={"X-OCF-Admin-Token": worker.admin_token}
        ) as wclient:
            r = await wclient.get(f"/v1/p2p/{dispatcher.peer_id}/v1/health")
            assert r.json()["peer_id"] == str(dispatcher.peer_id)


async def test_streamed_tokens_cross_two_hops_one_by_one(node_config):
    async with running_mock_llm(["m1"]) as mock, pair(node_config, mock) as (_, worker, client):
        release, gate = trio.open_memory_channel(0)
        mock.app.config["TOKEN_GATE"] = gate
        got = []
        path = f"/v1/p2p/{worker.peer_id}/v1/_service/llm/v1/chat/completions"
        async with client.stream("POST", path, json=chat("m1", "one two three", stream=True)) as r:
            lines = r.aiter_lines()
            with trio.fail_after(10):
                await release.send(None)  # the role chunk
                for _ in range(6):  # then each token only after the previous one reached us
                    await release.send(None)
                    while True:
                        line = await lines.__anext__()
                        if line.startswith("data: "):
                            got.extend(sse_contents([line]))
                            break
                mock.app.config["TOKEN_GATE"] = None
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_drain_gate, release)
                    rest = [line async for line in lines]
                    nursery.cancel_scope.cancel()
        text = "".join(got + sse_contents(rest))
        assert text == "[m1] you said: one two three"
        assert rest[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in rest


async def _drain_gate(release):
    while True:
        await release.send(None)


async def test_large_unicode_bodies_and_concurrent_clients(node_config):
    async with running_mock_llm(["m1"]) as mock, pair(node_config, mock) as (_, worker, client):
        path = f"/v1/p2p/{worker.peer_id}/v1/_service/llm/v1/chat/completions"
        text = "多くのフレーム 🚀 " * 40_000  # ≈ 0.9 MB: far more than one transport frame or window
        r = await client.post(path, json=chat("m1", text))
        assert r.json()["choices"][0]["message"]["content"] == "[m1] you said: " + text

        async def chunked():  # a streamed request body of unknown length
            body = json.dumps(chat("m1", text)).encode()
            for i in range(0, len(body), 70_000):
                yield body[i : i + 70_000]

        r = await client.post(path, content=chunked(), headers={"content-type": "application/json"})
        assert r.json()["choices"][0]["message"]["content"] == "[m1] you said: " + text

        results = {}

        async def one(i: int) -> None:
            r = await client.post(path, json=chat("m1", f"client {i} ✓"))
            results[i] = r.json()["choices"][0]["message"]["content"]

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
        assert results == {i: f"[m1] you said: client {i} ✓" for i in range(40)}


async def test_client_disconnect_cancels_the_backend_two_hops_away(node_config):
    async with running_mock_llm(["m1"], token_delay=0.05) as mock, pair(node_config, mock) as (_, worker, client):
        path = f"/v1/p2p/{worker.peer_id}/v1/_service/llm/v1/chat/completions"
        async with client.stream("POST", path, json=chat("m1", "word " * 500, stream=True)) as r:
            async for _ in r.aiter_bytes():
                break
        with trio.fail_after(10):
            await mock.app.config["STREAM_CUT"].wait()


async def test_worker_dying_mid_stream_cuts_the_response_short(node_config):
    async with running_mock_llm(["m1"], token_delay=0.02) as mock:
        net = MemoryNetwork()
        async with (
            open_node(node_config(mode="standalone"), memory_network=net) as dispatcher,
            httpx.AsyncClient(
                base_url=dispatcher.gateway_url, headers={"X-OCF-Admin-Token": dispatcher.admin_token}, timeout=30
            ) as client,
        ):
            worker_config = node_config(
                mode="node",
                bootstrap_addrs=(str(dispatcher.listen_addrs[0]),),
                services=(ServiceSpec("llm", mock.port, "127.0.0.1"),),
            )
            outcome = []
            async with trio.open_nursery() as nursery:
                stopped = trio.CancelScope()

                async def run_worker(task_status=trio.TASK_STATUS_IGNORED):
                    with stopped:
                        async with open_node(worker_config, memory_network=net) as worker:
                            await worker.bootstrap.wait_connected()
                            task_status.started(worker)
                            await trio.sleep_forever()

                worker = await nursery.start(run_worker)
                path = f"/v1/p2p/{worker.peer_id}/v1/_service/llm/v1/chat/completions"
                try:
                    async with client.stream("POST", path, json=chat("m1", "word " * 200, stream=True)) as r:
                        assert r.status_code == 200
                        async for _ in r.aiter_bytes():
                            stopped.cancel()  # the worker node goes away mid-answer
                except httpx.RemoteProtocolError as exc:
                    outcome.append(exc)
            assert outcome, "the client must see the answer cut short, not a clean end"
            r = await client.get("/v1/health")  # and the dispatcher is fine afterwards
            assert r.status_code == 200


async def test_remote_peer_may_not_edit_our_entry(node_config):
    async with running_mock_llm(["m1"]) as mock, pair(node_config, mock) as (_, worker, client):
        for method in ("POST", "DELETE"):
            for path in (
                f"/v1/p2p/{worker.peer_id}/v1/dnt/_node",
                f"/v1/p2p/{worker.peer_id}/v1/p2p/{worker.peer_id}/v1/dnt/_node/",
            ):
                r = await client.request(method, path, json={"role": ["x"]})
                assert r.status_code == 403 and r.json()["error"]["code"] == "remote_forbidden", path
        assert worker.table.own_entry()["role"] != ["x"]
        async with httpx.AsyncClient(
            base_url=worker.gateway_url, headers={"X-OCF-Admin-Token": worker.admin_token}
        ) as local:  # the node's own operator may
            r = await local.post("/v1/dnt/_node", json={"role": ["x"]})
            assert r.status_code == 200 and worker.table.own_entry()["role"] == ["x"]


async def test_p2p_loop_is_cut(node_config):
    async with running_mock_llm(["m1"]) as mock, pair(node_config, mock) as (dispatcher, worker, client):
        # dispatcher -> worker -> dispatcher -> worker ... each hop adds one to X-OCF-Hops
        d, w = dispatcher.peer_id, worker.peer_id
        path = "".join(f"/v1/p2p/{w}/v1/p2p/{d}" for _ in range(5)) + "/v1/health"
        r = await client.get(path)
        assert r.status_code == 508 and r.json()["error"]["code"] == "loop_detected"
        r = await client.get(f"/v1/p2p/{w}/v1/p2p/{d}/v1/health")
        assert r.status_code == 200 and r.json()["peer_id"] == str(d)
