"""Bootstrap resolution and the reconnect-with-backoff keeper (MockClock: no real waiting)."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from ocf.config import Config
from ocf.identity import Identity, Multiaddr
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.bootstrap import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    Bootstrapper,
    next_backoff,
    open_bootstrap,
    parse_bootstraps,
)

SEED = Identity.from_seed("bootstrap-seed")
WORKER = Identity.from_seed("bootstrap-worker")


def test_backoff_schedule_doubles_to_two_minutes():
    delays = [BACKOFF_INITIAL]
    for _ in range(8):
        delays.append(next_backoff(delays[-1]))
    assert delays[:6] == [5, 10, 20, 40, 80, 120]
    assert max(delays) == BACKOFF_MAX == 120


def test_parse_bootstraps_document():
    peer = SEED.peer_id
    doc = json.loads(json.dumps({"bootstraps": [f"/ip4/1.2.3.4/tcp/43905/p2p/{peer}", "garbage"]}))
    assert parse_bootstraps(doc) == [Multiaddr.parse(f"/ip4/1.2.3.4/tcp/43905/p2p/{peer}")]
    with pytest.raises(ValueError):
        parse_bootstraps({"nope": []})
    with pytest.raises(ValueError):
        parse_bootstraps(["/ip4/1.2.3.4"])


def test_sources_per_mode():
    class FakeHost:
        peer_id = WORKER.peer_id

    assert Bootstrapper(FakeHost(), Config(mode="standalone")).sources() == []
    assert Bootstrapper(FakeHost(), Config(mode="local")).sources() == ["local"]
    assert Bootstrapper(FakeHost(), Config(mode="node", bootstrap_addrs=("/memory/x",))).sources() == ["/memory/x"]


async def test_keeper_connects_and_reconnects_with_backoff(autojump_clock):
    net = MemoryNetwork()
    seed_addr = Multiaddr.parse(f"/memory/seed/p2p/{SEED.peer_id}")
    config = Config(mode="node", bootstrap_addrs=(str(seed_addr),))
    async with open_host(WORKER, config, net) as worker, open_bootstrap(worker, config) as boot:
        # The seed is not up yet: attempts at t = 0, 5, 15, 35 s (backoff 5, 10, 20)...
        await trio.sleep(34)
        assert boot.attempts == 3
        await trio.sleep(2)
        assert boot.attempts == 4
        # Seed comes up (same identity, same address): the keeper connects.
        async with worker.subscribe() as events:
            async with open_host(SEED, Config(), net, memory_name="seed"):
                ev = await events.receive()
                assert (ev.kind, ev.peer) == ("connected", SEED.peer_id)
                await trio.testing.wait_all_tasks_blocked()
                assert SEED.peer_id in boot.connected
            # Seed goes away and comes back: reconnected after the initial 5 s delay.
            ev = await events.receive()
            assert (ev.kind, ev.peer) == ("disconnected", SEED.peer_id)
            async with open_host(SEED, Config(), net, memory_name="seed"):
                t1 = trio.current_time()
                ev = await events.receive()
                assert (ev.kind, ev.peer) == ("connected", SEED.peer_id)
                assert trio.current_time() - t1 <= BACKOFF_INITIAL + 1


async def test_standalone_never_dials(autojump_clock):
    net = MemoryNetwork()
    async with (
        open_host(WORKER, Config(mode="standalone"), net) as host,
        open_bootstrap(host, Config(mode="standalone")) as boot,
    ):
        await trio.sleep(600)
        assert boot.attempts == 0 and net.dials == 0


async def test_url_source_fetches_bootstrap_list():
    """An http(s) bootstrap source: a real HTTP server answering {"bootstraps": [...]}."""
    net = MemoryNetwork()
    async with open_host(SEED, Config(), net) as seed:
        body = json.dumps({"bootstraps": [str(seed.listen_addrs[0])]}).encode()

        async def http_server(stream):
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                request += chunk
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\nconnection: close\r\n\r\n"
                + body
            )

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, http_server, 0)
            port = listeners[0].socket.getsockname()[1]
            url = f"http://127.0.0.1:{port}/v1/dnt/bootstraps"
            config = Config(mode="node", bootstrap_addrs=(url,))
            async with (
                open_host(WORKER, config, net) as worker,
                worker.subscribe() as events,
                open_bootstrap(worker, config),
            ):
                ev = await events.receive()
                assert (ev.kind, ev.peer) == ("connected", SEED.peer_id)
            nursery.cancel_scope.cancel()


async def test_local_mode_falls_back_to_dialing_without_peer_id():
    """local mode: no gateway answers, so 127.0.0.1:<port> is dialed and whoever answers is accepted."""
    async with open_host(SEED, Config(host="127.0.0.1", tcpport=0)) as seed:
        tcp = next(a for a in seed.listen_addrs if not a.has("ws"))
        config = Config(mode="local")
        async with (
            open_host(WORKER, Config(host="127.0.0.1", tcpport=0)) as worker,
            worker.subscribe() as events,
            open_bootstrap(
                worker, config, local_url="http://127.0.0.1:1/v1/dnt/bootstraps", local_addr=str(tcp.without_p2p())
            ) as boot,
        ):
            ev = await events.receive()
            assert (ev.kind, ev.peer) == ("connected", SEED.peer_id)
            assert await boot.wait_connected(SEED.peer_id) == SEED.peer_id
