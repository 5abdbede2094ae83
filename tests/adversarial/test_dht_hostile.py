"""Hostile peers against the DHT: each defence bounded, by a figure.

The attacker is a host on the same in-memory network speaking the kad
protocol by hand: as a client it floods, oversizes, trickles and hoards
streams; as a server it sends oversized, overfull, malformed or poisoned
replies to a node that asks it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import attrs
import trio
import trio.testing

from ocf.config import Config
from ocf.dht import wire
from ocf.errors import TransportError
from ocf.identity import Identity, varint
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.host import Host
from ocf.transport.muxer import MuxedStream

from ..dht.dhtutil import QUIET, dht_nodes, link

PROTOCOL = "/ocf/kad/1.0.0"


def find_node(key: bytes) -> bytes:
    return wire.frame(wire.Message(wire.MessageType.FIND_NODE, key=key))


async def replies_until_reset(stream: MuxedStream) -> int:
    """How many whole replies arrive before the stream ends or is reset."""
    reader = wire.FrameReader(1 << 20)
    count = 0
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            return count
        if not chunk:
            return count
        count += len(reader.feed(chunk))


async def attacker(net: MemoryNetwork, name: str = "attacker"):
    return open_host(Identity.from_seed(f"dht-hostile-{name}"), Config(), net)


async def test_query_flood_is_cut_at_the_burst():
    net = MemoryNetwork()
    limits = attrs.evolve(QUIET, query_rate=0.001, query_burst=5)
    async with dht_nodes(["server"], net=net, limits=limits) as (server,), await attacker(net) as evil:
        await evil.connect(server.host.listen_addrs[0])
        stream = await evil.new_stream(server.host.peer_id, PROTOCOL)
        await stream.send_all(find_node(evil.peer_id.raw) * 50)
        # The reset may overtake replies still unread here, so the figure is the server's.
        assert await replies_until_reset(stream) <= 5
        assert server.stats["inbound_requests"] == 5
        assert server.stats["inbound_refused_rate"] == 1


async def test_oversized_request_is_refused_before_its_body():
    net = MemoryNetwork()
    async with dht_nodes(["server"], net=net) as (server,), await attacker(net) as evil:
        await evil.connect(server.host.listen_addrs[0])
        stream = await evil.new_stream(server.host.peer_id, PROTOCOL)
        await stream.send_all(varint.encode(1 << 20) + b"\x08\x04")  # announces 1 MiB, limit is 4 KiB
        assert await replies_until_reset(stream) == 0
        assert server.stats["inbound_malformed"] == 1
        assert server.stats["inbound_requests"] == 0


async def test_trickled_request_hits_the_deadline(autojump_clock):
    net = MemoryNetwork()
    async with dht_nodes(["server"], net=net) as (server,), await attacker(net) as evil:
        await evil.connect(server.host.listen_addrs[0])
        stream = await evil.new_stream(server.host.peer_id, PROTOCOL)
        frame = find_node(evil.peer_id.raw)
        started = trio.current_time()
        sent = 0
        try:
            for byte in frame[:-1]:
                await stream.send_all(bytes([byte]))
                sent += 1
                await trio.sleep(1.0)  # well under the 10 s deadline per byte, far over it in all
        except TransportError:
            pass  # reset by the server
        assert sent < len(frame) - 1
        assert await replies_until_reset(stream) == 0
        assert server.stats["inbound_timeouts"] == 1
        assert trio.current_time() - started <= server.limits.inbound_timeout + 2


async def test_streams_per_peer_are_capped():
    net = MemoryNetwork()
    async with dht_nodes(["server"], net=net) as (server,), await attacker(net) as evil:
        await evil.connect(server.host.listen_addrs[0])
        held = []
        ping = wire.frame(wire.Message(wire.MessageType.PING))
        for _ in range(server.limits.max_streams_per_peer):
            stream = await evil.new_stream(server.host.peer_id, PROTOCOL)
            await stream.send_all(ping)
            reader = wire.FrameReader(1024)
            while not reader.feed(await stream.receive_some(1024)):
                pass
            held.append(stream)
        replies = 0
        with contextlib.suppress(TransportError):  # the reset may come during negotiation already
            extra = await evil.new_stream(server.host.peer_id, PROTOCOL)
            await extra.send_all(ping)
            replies = await replies_until_reset(extra)
        assert replies == 0
        assert server.stats["inbound_refused_streams"] == 1
        assert sum(server.inbound_streams.values()) == server.limits.max_streams_per_peer


Replier = Callable[[bytes], Awaitable[bytes]]


async def hostile_server(host: Host, reply: Callable[[wire.Message], bytes]) -> None:
    """Serve the kad protocol on ``host`` with crafted replies (raw bytes, framing included)."""

    async def handler(stream: MuxedStream) -> None:
        reader = wire.FrameReader(4096)
        while True:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            for body in reader.feed(chunk):
                await stream.send_all(reply(wire.decode(body)))

    host.set_stream_handler(PROTOCOL, handler)


def entry_for(host: Host) -> wire.PeerEntry:
    return wire.PeerEntry(host.peer_id.raw, tuple(a.without_p2p().to_bytes() for a in host.listen_addrs))


async def test_overfull_and_oversized_replies_are_refused_and_their_sender_dropped():
    net = MemoryNetwork()
    async with dht_nodes(["client"], net=net) as (victim,), await attacker(net) as evil:
        filler = wire.PeerEntry(evil.peer_id.raw, (b"\x04\x01\x02\x03\x04\x06\x00\x01",))
        await hostile_server(evil, lambda m: wire.frame(wire.Message(4, closer=(filler,) * 33)))
        victim.host.add_addrs(evil.peer_id, evil.listen_addrs)
        victim.table.add(evil.peer_id)
        assert await victim.find_closest(victim.host.peer_id.raw) == []
        assert victim.stats["replies_refused"] == 1
        assert evil.peer_id not in victim.table

        await hostile_server(evil, lambda m: varint.encode(wire.MAX_RESPONSE + 1) + b"\x08\x04")
        victim.table.add(evil.peer_id)
        assert await victim.find_closest(victim.host.peer_id.raw) == []
        assert victim.stats["replies_refused"] == 2
        assert evil.peer_id not in victim.table


async def test_entries_with_keyless_peer_ids_are_ignored():
    net = MemoryNetwork()
    bad_key = b"\x08\x01\x12\x03abc"  # an "Ed25519" key of 3 bytes
    bogus = wire.PeerEntry(bytes([0, len(bad_key)]) + bad_key, (b"\x04\x01\x02\x03\x04\x06\x00\x01",))
    async with dht_nodes(["client"], net=net) as (victim,), await attacker(net) as evil:
        await hostile_server(evil, lambda m: wire.frame(wire.Message(4, closer=(bogus,) * 10)))
        link(victim, type("H", (), {"host": evil})())  # type: ignore[arg-type]
        await victim.find_closest(victim.host.peer_id.raw)
        assert victim.stats["bad_peer_ids"] == 10
        assert victim.stats["rpcs"] == 1  # none of them was asked
        assert len(victim.addr_book) == 0


async def test_poisoned_target_address_is_proved_wrong_and_the_lookup_goes_on():
    net = MemoryNetwork()
    async with (
        dht_nodes(["client", "server", "client"], net=net) as (victim, honest, target),
        await attacker(net) as evil,
    ):
        await target.host.connect(honest.host.listen_addrs[0])
        # The attacker says the target lives at the honest server's address, and lists the honest server.
        lie = wire.PeerEntry(target.host.peer_id.raw, entry_for(honest.host).addrs)
        await hostile_server(evil, lambda m: wire.frame(wire.Message(4, closer=(lie, entry_for(honest.host)))))
        victim.host.add_addrs(evil.peer_id, evil.listen_addrs)
        victim.table.add(evil.peer_id)
        addrs = await victim.find_peer(target.host.peer_id)
        assert addrs == [target.host.listen_addrs[0].without_p2p()]
        assert victim.stats["target_addr_mismatch"] == 1
        assert victim.stats["rpcs"] == 2  # the attacker, then the honest server


async def test_concurrent_lookups_are_capped():
    net = MemoryNetwork()
    limits = attrs.evolve(QUIET, max_lookups=1, rpc_timeout=5.0)
    async with dht_nodes(["client"], net=net, limits=limits) as (victim,), await attacker(net) as tarpit:
        hold = trio.Event()

        async def never(stream: MuxedStream) -> None:
            await hold.wait()

        tarpit.set_stream_handler(PROTOCOL, never)
        victim.host.add_addrs(tarpit.peer_id, tarpit.listen_addrs)
        victim.table.add(tarpit.peer_id)
        missing = [Identity.from_seed(f"dht-missing-{i}").peer_id for i in range(3)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(victim.resolve, missing[0])
            await trio.testing.wait_all_tasks_blocked()
            assert await victim.resolve(missing[1]) == []
            assert await victim.resolve(missing[2]) == []
            assert victim.stats["lookups"] == 1
            assert victim.stats["lookups_refused"] == 2
            hold.set()
