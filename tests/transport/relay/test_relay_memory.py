"""Circuit relay v2 end to end on the in-memory transport: reserve, connect, limits, refusals."""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import trio

from ocf.config import Config
from ocf.errors import PeerUnreachable, RelayRefused, TransportError
from ocf.identity import Identity, Multiaddr
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.relay import RelayLimits, open_relay_client, open_relay_service
from ocf.transport.relay.dcutr import open_holepunch
from ocf.transport.host import DIRECT_BUDGET_WITH_RELAY
from ocf.transport.relay.service import _Slot

ECHO = "/test/echo/1.0.0"


async def echo(stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


def cfg(**kw) -> Config:
    return Config(host="127.0.0.1", tcpport=0, handshake_timeout=5.0, dial_timeout=5.0, **kw)


@contextlib.asynccontextmanager
async def trio_hosts(limits: RelayLimits | None = None, n_clients: int = 2):
    """A relay R and clients (each with a relay client); clients are connected to R."""
    net = MemoryNetwork()
    async with contextlib.AsyncExitStack() as stack:
        relay = await stack.enter_async_context(open_host(Identity.from_seed(f"relay-{os.getpid()}"), cfg(), net))
        service = await stack.enter_async_context(open_relay_service(relay, limits))
        clients = []
        for i in range(n_clients):
            host = await stack.enter_async_context(
                open_host(Identity.from_seed(f"client-{i}-{os.getpid()}"), cfg(), net)
            )
            host.set_stream_handler(ECHO, echo)
            client = await stack.enter_async_context(open_relay_client(host))
            await host.connect(relay.listen_addrs[0])
            clients.append((host, client))
        yield relay, service, clients


async def roundtrip(host, peer, payload: bytes) -> bytes:
    stream = await host.new_stream(peer, ECHO)
    got = bytearray()
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        while chunk := await stream.receive_some():
            got += chunk
    return bytes(got)


async def test_reserve_publish_and_connect_through_relay():
    async with trio_hosts() as (relay, service, [(a, ca), (b, cb)]):
        held = await ca.reserve(relay.peer_id)
        assert held.limit is not None and (held.limit.duration, held.limit.data) == (120, 1 << 17)
        circuit = held.addrs[0]
        assert str(circuit).endswith(f"/p2p/{relay.peer_id}/p2p-circuit/p2p/{a.peer_id}")
        assert circuit in a.listen_addrs  # published (identify sends listen_addrs)
        assert service.has_reservation(a.peer_id)
        # b dials a through the relay only: Noise + yamux over the circuit
        peer = await b.connect(circuit)
        assert peer == a.peer_id
        [conn] = b.connections(a.peer_id)
        assert conn.relayed and conn.transport == "relay"
        assert await roundtrip(b, a.peer_id, b"x" * 1000) == b"x" * 1000
        await a.wait_connected(b.peer_id)
        assert a.connections(b.peer_id)[0].relayed
        assert service.stats["circuits_opened"] == 1
        assert await b.ping(a.peer_id) >= 0


async def test_connect_without_reservation_is_refused_with_reason():
    async with trio_hosts() as (relay, service, [(a, ca), (b, cb)]):
        addr = Multiaddr.parse(f"{relay.listen_addrs[0]}/p2p-circuit/p2p/{a.peer_id}")
        with pytest.raises(RelayRefused) as info:
            await b.connect(addr)
        assert info.value.status == "NO_RESERVATION"
        assert service.refused == {"no_reservation": 1}


async def test_data_limit_resets_the_circuit():
    """A circuit carries at most limit.data bytes each way; then both ends are reset."""
    limits = RelayLimits(circuit_data=64 << 10)
    async with trio_hosts(limits) as (relay, service, [(a, ca), (b, cb)]):
        held = await ca.reserve(relay.peer_id)
        await b.connect(held.addrs[0])
        with pytest.raises(Exception):  # noqa: B017 - a reset stream or a closed connection, either will do
            await roundtrip(b, a.peer_id, b"y" * (256 << 10))
        with trio.fail_after(5):
            while b.is_connected(a.peer_id):
                await b.wait_changed()
        assert service.stats["circuits_limit_reached"] == 1
        assert service.circuits_total == 0
        # both ends know why: the gateway answers 503 relay_limit with this
        assert cb.limit_reason(a.peer_id) == "its limit of 65536 bytes each way per relayed connection"
        with trio.fail_after(5):
            while ca.limit_reason(b.peer_id) is None:
                await a.wait_changed()


async def test_duration_limit_resets_the_circuit(autojump_clock):
    limits = RelayLimits(circuit_duration=3)
    async with trio_hosts(limits) as (relay, service, [(a, ca), (b, cb)]):
        held = await ca.reserve(relay.peer_id)
        await b.connect(held.addrs[0])
        await trio.sleep(2)
        assert b.is_connected(a.peer_id)
        await trio.sleep(2)
        assert not b.is_connected(a.peer_id)
        assert service.stats["circuits_limit_reached"] == 1
        assert cb.limit_reason(a.peer_id) == "its limit of 3 s per relayed connection"


async def test_reservation_caps_total_and_circuits_per_peer():
    limits = RelayLimits(max_reservations=1, max_circuits=1)
    async with trio_hosts(limits, n_clients=3) as (relay, service, [(a, ca), (b, cb), (c, cc)]):
        held = await ca.reserve(relay.peer_id)
        with pytest.raises(RelayRefused) as info:
            await cb.reserve(relay.peer_id)
        assert info.value.status == "RESERVATION_REFUSED"
        await ca.reserve(relay.peer_id)  # a refresh is not a new reservation
        await b.connect(held.addrs[0])
        with pytest.raises(RelayRefused) as info:
            await c.connect(held.addrs[0])
        assert info.value.status == "RESOURCE_LIMIT_EXCEEDED"
        assert service.refused == {"reservations_full": 1, "circuits_full": 1}


async def test_hop_rate_limit_per_peer():
    limits = RelayLimits(hop_rate=0.001, hop_burst=3)
    async with trio_hosts(limits, n_clients=1) as (relay, service, [(a, ca)]):
        for _ in range(3):
            await ca.reserve(relay.peer_id)
        with pytest.raises(RelayRefused) as info:
            await ca.reserve(relay.peer_id)
        assert info.value.status == "RESOURCE_LIMIT_EXCEEDED"
        assert service.refused == {"hop_rate": 1}


async def test_stop_from_a_relay_we_hold_no_reservation_with_is_refused():
    """A peer posing as a relay cannot push connections onto us: a answers PERMISSION_DENIED."""
    async with trio_hosts(n_clients=3) as (relay, service, [(a, ca), (b, cb), (c, cc)]):
        async with open_relay_service(b) as fake:
            await a.connect(b.listen_addrs[0])
            await c.connect(b.listen_addrs[0])
            fake.reservations[a.peer_id] = _Slot(a.peer_id, None, time.time() + 60)  # a never reserved on b
            with pytest.raises(RelayRefused) as info:
                await c.connect(Multiaddr.parse(f"{b.listen_addrs[0]}/p2p-circuit/p2p/{a.peer_id}"))
            assert info.value.status == "CONNECTION_FAILED"
        assert ca.refused == {"stop_not_our_relay": 1}
        assert not a.is_connected(c.peer_id)


async def test_a_circuit_address_without_a_relay_client_is_unreachable():
    async with trio_hosts(n_clients=1) as (relay, service, [(a, ca)]):
        held = await ca.reserve(relay.peer_id)
        with pytest.raises(PeerUnreachable, match="no circuit relay client"):
            await relay.connect(held.addrs[0])


async def test_relayed_connection_is_upgraded_to_direct_and_the_relayed_one_retired():
    """DCUtR's first step: the inbound side dials the dialer's direct address; the circuit is let go."""
    async with trio_hosts() as (relay, service, [(a, ca), (b, cb)]), open_holepunch(b) as puncher:
        held = await cb.reserve(relay.peer_id)
        await a.connect(held.addrs[0])
        with trio.fail_after(10):
            while not any(not c.relayed and c.usable for c in a.connections(b.peer_id)):
                await a.wait_changed()
        # the relayed connection is told to go away and closes once idle
        with trio.fail_after(10):
            while any(c.relayed for c in a.connections(b.peer_id)):
                await a.wait_changed()
        assert puncher.stats["unilateral"] == 1
        assert await roundtrip(a, b.peer_id, b"direct") == b"direct"
        assert [c.relayed for c in a.connections(b.peer_id)] == [False]


async def test_a_silent_direct_address_does_not_keep_a_relayed_peer_away(autojump_clock):
    """A peer with relay addresses: its direct addresses get a short try, then the relay is dialed."""
    async with trio_hosts() as (relay, service, [(a, ca), (b, cb)]):
        held = await ca.reserve(relay.peer_id)
        async with trio.open_nursery() as nursery:
            # a listener that accepts and never answers (a private address behind someone's NAT)
            async def silent(raw) -> None:
                await trio.sleep_forever()

            blackhole = relay._memory.network.listen("blackhole", silent, nursery)
            b.add_addrs(a.peer_id, [blackhole, held.addrs[0]])
            t0 = trio.current_time()
            assert await roundtrip(b, a.peer_id, b"hi") == b"hi"
            assert trio.current_time() - t0 < b.config.handshake_timeout  # virtual time: the budget, not the timeout
            assert [c.relayed for c in b.connections(a.peer_id)] == [True]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("dial", ["new_stream", "connect_peer"])
async def test_a_relayed_peers_direct_addresses_share_one_short_try(autojump_clock, dial):
    """Silent direct addresses cost the relay DIRECT_BUDGET_WITH_RELAY together, not each.

    A NATed peer publishes several (TCP, WebSocket and QUIC on its LAN
    address); a try each (6 s for these three) put the relayed dial past a
    gateway's 10 s dial timeout once another dial to the peer was in the way.
    Membership's degree dials (``connect_peer``) dial the same way: they
    dialed the addresses in the order learned, and never reached the relay
    while a dead LAN address came first.
    """
    async with trio_hosts() as (relay, service, [(a, ca), (b, cb)]):
        held = await ca.reserve(relay.peer_id)
        async with trio.open_nursery() as nursery:

            async def silent(raw) -> None:
                await trio.sleep_forever()

            holes = [relay._memory.network.listen(f"blackhole-{i}", silent, nursery) for i in range(3)]
            b.add_addrs(a.peer_id, [*holes, held.addrs[0]])
            t0 = trio.current_time()
            if dial == "new_stream":
                assert await roundtrip(b, a.peer_id, b"hi") == b"hi"
            else:
                await b.connect_peer(a.peer_id, resolve=False)
            assert trio.current_time() - t0 == pytest.approx(DIRECT_BUDGET_WITH_RELAY, abs=0.1)  # was 3 x 2 s
            assert [c.relayed for c in b.connections(a.peer_id)] == [True]
            nursery.cancel_scope.cancel()


async def test_connect_peer_asks_no_resolver_when_told_not_to():
    """Degree dials run every second: a member with no address the host dials must not start a DHT lookup."""
    async with trio_hosts() as (relay, service, [(a, ca), (b, cb)]):
        asked = []

        async def resolver(peer):
            asked.append(peer)
            return []

        b.set_peer_resolver(resolver)
        stranger = Identity.generate().peer_id
        with pytest.raises(TransportError):
            await b.connect_peer(stranger, resolve=False)
        assert asked == []
        with pytest.raises(TransportError):
            await b.connect_peer(stranger)
        assert asked == [stranger]
