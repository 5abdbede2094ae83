"""Node-table streams a peer opens and never finishes: bounded per peer, reset after the message deadline."""

import pytest
import trio

from ocf import open_node
from ocf.errors import TransportError
from ocf.identity import varint
from ocf.transport import MemoryNetwork

from ._nodetable_attacker import open_raw_stream, poll, rss

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


async def test_unfinished_messages_on_many_streams_pin_nothing(node_config):
    """1,000 streams each declaring a 1 MiB message and sending 128 KiB of it, then nothing."""
    n, sent = 1_000, 128 * 1024
    net = MemoryNetwork()
    cfg = node_config(mode="standalone", nodetable_message_timeout=1.0)
    async with open_node(cfg, memory_network=net) as hub:
        stats = hub.table.stats
        before = rss()
        async with open_node(node_config(mode="node"), memory_network=net) as attacker:
            await attacker.host.connect(hub.listen_addrs[0])
            head = varint.encode(MiB) + b"{" * (sent - 4)
            streams = []
            started = trio.current_time()

            async def attack() -> None:
                try:
                    stream = await open_raw_stream(attacker, hub)
                    streams.append(stream)
                    await stream.send_all(head)
                except TransportError:
                    pass  # reset by the hub: that is the point

            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(attack)
            # Everything past the per-peer stream limit is reset at once (the attacker's own
            # sync stream holds one of the two slots).
            await poll(lambda: stats["streams_refused"] >= n - 2)
            grown = rss() - before
            # ...and the one that got in is reset once its message is overdue.
            await poll(lambda: stats["streams_timed_out"] >= 1)
            elapsed = trio.current_time() - started
            pinned = hub.table.sync._inbound.get(attacker.peer_id, 0)
            for stream in streams:
                stream.reset()
        print(
            f"\n{n} unfinished streams: refused {stats['streams_refused']}, timed out {stats['streams_timed_out']}, "
            f"RSS +{grown / MiB:.1f} MiB"
        )
        assert stats["streams_refused"] + stats["streams_timed_out"] >= n
        assert pinned <= 1  # only the attacker's own, well-behaved sync stream is still open
        assert grown < 64 * MiB, f"RSS grew {grown / MiB:.1f} MiB"
        assert elapsed < 30


async def test_message_deadline_runs_from_the_first_byte(node_config):
    """A message dribbled one byte at a time is reset at the deadline, however steady the dribble."""
    net = MemoryNetwork()
    async with (
        open_node(node_config(mode="standalone", nodetable_message_timeout=0.5), memory_network=net) as hub,
        open_node(node_config(mode="node"), memory_network=net) as attacker,
    ):
        await attacker.host.connect(hub.listen_addrs[0])
        stream = await open_raw_stream(attacker, hub)
        payload = varint.encode(1000) + b"x" * 1000
        started = trio.current_time()
        with pytest.raises(TransportError), trio.fail_after(10):
            for i in range(len(payload)):
                await stream.send_all(payload[i : i + 1])
                await trio.sleep(0.01)
        assert trio.current_time() - started < 5
        assert hub.table.stats["streams_timed_out"] == 1
