"""Hostile input on the QUIC endpoint: garbage and mutated datagrams, spoofed sources, floods, greedy streams.

Each defence is asserted by a figure: what was dropped, what state a
spoofed Initial left, how many bytes answered how many, how many streams
and unread bytes a peer got us to hold.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from aioquic.quic.connection import QuicConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocf.errors import StreamReset
from ocf.identity import Identity
from ocf.transport.quic import QuicTransport
from ocf.transport.quic.endpoint import MIN_INITIAL, QuicEndpoint
from ocf.transport.resources import Limits, ResourceManager
from tests.transport.quic.test_quic_transport import client, server
from tests.waiting import wait_until

SPOOFED = ("127.0.0.9", 4444)  # nobody listens there: whatever the node answers goes nowhere


def client_initials(n: int = 1) -> list[bytes]:
    """First flights of ``n`` real QUIC clients (valid Initials, 1200+ bytes)."""
    out = []
    transport = QuicTransport(Identity.generate(), resources=ResourceManager())
    for _ in range(n):
        conn = QuicConnection(configuration=transport.make_config(True))
        conn.connect(("127.0.0.1", 1), now=0.0)
        out += [data for data, _ in conn.datagrams_to_send(now=0.0)]
    return out


def endpoint_of(transport: QuicTransport) -> QuicEndpoint:
    return transport.endpoints[0]


@pytest.mark.trio
async def test_fuzzed_datagrams_never_crash_the_endpoint() -> None:
    """Garbage and mutated Initials: all dropped or turned into bounded handshakes; a real client still connects."""
    a, b = Identity.generate(), Identity.generate()
    seeds = client_initials(4)
    async with server(a) as (transport, addr, _conns):
        endpoint = endpoint_of(transport)
        fed = 0

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(
            st.one_of(
                st.binary(max_size=1500),
                st.tuples(
                    st.sampled_from(seeds), st.lists(st.tuples(st.integers(0, 1499), st.integers(0, 255)), max_size=8)
                ).map(lambda t: _mutate(*t)),
                st.sampled_from(seeds).map(lambda d: d[: len(d) // 2]),
            ),
            st.integers(1, 250),
        )
        def feed(data: bytes, host: int) -> None:
            nonlocal fed
            fed += 1
            endpoint.datagram_received(data, (f"127.0.1.{host}", 5000 + host))
            endpoint.flush_dirty()

        feed()
        stats = endpoint.stats
        assert stats.datagrams_in == fed
        dropped = stats.dropped_malformed + stats.dropped_unknown + stats.dropped_short_initial
        started = stats.accepted + stats.refused_handshakes + stats.version_negotiations + stats.retries_sent
        assert dropped + started + stats.invalid_tokens + stats.routed == fed
        assert stats.machine_errors == 0
        # Whatever became a pending handshake is bounded by the handshake budget...
        assert transport.resources.system.usage["handshakes"] <= Limits().handshakes
        # ...and the node is still there for a real peer.
        async with client(b, addr, a.peer_id) as conn:
            stream = await conn.open_stream()
            await stream.send_all(b"still up")
            assert await stream.receive_some() == b"still up"


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


@pytest.mark.trio
async def test_retry_keeps_spoofed_sources_stateless() -> None:
    a = Identity.generate()
    initials = client_initials(50)
    async with server(a, retry="always") as (transport, _addr, _conns):
        endpoint = endpoint_of(transport)
        for i, data in enumerate(initials):
            endpoint.datagram_received(data, (f"127.0.2.{i + 1}", 4000))
        stats = endpoint.stats
        assert stats.retries_sent == len(initials)
        assert endpoint.connections == 0 and transport.resources.system.usage["handshakes"] == 0
        # A Retry is smaller than the Initial that asked for it: no amplification at all.
        assert stats.bytes_out < stats.bytes_in / 5
        # A forged token is refused without state either.
        forged = bytearray(initials[0])
        endpoint.datagram_received(bytes(forged), SPOOFED)  # token-less: another Retry
        assert stats.retries_sent == len(initials) + 1


@pytest.mark.trio
async def test_unvalidated_source_gets_at_most_three_times_its_bytes() -> None:
    """Without Retry, a spoofed Initial gets the victim at most 3x its bytes, retransmissions included."""
    a = Identity.generate()
    initial = client_initials(1)[0]
    assert len(initial) >= MIN_INITIAL
    async with server(a, retry="never", handshake_timeout=3.0) as (transport, _addr, _conns):
        endpoint = endpoint_of(transport)
        endpoint.datagram_received(initial, SPOOFED)
        endpoint.flush_dirty()
        assert endpoint.connections == 1
        with trio.fail_after(20):  # the handshake deadline ends it; wait for that, retransmissions included
            await wait_until(lambda: not endpoint.connections)
        assert endpoint.stats.bytes_out <= 3 * len(initial)
        assert transport.resources.system.usage["handshakes"] == 0


@pytest.mark.trio
async def test_handshake_flood_is_bounded_and_retry_kicks_in() -> None:
    """Retry "auto": spoofed Initials from many addresses hold at most half the handshake slots, then get Retries."""
    a = Identity.generate()
    limits = Limits(handshakes=16, handshakes_per_ip=16)
    transport = QuicTransport(a, resources=ResourceManager(limits), retry="auto")
    initials = client_initials(100)

    async def on_inbound(conn) -> None:  # never reached: nobody completes a handshake
        raise AssertionError("a spoofed source completed a handshake")

    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve, "127.0.0.1", 0, on_inbound, nursery)
        endpoint = endpoint_of(transport)
        for i, data in enumerate(initials):
            endpoint.datagram_received(data, (f"127.0.3.{i + 1}", 4000))
        endpoint.flush_dirty()
        pending = transport.resources.system.usage["handshakes"]
        assert pending == limits.handshakes // 2
        assert endpoint.stats.retries_sent == len(initials) - pending
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_stream_cap_and_unread_bytes_are_bounded() -> None:
    """A peer opening more streams than allowed gets them reset; an unread stream stops its sender after one window."""
    a, b = Identity.generate(), Identity.generate()
    rm = ResourceManager(Limits())
    transport = QuicTransport(a, resources=rm, stream_window=256 * 1024)
    held: list = []
    release = trio.Event()

    async def hoard(stream) -> None:  # reads nothing until told
        held.append(stream)
        await release.wait()

    async def on_inbound(conn) -> None:
        conn.attach(handler=hoard, resources=rm.peer_scope(b.peer_id, "127.0.0.1"), max_streams=8)
        await conn.run()

    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(transport.serve, "127.0.0.1", 0, on_inbound, nursery)
        async with client(b, addrs[0], a.peer_id) as conn:
            streams = [await conn.open_stream() for _ in range(12)]
            for s in streams:
                await s.send_all(b"x")
            refused = 0
            for s in streams[8:]:
                with trio.fail_after(5), pytest.raises(StreamReset):
                    await s.receive_some()
                refused += 1
            assert refused == 4 and len(held) == 8
            # Push 4 MiB into one unread stream: the sender blocks once a window is in flight.
            sent = 0
            with trio.move_on_after(2):
                block = os.urandom(64 * 1024)
                while True:
                    await streams[0].send_all(block)
                    sent += len(block)
            # one window on the greedy stream, one byte on each of the seven others
            assert rm.peer_usage(b.peer_id)["memory"] == 256 * 1024 + 7
            assert sent <= 256 * 1024 + (1 << 20) + 64 * 1024  # one window at the peer + our send buffer
            release.set()
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_metrics_count_dropped_datagrams(node_config) -> None:
    import httpx

    from ocf import open_node

    async with open_node(node_config()) as node:
        addr = next(a for a in node.host.listen_addrs if a.has("quic-v1"))
        port = int(addr.value_for("udp") or 0)
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
            for _ in range(5):
                await sock.sendto(b"\x00garbage", ("127.0.0.1", port))  # a short header for no connection
            await sock.sendto(b"\xc0" + os.urandom(20), ("127.0.0.1", port))  # a long header cut short
        quic = node.host._quic
        assert quic is not None
        with trio.fail_after(10):
            await wait_until(lambda: quic.stats()["datagrams_in"] >= 6)
        async with httpx.AsyncClient() as client:
            text = (await client.get(node.gateway_url + "/metrics")).text
    lines = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("ocf_quic_")}
    assert lines['ocf_quic_datagrams_total{outcome="in"}'] == 6
    dropped = sum(v for k, v in lines.items() if "dropped_" in k)
    assert dropped == 6
