"""Every dial failure reaches its caller as a TransportError, and clients learn nothing about addresses.

A failure raised inside a nursery (trio-websocket's reader task, any
transport's helper task) arrives wrapped in an ``ExceptionGroup``, which
``except TransportError`` does not catch: that is how a vanished peer used to
turn into ``500 internal error`` with a traceback. Each place that catches
transport errors is driven here with such a failure; the figures are the
exception type, the HTTP status and the number of distinct error bodies.
"""

from __future__ import annotations

import contextlib
import os

import httpx
import pytest
import trio

from ocf.config import Config
from ocf.errors import PeerUnreachable, TransportError, transport_failure, transport_errors_unwrapped
from ocf.identity import Identity, Multiaddr
from ocf.node import open_node
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.bootstrap import open_bootstrap

from ..gateway.util import chat
from ..integration.test_gateway_service import network
from ._dial_hostile import ANSWERS, STRANGER, closed_port, hostile_target

pytestmark = pytest.mark.timeout(120)


def ident(name: str) -> Identity:
    return Identity.from_seed(f"dialfail-{name}-{os.getpid()}")


# --- the helpers in ocf.errors ---------------------------------------------------------------


def test_transport_failure_only_for_groups_of_transport_failures():
    err = PeerUnreachable("x")
    assert transport_failure(err) is err
    assert transport_failure(ExceptionGroup("g", [ExceptionGroup("h", [err]), TransportError("y")])) is err
    assert transport_failure(ExceptionGroup("g", [err, ValueError("bug")])) is None
    assert transport_failure(BaseExceptionGroup("g", [err, KeyboardInterrupt()])) is None
    with pytest.raises(PeerUnreachable), transport_errors_unwrapped():
        raise ExceptionGroup("g", [err])
    with pytest.raises(ExceptionGroup), transport_errors_unwrapped():
        raise ExceptionGroup("g", [err, ValueError("bug")])


# --- WebSocket (and TCP) addresses that answer anything but libp2p --------------------------


@pytest.mark.parametrize("answer", sorted(ANSWERS) + ["silent"])
@pytest.mark.parametrize("ws", [True, False], ids=["ws", "tcp"])
async def test_a_bad_answer_ends_in_a_typed_error_within_the_deadline(answer, ws):
    config = Config(host="127.0.0.1", tcpport=0, dial_timeout=1.5, handshake_timeout=1.5)
    async with hostile_target(ANSWERS.get(answer, answer)) as target, open_host(ident("ws"), config) as host:
        t0 = trio.current_time()
        with pytest.raises(TransportError) as info:
            await host.connect(target.addr(ws=ws).with_p2p(STRANGER))
        assert type(info.value) is not ExceptionGroup
        assert target.connections == 1
        assert trio.current_time() - t0 < 5.0  # dial + handshake deadlines, generously
        if ws:
            assert isinstance(info.value, PeerUnreachable)


async def test_closed_ws_port_is_peer_unreachable():
    async with closed_port() as port, open_host(ident("closed"), Config(host="127.0.0.1", tcpport=0)) as host:
        with pytest.raises(PeerUnreachable):
            await host.connect(Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}/ws/p2p/{STRANGER}"))


# --- a transport whose failures come out of a nursery: every caller still gets the plain error --


class GroupingNetwork(MemoryNetwork):
    """An in-memory network whose dials fail inside a nursery, as trio-websocket's do."""

    @contextlib.asynccontextmanager
    async def connect(self, addr, local_addr=None):
        async with trio.open_nursery():
            raise PeerUnreachable(f"nothing answers at {addr}")
        yield  # pragma: no cover


async def test_host_connect_new_stream_and_ping_raise_plain_transport_errors():
    async with open_host(ident("grp"), Config(), GroupingNetwork()) as host:
        addr = Multiaddr.parse(f"/memory/elsewhere/p2p/{STRANGER}")
        with pytest.raises(PeerUnreachable):
            await host.connect(addr)
        host.add_addrs(STRANGER, [addr])
        with pytest.raises(PeerUnreachable):
            await host.new_stream(STRANGER, "/x/1.0.0")
        with pytest.raises(PeerUnreachable):
            await host.ping(STRANGER)


async def test_bootstrap_keeper_survives_grouped_failures(autojump_clock):
    config = Config(mode="node", bootstrap_addrs=(f"/memory/seed/p2p/{STRANGER}",))
    async with open_host(ident("boot"), config, GroupingNetwork()) as host, open_bootstrap(host, config) as boot:
        await trio.sleep(40)  # backoff 5, 10, 20 s: attempts at 0, 5, 15, 35
        assert boot.attempts == 4
        assert not boot.connected


# --- the gateway: routed and /v1/p2p requests ----------------------------------------------------


def _raise_grouped(*args, **kwargs):
    async def fail():
        async with trio.open_nursery():
            raise PeerUnreachable("dial /ip4/127.0.0.1/tcp/22 failed: Connection refused")

    return fail()


async def test_grouped_dial_failure_is_503_for_routed_and_502_for_p2p(node_config, monkeypatch):
    async with network(node_config, [["m1"]]) as net:
        worker = net.workers[0]
        monkeypatch.setattr(net.dispatcher.host, "_connection_for", _raise_grouped)
        async with httpx.AsyncClient(base_url=net.url, timeout=30) as http:
            r = await http.post("/v1/service/llm/v1/chat/completions", json=chat("m1", "x"))
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "no_provider_available"
            assert "127.0.0.1" not in r.text and "refused" not in r.text
            r = await http.get(f"/v1/p2p/{worker.peer}/v1/health")
            assert r.status_code == 502 and r.json()["error"]["code"] == "peer_unreachable", r.text
            assert r.json()["error"]["message"] == f"peer {worker.peer} is unreachable"


async def test_p2p_error_bodies_say_nothing_about_what_an_address_answered(node_config):
    """Whatever a peer's published address is (closed, an HTTP server, garbage, silence), the body is the same."""
    bodies: dict[str, str] = {}
    async with (
        open_node(node_config(dial_timeout=1.5, handshake_timeout=1.5)) as node,
        httpx.AsyncClient(base_url=node.gateway_url, timeout=30) as http,
    ):

        async def probe(name: str, addr: Multiaddr) -> None:
            peer = ident(f"probe-{name}").peer_id
            node.host.add_addrs(peer, [addr])
            r = await http.get(f"/v1/p2p/{peer}/v1/health")
            assert r.status_code == 502, (name, r.text)
            assert r.json()["error"]["code"] == "peer_unreachable"
            bodies[name] = r.text.replace(str(peer), "<peer>")

        async with closed_port() as port:
            await probe("closed-tcp", Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}"))
            await probe("closed-ws", Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}/ws"))
        for answer in sorted(ANSWERS) + ["silent"]:
            for ws in (False, True):
                async with hostile_target(ANSWERS.get(answer, answer)) as target:
                    await probe(f"{answer}-{'ws' if ws else 'tcp'}", target.addr(ws=ws))
                    assert target.connections == 1  # it was dialed (this node runs on loopback)...
    assert len(set(bodies.values())) == 1, bodies  # ...and the client cannot tell any of them apart
    assert len(bodies) == 2 + 2 * (len(ANSWERS) + 1)
