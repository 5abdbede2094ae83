"""Seed 000's headline: an OpenAI client pointed at a dispatcher reaches whichever worker serves the model.

One in-memory network in one nursery: a standalone dispatcher and three
workers (m1 only, m2 only, both), each offering a real mock LLM over HTTP as
``llm``; the official ``openai`` package talks to the dispatcher's gateway.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import attrs
import httpx
import openai
import pytest
import trio

from ocf.config import ServiceSpec
from ocf.node import open_node
from ocf.transport import MemoryNetwork

from ..gateway.util import MockLLM, chat, running_mock_llm

pytestmark = pytest.mark.timeout(120)


@attrs.define
class Worker:
    node: object
    mock: MockLLM
    stop: trio.CancelScope

    @property
    def peer(self) -> str:
        return str(self.node.peer_id)


@attrs.define
class Net:
    dispatcher: object
    workers: list[Worker]
    url: str

    def openai(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1/service/llm/v1", api_key="any", max_retries=0, **kw)


def llm_models(entries: dict, peer: str) -> set[str]:
    entry = entries.get(peer) or {}
    for service in entry.get("service") or []:
        if service.get("name") == "llm" and service.get("status") == "healthy":
            return {g.split("=", 1)[1] for g in service.get("identity_group", []) if g.startswith("model=")}
    return set()


async def wait_table(node, predicate) -> None:
    """Wait (on table change events, no polling) until ``predicate(entries)`` holds on ``node``."""
    with trio.fail_after(30):
        while not predicate(node.table.entries()):
            await node.table.wait_changed()


@contextlib.asynccontextmanager
async def network(node_config, models_per_worker: list[list[str]]) -> AsyncIterator[Net]:
    net = MemoryNetwork()
    async with (
        open_node(node_config(mode="standalone"), memory_network=net) as dispatcher,
        trio.open_nursery() as nursery,
    ):
        addr = str(dispatcher.listen_addrs[0])
        workers: list[Worker] = []

        async def run_worker(models, task_status=trio.TASK_STATUS_IGNORED):
            stop = trio.CancelScope()
            with stop:
                async with running_mock_llm(models) as mock:
                    config = node_config(
                        mode="node", bootstrap_addrs=(addr,), services=(ServiceSpec("llm", mock.port, "127.0.0.1"),)
                    )
                    async with open_node(config, memory_network=net) as node:
                        await node.bootstrap.wait_connected()
                        await node.services.refresh()
                        task_status.started(Worker(node, mock, stop))
                        await trio.sleep_forever()

        for models in models_per_worker:
            workers.append(await nursery.start(run_worker, models))
        await wait_table(
            dispatcher,
            lambda entries: all(
                llm_models(entries, w.peer) == set(m) for w, m in zip(workers, models_per_worker, strict=True)
            ),
        )
        try:
            yield Net(dispatcher, workers, dispatcher.gateway_url)
        finally:
            nursery.cancel_scope.cancel()


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


async def test_openai_client_routes_by_model_and_streams(node_config):
    async with network(node_config, [["m1"], ["m2"], ["m1", "m2"]]) as net:
        w1, w2, w3 = net.workers
        client = net.openai()

        def ask(model: str, text: str):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": text}]
            )
            return raw.headers["x-computing-node"], raw.parse().choices[0].message.content

        # Load spreads over every provider of the model. Picks are weighted by each link's measured RTT,
        # and on a loaded machine one loopback link may measure 100 ms to another's 1: that provider then
        # draws a seventh of the traffic (12 requests for m2 once all went to w3). So: ask until each
        # provider has served (bounded), at least 24 times.
        seen = {"m1": set(), "m2": set()}
        every = {"m1": {w1.peer, w3.peer}, "m2": {w2.peer, w3.peer}}
        for i in range(200):
            model = "m1" if i % 2 else "m2"
            node, content = await in_thread(ask, model, f"hello {i} — ünïcode ✓")
            assert content == f"[{model}] you said: hello {i} — ünïcode ✓"
            seen[model].add(node)
            if i >= 23 and seen == every:
                break
        assert seen == every

        def stream(model: str) -> list[str]:
            parts = []
            for chunk in client.chat.completions.create(
                model=model, stream=True, messages=[{"role": "user", "content": "streaming through two hops"}]
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
            return parts

        parts = await in_thread(stream, "m2")
        assert (
            "".join(parts) == "[m2] you said: streaming through two hops" and len(parts) == 7
        )  # one SSE event per word

        def complete() -> str:
            return client.completions.create(model="m1", prompt="plain completion").choices[0].text

        assert await in_thread(complete) == "[m1] you said: plain completion"


async def test_models_aggregated_across_the_network(node_config):
    async with network(node_config, [["m1"], ["m2"], ["m1", "m2"]]) as net:
        w1, w2, w3 = net.workers
        models = await in_thread(lambda: net.openai().models.list())
        by_id = {m.id: m for m in models.data}
        assert sorted(by_id) == ["m1", "m2"]
        assert sorted(by_id["m1"].providers) == sorted([w1.peer, w3.peer])
        model = await in_thread(lambda: net.openai().models.retrieve("m2"))
        assert model.id == "m2"


async def test_errors_reach_the_openai_client_typed(node_config):
    async with network(node_config, [["m1"]]) as net:
        client = net.openai()
        with pytest.raises(openai.NotFoundError) as info:
            await in_thread(
                lambda: client.chat.completions.create(model="gpt-99", messages=[{"role": "user", "content": "x"}])
            )
        assert info.value.status_code == 404
        assert info.value.body["code"] == "model_not_found" and "m1" in info.value.body["message"]
        async with httpx.AsyncClient(base_url=net.url) as http:
            r = await http.post("/v1/service/llm/v1/chat/completions", json={"messages": []})
            assert r.status_code == 400 and r.json()["error"]["code"] == "no_routable_identity"
            r = await http.post("/v1/service/tts/v1/speak", json={"model": "m1"})
            assert (
                r.status_code == 404
                and r.json()["error"]["code"] == "service_not_found"
                and "llm" in r.json()["error"]["message"]
            )


async def test_failover_when_workers_die_then_503(node_config):
    async with network(node_config, [["m1"], ["m2"], ["m1", "m2"]]) as net:
        w1, w2, w3 = net.workers
        client = net.openai()

        def ask(model: str) -> str:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "x"}]
            )
            return raw.headers["x-computing-node"]

        used = [await in_thread(ask, "m2") for _ in range(4)]
        w3.stop.cancel()  # a worker dies mid-run, without saying goodbye to the table first
        for _ in range(10):
            assert await in_thread(ask, "m2") == w2.peer  # every request still answered
        assert set(used) <= {w2.peer, w3.peer}
        w2.stop.cancel()
        with pytest.raises(openai.APIStatusError) as info:
            await in_thread(ask, "m2")
        assert info.value.status_code == 503
        assert int(info.value.response.headers["retry-after"]) > 0
        assert await in_thread(ask, "m1") == w1.peer  # other models are unaffected


async def test_backend_down_on_a_live_worker_fails_over(node_config):
    async with network(node_config, [["m1"], ["m1"]]) as net:
        a, b = net.workers
        a.mock.stop()  # its node is fine, its LLM is gone; no registrar poll has noticed yet
        client = net.openai()

        def ask() -> str:
            raw = client.chat.completions.with_raw_response.create(
                model="m1", messages=[{"role": "user", "content": "x"}]
            )
            return raw.headers["x-computing-node"]

        assert {await in_thread(ask) for _ in range(8)} == {b.peer}
        await a.node.services.refresh()  # the registrar marks it unhealthy; the dispatcher learns it
        await wait_table(net.dispatcher, lambda entries: not llm_models(entries, a.peer))


async def test_concurrent_clients_and_large_bodies(node_config):
    async with (
        network(node_config, [["m1"], ["m2"], ["m1", "m2"]]) as net,
        httpx.AsyncClient(base_url=net.url, timeout=60) as http,
    ):
        results = {}

        async def one(i: int) -> None:
            model = ("m1", "m2")[i % 2]
            r = await http.post("/v1/service/llm/v1/chat/completions", json=chat(model, f"client {i} 日本"))
            results[i] = (r.json()["choices"][0]["message"]["content"], r.headers["x-computing-node"])

        async with trio.open_nursery() as nursery:
            for i in range(48):
                nursery.start_soon(one, i)
        for i, (content, _) in results.items():
            assert content == f"[{('m1', 'm2')[i % 2]}] you said: client {i} 日本"
        assert len({node for _, node in results.values()}) == 3

        text = "ünïcödé 🚀 " * 30_000  # ≈ 0.5 MB, larger than a transport frame and window
        r = await http.post("/v1/service/llm/v1/chat/completions", json=chat("m2", text))
        assert r.json()["choices"][0]["message"]["content"] == "[m2] you said: " + text

        lines = []
        async with http.stream(
            "POST", "/v1/service/llm/v1/chat/completions", json=chat("m1", text[:3000], stream=True)
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    lines.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
        assert "".join(lines) == "[m1] you said: " + text[:3000]

        metrics = (await http.get("/metrics")).text
        assert "ocf_connected_peers 3.0" in metrics
        for w in net.workers:
            assert f'ocf_forward_in_flight{{provider="{w.peer}"}} 0.0' in metrics


async def test_failover_under_concurrent_load(node_config):
    """Clients keep asking while one of two providers is killed: at most the requests it had in flight fail."""
    async with network(node_config, [["m2"], ["m2"]]) as net:
        a, b = net.workers
        answered: list[str] = []
        failures: list[int] = []
        after_kill: list[str] = []
        killed = trio.Event()
        enough = trio.Event()

        async with httpx.AsyncClient(base_url=net.url, timeout=30) as http:

            async def client(i: int) -> None:
                while len(after_kill) < 40:
                    r = await http.post("/v1/service/llm/v1/chat/completions", json=chat("m2", f"c{i}"))
                    if r.status_code != 200:
                        failures.append(r.status_code)
                        continue
                    assert r.json()["choices"][0]["message"]["content"] == f"[m2] you said: c{i}"
                    (after_kill if killed.is_set() else answered).append(r.headers["x-computing-node"])
                    if len(answered) >= 20:
                        enough.set()

            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(client, i)
                await enough.wait()
                a.stop.cancel()  # killed while requests are in flight
                killed.set()
        assert {a.peer, b.peer} <= set(answered)
        assert len(failures) <= 4 and all(status in (502, 503) for status in failures)
        assert set(after_kill[-30:]) == {b.peer}
