"""Hostile peers against the relay, the relay client and DCUtR: every refusal has a figure."""

from __future__ import annotations

import contextlib
import os

import pytest
import trio
from hypothesis import given, settings, strategies as st

from ocf.config import Config
from ocf.errors import ProtocolError, RelayRefused
from ocf.identity import Identity, Multiaddr, varint
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.identify import read_message, write_message
from ocf.transport.relay import HOP, RelayLimits, open_relay_client, open_relay_service
from ocf.transport.relay.dcutr import MAX_ADDRS, PROTOCOL as DCUTR, HolePunch, MsgType, open_holepunch
from ocf.transport.relay.messages import HopMessage, HopType, Status
from ocf.transport.relay.service import REQUEST_TIMEOUT


def cfg(**kw) -> Config:
    return Config(host="127.0.0.1", tcpport=0, handshake_timeout=5.0, dial_timeout=5.0, ws=False, **kw)


@contextlib.asynccontextmanager
async def relay_and(n: int, limits: RelayLimits | None = None, network: MemoryNetwork | None = None):
    async with contextlib.AsyncExitStack() as stack:
        relay = await stack.enter_async_context(open_host(Identity.from_seed(f"h-relay-{os.getpid()}"), cfg(), network))
        service = await stack.enter_async_context(open_relay_service(relay, limits))
        out = []
        for i in range(n):
            host = await stack.enter_async_context(
                open_host(Identity.from_seed(f"h-{i}-{os.getpid()}"), cfg(), network)
            )
            client = await stack.enter_async_context(open_relay_client(host))
            await host.connect(relay.listen_addrs[0])
            out.append((host, client))
        yield relay, service, out


async def test_a_silent_hop_stream_is_dropped_at_the_deadline(autojump_clock):
    async with relay_and(1, network=MemoryNetwork()) as (relay, service, [(a, _)]):
        stream = await a.new_stream(relay.peer_id, HOP)
        t0 = trio.current_time()
        assert await stream.receive_some() == b""  # the relay gives up and closes
        assert trio.current_time() - t0 >= REQUEST_TIMEOUT
        assert service.refused == {"hop_request_timeout": 1}


async def test_an_oversized_hop_message_is_refused_before_it_is_read():
    async with relay_and(1, network=MemoryNetwork()) as (relay, service, [(a, _)]):
        stream = await a.new_stream(relay.peer_id, HOP)
        await stream.send_all(varint.encode(1 << 20))  # announces 1 MiB; none of it is sent
        answer = HopMessage.decode(await read_message(stream, 4096))
        assert answer.status == Status.MALFORMED_MESSAGE
        assert service.refused == {"hop_malformed": 1}


async def test_reservations_per_ip_are_capped():
    """Over TCP every client comes from 127.0.0.1: with a cap of 2 per IP, the third is refused."""
    async with relay_and(3, RelayLimits(max_reservations_per_ip=2)) as (relay, service, clients):
        for _, client in clients[:2]:
            await client.reserve(relay.peer_id)
        with pytest.raises(RelayRefused, match="RESERVATION_REFUSED"):
            await clients[2][1].reserve(relay.peer_id)
        assert service.refused == {"reservations_per_ip": 1} and len(service.reservations) == 2


async def test_no_reservation_over_a_relayed_connection():
    net = MemoryNetwork()
    async with relay_and(2, network=net) as (relay, service, [(a, ca), (b, cb)]):
        held = await ca.reserve(relay.peer_id)
        async with open_relay_service(a):  # a could relay too, but b reaches it only through the relay
            await b.connect(held.addrs[0])
            [conn] = b.connections(a.peer_id)
            stream = await conn.muxed.open_stream()
            stream.protocol = await b.upgrader.select(stream, [HOP])
            await write_message(stream, HopMessage(HopType.RESERVE).encode())
            answer = HopMessage.decode(await read_message(stream, 4096))
        assert answer.status == Status.PERMISSION_DENIED


async def test_inbound_relayed_connections_are_capped():
    net = MemoryNetwork()
    async with relay_and(3, network=net) as (relay, service, [(a, ca), (b, _), (c, _)]):
        ca.max_inbound = 1
        held = await ca.reserve(relay.peer_id)
        await b.connect(held.addrs[0])
        with pytest.raises(RelayRefused, match="CONNECTION_FAILED"):
            await c.connect(held.addrs[0])
        assert ca.refused == {"stop_inbound_full": 1} and ca.inbound == 1


async def test_dcutr_only_on_relayed_connections():
    net = MemoryNetwork()
    async with relay_and(2, network=net) as (relay, service, [(a, _), (b, _)]):
        async with open_holepunch(a) as puncher:
            await b.connect(a.listen_addrs[0])
            stream = await b.new_stream(a.peer_id, DCUTR)
            await write_message(stream, HolePunch(MsgType.CONNECT).encode())
            assert await stream.receive_some() == b""
        assert puncher.refused == {"not_relayed": 1}


def test_dcutr_byte_vectors_and_bounds():
    addr = Multiaddr.parse("/ip4/1.2.3.4/tcp/4001").to_bytes()
    assert HolePunch(MsgType.CONNECT, (addr,)).encode() == b"\x08\x64\x12" + bytes([len(addr)]) + addr
    assert HolePunch(MsgType.SYNC).encode() == b"\x08\xac\x02"
    assert HolePunch.decode(b"\x08\xac\x02") == HolePunch(MsgType.SYNC)
    with pytest.raises(ProtocolError, match="unknown type"):
        HolePunch.decode(b"\x08\x01")
    with pytest.raises(ProtocolError, match="exceeds"):
        HolePunch.decode(bytes(5000))
    assert len(HolePunch.decode(HolePunch(MsgType.CONNECT, (addr,) * 100).encode()).addrs) == 32


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_dcutr_garbage_raises_only_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        HolePunch.decode(data)


async def test_dcutr_dials_only_few_allowed_tcp_addresses():
    async with open_host(Identity.from_seed("dc-filter"), cfg()) as host:
        async with open_holepunch(host) as puncher:
            raw = [
                Multiaddr.parse(a).to_bytes()
                for a in (
                    "/ip4/10.9.9.9/tcp/1",  # private and not ours: the dial policy refuses it
                    "/ip4/8.8.4.4/tcp/1/ws",
                    "/ip6/2001:db8::1/tcp/1",
                    *(f"/ip4/1.1.1.{i}/tcp/{1000 + i}" for i in range(10)),
                )
            ]
            got = puncher._their_addrs(tuple(raw))
        assert [str(a) for a in got] == [f"/ip4/1.1.1.{i}/tcp/{1000 + i}" for i in range(MAX_ADDRS)]


async def test_dcutr_takes_few_quic_addresses_besides_tcp_ones():
    async with open_host(Identity.from_seed("dc-filter-quic"), cfg()) as host:
        async with open_holepunch(host) as puncher:
            raw = [
                Multiaddr.parse(a).to_bytes()
                for a in (
                    "/ip4/10.9.9.9/udp/1/quic-v1",  # private and not ours
                    "/ip4/8.8.4.4/udp/1",  # UDP without QUIC
                    *(f"/ip4/2.2.2.{i}/udp/{2000 + i}/quic-v1" for i in range(10)),
                    "/ip4/1.1.1.1/tcp/1000",
                )
            ]
            got = [str(a) for a in puncher._their_addrs(tuple(raw))]
        quic = [f"/ip4/2.2.2.{i}/udp/{2000 + i}/quic-v1" for i in range(MAX_ADDRS)]
        assert got == [*quic, "/ip4/1.1.1.1/tcp/1000"]
