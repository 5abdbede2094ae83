"""Host: dialing, reuse, tie-break, handlers, events, limits — over memory, TCP and WebSocket."""

from __future__ import annotations

import contextlib
import os

import pytest
import trio
import trio.testing

from ocf.config import Config
from ocf.errors import PeerIdMismatch, PeerUnreachable, ProtocolNotSupported, StreamReset, TransportError
from ocf.identity import Identity, Multiaddr
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.ping import receive_exactly

from .hostutil import make_upgrader
import trio.lowlevel

ECHO = "/test/echo/1.0.0"


async def echo(stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


def cfg(**kw) -> Config:
    base = dict(host="127.0.0.1", tcpport=0, handshake_timeout=5.0, dial_timeout=5.0)
    base.update(kw)
    return Config(**base)


@contextlib.asynccontextmanager
async def hosts(n: int, network: MemoryNetwork | None = None, prefix: str = "host", **config):
    """``n`` hosts with an echo handler; memory transport unless network is None and tcp=True."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i in range(n):
            ident = Identity.from_seed(f"{prefix}-{i}-{os.getpid()}")
            host = await stack.enter_async_context(
                open_host(ident, cfg(**config), network, upgrader=make_upgrader(ident))
            )
            host.set_stream_handler(ECHO, echo)
            out.append(host)
        yield out


async def roundtrip(host, peer, payload=b"hello") -> bytes:
    stream = await host.new_stream(peer, ECHO)
    async with stream:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)  # concurrently: echo blocks once our receive window is full
            got = bytearray()
            while chunk := await stream.receive_some():
                got += chunk
        return bytes(got)


# --- memory network ----------------------------------------------------------------------


async def test_two_hosts_memory_connect_and_stream():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        assert a.listen_addrs[0].has("memory")
        assert a.listen_addrs[0].peer_id == a.peer_id
        peer = await a.connect(b.listen_addrs[0])
        assert peer == b.peer_id
        assert a.is_connected(b.peer_id)
        assert await roundtrip(a, b.peer_id) == b"hello"
        # b can open streams back over the same connection
        await b.wait_connected(a.peer_id)
        assert await roundtrip(b, a.peer_id, b"back") == b"back"
        assert net.dials == 1


async def test_connection_reused_and_concurrent_dials_deduplicated():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(a.connect, b.listen_addrs[0])
        assert net.dials == 1
        await a.connect(b.listen_addrs[0])
        assert net.dials == 1
        assert len(a.connections(b.peer_id)) == 1


async def test_a_connection_does_not_keep_the_task_that_dialed_it():
    """An outbound connection outlives its dialer (a membership dial, a gateway request): the dialer
    and what it refers to are freed when it ends, not when the connection closes."""
    import gc

    async def dialer(host, addr) -> None:
        await host.connect(addr)

    def kept() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, trio.lowlevel.Task) and o.name == "test-dialer")

    async with hosts(2, MemoryNetwork()) as (a, b), trio.open_nursery() as nursery:
        nursery.start_soon(dialer, a, b.listen_addrs[0], name="test-dialer")
        await a.wait_connected(b.peer_id)
        await trio.testing.wait_all_tasks_blocked()
        assert a.is_connected(b.peer_id)
        assert kept() == 0


async def test_an_idle_connection_costs_four_tasks_a_side_and_its_idle_streams_no_buffer():
    """What a hub pays for each of thousands of connections: the muxer runs in the connection's own
    task (reader, writer and keepalive beside it: 4 a side, it was 5), and a stream whose bytes were
    all read holds no receive buffer (an empty deque is 760 bytes)."""

    def tasks() -> int:
        count, todo = 0, [trio.lowlevel.current_root_task()]
        while todo:
            task = todo.pop()
            count += 1
            todo.extend(t for n in task.child_nurseries for t in n.child_tasks)
        return count

    async with hosts(2, MemoryNetwork()) as (a, b):
        await trio.testing.wait_all_tasks_blocked()
        before = tasks()
        await a.connect(b.listen_addrs[0])
        await trio.testing.wait_all_tasks_blocked()  # identify has come and gone
        assert tasks() - before == 2 * 4
        stream = await a.new_stream(b.peer_id, ECHO)
        await stream.send_all(b"hello")
        assert await receive_exactly(stream, 5) == b"hello"
        assert stream._chunks is None
        await stream.aclose()


async def test_new_stream_dials_known_address():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        a.add_addrs(b.peer_id, [b.listen_addrs[0]])
        assert await roundtrip(a, b.peer_id, b"x" * 100) == b"x" * 100


async def test_unknown_peer_is_unreachable():
    net = MemoryNetwork()
    async with hosts(1, net) as (a,):
        stranger = Identity.from_seed("stranger").peer_id
        with pytest.raises(PeerUnreachable):
            await a.new_stream(stranger, ECHO)
        with pytest.raises(PeerUnreachable):
            await a.connect(Multiaddr.parse("/memory/nope"))


async def test_a_stopping_host_dials_no_one_and_keeps_its_connections():
    """After ``stop_dialing`` (a node stopping): streams on existing connections work, a dial is refused at once."""
    net = MemoryNetwork()
    async with hosts(3, net) as (a, b, c):
        await a.connect(b.listen_addrs[0])
        a.add_addrs(c.peer_id, [c.listen_addrs[0]])
        dials = net.dials
        a.stop_dialing()
        assert await roundtrip(a, b.peer_id) == b"hello"  # a goodbye still goes out on what is open
        assert await a.connect(b.listen_addrs[0]) == b.peer_id  # joining a connection is no dial
        with pytest.raises(PeerUnreachable, match="stopping"):
            await a.new_stream(c.peer_id, ECHO)
        with pytest.raises(PeerUnreachable, match="stopping"):
            await a.connect(c.listen_addrs[0])
        assert net.dials == dials  # nothing reached the network
        assert not c.is_connected(a.peer_id)
        assert a.stats["dials_refused_stopping"] == 2
        await b.connect(a.listen_addrs[0].with_p2p(a.peer_id))  # and others may still reach it
        assert await roundtrip(b, a.peer_id) == b"hello"


async def test_wrong_peer_id_is_rejected():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        wrong = Identity.from_seed("someone-else").peer_id
        with pytest.raises(PeerIdMismatch):
            await a.connect(b.listen_addrs[0].with_p2p(wrong))
        assert not a.is_connected(b.peer_id)


async def test_protocol_not_supported():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        await a.connect(b.listen_addrs[0])
        with pytest.raises(ProtocolNotSupported):
            await a.new_stream(b.peer_id, ["/nope/1", "/nope/2"])
        # the connection is still fine
        assert await roundtrip(a, b.peer_id) == b"hello"
        # first supported protocol of a list wins
        s = await a.new_stream(b.peer_id, ["/nope/1", ECHO])
        assert s.protocol == ECHO
        await s.aclose()


async def test_peer_events_and_disconnect():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        async with a.subscribe() as events_a, b.subscribe() as events_b:
            await a.connect(b.listen_addrs[0])
            ev = await events_a.receive()
            assert (ev.kind, ev.peer) == ("connected", b.peer_id)
            ev = await events_b.receive()
            assert (ev.kind, ev.peer) == ("connected", a.peer_id)
            await a.disconnect(b.peer_id)
            ev = await events_a.receive()
            assert (ev.kind, ev.peer) == ("disconnected", b.peer_id)
            ev = await events_b.receive()
            assert (ev.kind, ev.peer) == ("disconnected", a.peer_id)
        assert not a.is_connected(b.peer_id)
        assert a.connected_peers() == []


async def test_simultaneous_dial_keeps_one_connection():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.connect, b.listen_addrs[0])
            nursery.start_soon(b.connect, a.listen_addrs[0])
        # Both sides agree on the survivor: initiated by the smaller peer ID.
        smaller = min(a.peer_id, b.peer_id)
        for host, other in ((a, b), (b, a)):
            usable = [c for c in host.connections(other.peer_id) if c.usable]
            assert len(usable) == 1
            assert usable[0].initiator == smaller
        # the loser is closed once idle; streams keep working throughout
        assert await roundtrip(a, b.peer_id) == b"hello"
        assert await roundtrip(b, a.peer_id) == b"hello"
        for host, other in ((a, b), (b, a)):
            while len(host.connections(other.peer_id)) > 1:
                await trio.testing.wait_all_tasks_blocked()
                await trio.lowlevel.checkpoint()
        assert a.is_connected(b.peer_id) and b.is_connected(a.peer_id)


async def test_redial_by_same_initiator_keeps_newest_on_both_sides():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        bare = b.listen_addrs[0].without_p2p()  # no peer ID: dial does not short-cut to the existing connection
        async with b.subscribe() as events:
            await a.connect(bare)
            await a.connect(bare)
            assert net.dials == 2
            # exactly one connection survives, the same one on both sides, and no disconnect is reported
            for host, other in ((a, b), (b, a)):
                while len(host.connections(other.peer_id)) > 1:
                    await trio.testing.wait_all_tasks_blocked()
                    await trio.lowlevel.checkpoint()
            assert await roundtrip(a, b.peer_id) == b"hello"
            assert [ev.kind for ev in [await events.receive()]] == ["connected"]
            with pytest.raises(trio.WouldBlock):
                events.receive_nowait()


async def test_ping_and_identify():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        await a.connect(b.listen_addrs[0])
        rtt = await a.ping(b.peer_id)
        assert rtt >= 0
        # identify runs in the background after connecting: wait until it has
        while a.peer_info(b.peer_id) is None or b.peer_info(a.peer_id) is None:
            await trio.testing.wait_all_tasks_blocked()
        info = a.peer_info(b.peer_id)
        assert info.agent_version.startswith("ocf/")
        assert "/ipfs/ping/1.0.0" in info.protocols and ECHO in info.protocols
        assert b.listen_addrs[0].without_p2p() in a.peer_addrs(b.peer_id)


async def test_rtt_of_a_connection_is_what_its_muxer_measured():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):
        assert a.rtt(b.peer_id) is None  # not connected
        await a.connect(b.listen_addrs[0])
        (conn,) = a.connections(b.peer_id)
        sample = await conn.muxed.ping()
        assert a.rtt(b.peer_id) == conn.muxed.rtt and sample >= 0 and conn.muxed.rtt is not None


async def test_many_hosts_full_mesh_memory():
    net = MemoryNetwork()
    async with hosts(6, net) as hs:
        async with trio.open_nursery() as nursery:
            for x in hs:
                for y in hs:
                    if x is not y:
                        nursery.start_soon(x.connect, y.listen_addrs[0])
        for x in hs:
            assert sorted(x.connected_peers()) == sorted(y.peer_id for y in hs if y is not x)
        async with trio.open_nursery() as nursery:
            for x in hs:
                for y in hs:
                    if x is not y:
                        nursery.start_soon(roundtrip, x, y.peer_id)


async def test_handler_error_does_not_affect_connection():
    net = MemoryNetwork()
    async with hosts(2, net) as (a, b):

        async def broken(stream):
            raise RuntimeError("boom")

        b.set_stream_handler("/broken/1", broken)
        await a.connect(b.listen_addrs[0])
        with pytest.raises(StreamReset):
            # the reset may even overtake the end of protocol negotiation
            s = await a.new_stream(b.peer_id, "/broken/1")
            await s.receive_some()
        assert await roundtrip(a, b.peer_id) == b"hello"


async def test_peer_vanishing_resets_streams_and_reports_disconnect():
    net = MemoryNetwork()
    async with hosts(1, net) as (a,):
        ident = Identity.from_seed("vanishing")
        async with a.subscribe() as events:
            async with open_host(ident, cfg(), net, upgrader=make_upgrader(ident)) as b:
                b.set_stream_handler(ECHO, echo)
                await a.connect(b.listen_addrs[0])
                s = await a.new_stream(b.peer_id, ECHO)
                await s.send_all(b"x")
                assert await receive_exactly(s, 1) == b"x"
            # b is gone (closed)
            with pytest.raises(StreamReset):
                await s.receive_some()
            kinds = [(await events.receive()).kind for _ in range(2)]
            assert kinds == ["connected", "disconnected"]


# --- limits --------------------------------------------------------------------------------


async def test_max_connections_refuses_inbound():
    net = MemoryNetwork()
    async with hosts(1, net, max_connections=1) as (a,), hosts(2, net, prefix="client") as (b, c):
        await b.connect(a.listen_addrs[0])
        with pytest.raises(TransportError):
            await c.connect(a.listen_addrs[0])
        assert a.stats["inbound_refused"] == 1


async def test_max_streams_per_connection():
    net = MemoryNetwork()
    async with hosts(2, net, max_streams_per_connection=3) as (a, b):
        await a.connect(b.listen_addrs[0])
        # let both identify exchanges finish (they use streams too)
        while a.peer_info(b.peer_id) is None or b.peer_info(a.peer_id) is None:
            await trio.testing.wait_all_tasks_blocked()
        await trio.testing.wait_all_tasks_blocked()
        streams = [await a.new_stream(b.peer_id, ECHO) for _ in range(3)]
        with pytest.raises(TransportError, match="limit"):
            await a.new_stream(b.peer_id, ECHO)
        for s in streams:
            await s.aclose()


async def test_half_open_handshake_times_out(autojump_clock):
    net = MemoryNetwork()
    async with hosts(1, net, handshake_timeout=10.0) as (a,):
        # a raw connection that never says anything
        async with net.connect(a.listen_addrs[0]) as raw:
            with trio.fail_after(60):
                # the listener may greet first (its multistream header); then it hangs up
                received = b""
                while chunk := await raw.stream.receive_some():
                    received += chunk
                assert received in (b"", b"\x13/multistream/1.0.0\n")
        assert a.stats["handshake_failures"] == 1


async def test_pending_handshake_limit(autojump_clock):
    net = MemoryNetwork()
    async with (
        hosts(1, net, max_pending_handshakes=2, handshake_timeout=10.0) as (a,),
        contextlib.AsyncExitStack() as stack,
    ):
        raws = [await stack.enter_async_context(net.connect(a.listen_addrs[0])) for _ in range(3)]
        # the third is refused at once, the first two wait for the timeout
        assert await raws[2].stream.receive_some() == b""
        assert a.stats["inbound_refused"] == 1


# --- real sockets ----------------------------------------------------------------------------


async def test_tcp_and_websocket_on_same_port():
    async with hosts(3) as (a, b, c):
        tcp = [x for x in a.listen_addrs if not x.has("ws")]
        ws = [x for x in a.listen_addrs if x.has("ws")]
        assert tcp and ws
        port = tcp[0].value_for("tcp")
        assert port != "0" and ws[0].value_for("tcp") == port
        assert await b.connect(tcp[0]) == a.peer_id
        assert await c.connect(ws[0]) == a.peer_id
        await a.wait_connected(b.peer_id)
        await a.wait_connected(c.peer_id)
        assert b.connections(a.peer_id)[0].transport == "tcp"
        assert c.connections(a.peer_id)[0].transport == "ws"
        assert a.connections(c.peer_id)[0].transport == "ws"
        payload = os.urandom(1 << 20)
        assert await roundtrip(b, a.peer_id, payload) == payload
        assert await roundtrip(c, a.peer_id, payload) == payload
        assert await roundtrip(a, c.peer_id, b"ws back") == b"ws back"
        # Raw TCP connections write and read their socket directly at both
        # ends (the sniffed prefix is used up by then); WebSocket ones cannot.
        assert b.connections(a.peer_id)[0].muxed._secure._direct is not None
        assert a.connections(b.peer_id)[0].muxed._secure._direct is not None
        assert c.connections(a.peer_id)[0].muxed._secure._direct is None


async def test_tcp_dial_refused_is_unreachable():
    async with hosts(1) as (a,):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(PeerUnreachable):
            await a.connect(f"/ip4/127.0.0.1/tcp/{port}")


async def test_protocol_violation_closes_only_that_connection():
    net = MemoryNetwork()
    async with hosts(3, net) as (a, b, c):
        await b.connect(a.listen_addrs[0])
        await c.connect(a.listen_addrs[0])
        await a.wait_connected(b.peer_id)
        await a.wait_connected(c.peer_id)
        async with a.subscribe() as events:
            # b's side writes garbage straight into its secure channel: a's yamux parser rejects it
            (conn,) = b.connections(a.peer_id)
            await conn.muxed._secure.send_all(b"\x09" * 12)
            ev = await events.receive()
            assert (ev.kind, ev.peer) == ("disconnected", b.peer_id)
        assert not a.is_connected(b.peer_id)
        assert await roundtrip(c, a.peer_id, b"still fine") == b"still fine"
        assert await roundtrip(a, c.peer_id, b"both ways") == b"both ways"


async def test_public_addr_is_advertised():
    async with hosts(1, public_addr="203.0.113.7") as (a,):
        port = a.listen_addrs[0].value_for("tcp")
        assert Multiaddr.parse(f"/ip4/203.0.113.7/tcp/{port}/p2p/{a.peer_id}") in a.listen_addrs
        assert Multiaddr.parse(f"/ip4/203.0.113.7/tcp/{port}/ws/p2p/{a.peer_id}") in a.listen_addrs
    async with hosts(1, public_addr="node.example.org", prefix="dns") as (b,):
        assert any(x.value_for("dns") == "node.example.org" for x in b.listen_addrs)


SINK = "/test/sink/1.0.0"


async def sink(stream) -> None:
    while await stream.receive_some():
        pass
    await stream.send_all(b"k")


class _Steps(trio.abc.Instrument):
    """Counts scheduler steps of the tasks named ``name``."""

    def __init__(self, name: str) -> None:
        self.name, self.count = name, 0

    def before_task_step(self, task) -> None:
        if task.name.endswith(self.name):
            self.count += 1


async def test_many_busy_streams_cost_less_than_a_task_switch_per_chunk():
    """64 senders on one connection queue several chunks per wake-up, not one.

    Before, each 64 KiB chunk cost its sender about 1.6 scheduler steps
    (parked on the full write queue, woken for one chunk's room); now a woken
    sender fills half the queue. Counted, never timed.
    """
    chunk, per_stream, streams = 64 * 1024, 32, 64

    async def push(host, peer) -> None:
        stream = await host.new_stream(peer, SINK)
        block = os.urandom(chunk)
        for _ in range(per_stream):
            await stream.send_all(block)
        await stream.send_eof()
        assert await stream.receive_some() == b"k"
        await stream.aclose()

    async with hosts(2, ws=False) as (a, b):
        b.set_stream_handler(SINK, sink)
        peer = await a.connect(b.listen_addrs[0])
        steps = _Steps("push")
        trio.lowlevel.add_instrument(steps)
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(streams):
                    nursery.start_soon(push, a, peer)
        finally:
            trio.lowlevel.remove_instrument(steps)
    chunks = streams * per_stream
    assert steps.count < 1.1 * chunks, f"{steps.count} sender steps for {chunks} chunks"


async def test_a_sender_of_tiny_messages_still_lets_other_tasks_run():
    """Writes that never wait yield every 64 messages, however small, not every megabyte."""
    async with hosts(2, ws=False) as (a, b):
        b.set_stream_handler(SINK, sink)
        peer = await a.connect(b.listen_addrs[0])
        stream = await a.new_stream(peer, SINK)
        ran = 0
        done = False

        async def other() -> None:
            nonlocal ran
            while not done:
                ran += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()  # let it start (it never blocks, so do not wait for that)
            before = ran
            for _ in range(640):
                await stream.send_all(b"x")
            done = True
        await stream.send_eof()
        assert await stream.receive_some() == b"k"
        assert ran - before >= 8, f"the other task ran {ran - before} times during 640 sends"
