"""Expiry and liveness against hostile peers: stale owners leave memory and LMDB; a relay can't fake life."""

import os
import time

import pytest
import trio

import automerge.core as am

from ocf import open_node
from ocf.errors import TransportError
from ocf.nodetable import wire
from ocf.nodetable.heartbeat import Heartbeat, signing_bytes
from ocf.nodetable.record import OwnerDoc
from ocf.store import Store
from ocf.transport import MemoryNetwork

from ..stored import stored_records
from ._nodetable_attacker import items, open_raw_stream, poll, push_records, sybils

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def node_config(node_config):
    """These tests are about the heartbeat scheme, which a table without membership still runs."""

    def make(**overrides):
        overrides.setdefault("membership", False)
        return node_config(**overrides)

    return make


async def until(node, predicate, limit=30):
    with trio.fail_after(limit):
        while not predicate(node):
            await node.table.wait_changed()


def stored_owners(data_dir) -> int:
    with Store.open(data_dir) as store:
        return len(stored_records(store))


async def test_stale_entries_are_pruned_from_memory_and_lmdb(node_config):
    """300 relayed owners whose heartbeats stop are swept away; the store holds only us after a reopen."""
    n = 300
    net = MemoryNetwork()
    cfg = node_config(mode="standalone", stale_after=2.0)
    async with open_node(cfg, memory_network=net) as hub:
        table = hub.table
        async with open_node(node_config(mode="node"), memory_network=net) as attacker:
            await attacker.host.connect(hub.listen_addrs[0])
            stream = await open_raw_stream(attacker, hub)
            await push_records(stream, items(sybils(1_000)[:n]))
            await poll(lambda: table.stats["records_received"] >= n)
            assert stored_owners_live(hub) >= n
            await stream.aclose()
        # The periodic sweep (every stale_after/4) forgets them: no heartbeat, no direct contact.
        await until(hub, lambda nd: len(nd.table.records) == 1)
        assert table.stats["pruned"] >= n + 1  # the sybils and the departed attacker
        assert (
            set(table.last_seen) == set()
            and set(table.beats) == {hub.peer_id}
            and list(table.by_text.values()) == [hub.peer_id]
        )
        assert all(not known for known in table.peer_known.values())
    assert stored_owners(cfg.data_dir) == 1


def stored_owners_live(node) -> int:
    return len(stored_records(node.store))


async def test_a_relay_cannot_keep_a_dead_peer_alive(node_config):
    """Observer O learns victim V only through relay M; M's replayed and forged heartbeats change nothing."""
    net = MemoryNetwork()
    async with open_node(node_config(mode="standalone"), memory_network=net) as observer:
        relay_cfg = node_config(mode="node", bootstrap_addrs=(str(observer.listen_addrs[0]),))
        async with open_node(relay_cfg, memory_network=net) as relay:
            await relay.bootstrap.wait_connected()
            victim_cfg = node_config(mode="node", bootstrap_addrs=(str(relay.listen_addrs[0]),))
            async with open_node(victim_cfg, memory_network=net) as victim:
                await victim.bootstrap.wait_connected()
                v = victim.peer_id
                await until(observer, lambda nd: (nd.table.entry(v) or {}).get("connected") is True)
                assert not observer.host.is_connected(v)
                table = observer.table
                held = table.beats[v]
                seen = table.last_seen[v]
                accepted = table.stats["heartbeats_accepted"]

                # 1. Replaying the latest heartbeat: not newer, so not even verified.
                stream = await open_raw_stream(relay, observer)
                await stream.send_all(wire.encode({"t": "beats", "beats": {str(v): held.to_wire()}}))
                await poll(lambda: table.stats["sync_rounds"] > 0 and table.last_seen[v] == seen)
                # 2. The victim's own key, dated an hour ahead (a skewed or hostile clock): clamped out.
                future = Heartbeat.create(victim.identity, int(time.time() * 1000) + 3_600_000)
                await stream.send_all(wire.encode({"t": "beats", "beats": {str(v): future.to_wire()}}))
                await poll(lambda: table.stats["heartbeats_rejected"] >= 1)
                # 3. A newer heartbeat the relay signed itself: refused, and the lying stream is reset.
                ms = int(time.time() * 1000)
                forged = Heartbeat(v, ms, relay.identity.sign(signing_bytes(v, ms)))
                await stream.send_all(wire.encode({"t": "beats", "beats": {str(v): forged.to_wire()}}))
                with pytest.raises(TransportError), trio.fail_after(10):
                    while True:
                        await stream.send_all(wire.encode({"t": "beats", "beats": {}}))
                        await trio.sleep(0.01)
                assert table.stats["heartbeats_rejected"] == 2
                assert table.stats["heartbeats_accepted"] == accepted
                assert table.last_seen[v] == seen and table.beats[v] == held

                # Time passes with nothing newer signed by the victim: the entry goes stale and is pruned.
                offset = observer.config.stale_after + 60
                table.clock = lambda: time.time() + offset
                entry = table.entry(v)
                assert entry["connected"] is False and entry.get("stale") is True
                assert await table.prune() >= 1
                assert v not in table.records and v not in table.last_seen and v not in table.beats
                assert relay.peer_id in table.records  # directly connected: kept


@pytest.mark.slow
async def test_a_new_node_receives_every_entry_of_a_large_table(node_config):
    """At 20,000 entries one summary would exceed the 1 MiB message limit; paged, a newcomer gets them all."""
    # CI size: 5,000 entries at a 256 KiB limit pages just the same (the summary is ~460 KB).
    n, limit = (20_000, 1 << 20) if os.environ.get("OCF_TEST_FULL") else (5_000, 256 << 10)
    population = sybils(n)
    net = MemoryNetwork()
    big = dict(
        max_message_size=limit,
        nodetable_max_entries=n + 100,
        nodetable_new_owner_burst=n + 100,
        nodetable_verify_rate=1e6,
    )
    async with open_node(node_config(mode="standalone", **big), memory_network=net) as hub:
        now_ms = int(time.time() * 1000)
        for ident, record in population:
            hub.table.insert(
                record, OwnerDoc(record.owner, am.Document.load(record.doc))
            )  # made by us: no need to verify
            hub.table.beats[ident.peer_id] = Heartbeat.create(ident, now_ms)
            hub.table.last_seen[ident.peer_id] = now_ms / 1000
        summary_bytes = sum(len(t) + wire.ENTRY_OVERHEAD for t in hub.table.by_text)
        assert summary_bytes > hub.config.max_message_size  # unpaged, this could not travel
        cfg = node_config(mode="node", bootstrap_addrs=(str(hub.listen_addrs[0]),), **big)
        async with open_node(cfg, memory_network=net) as newcomer:
            with trio.fail_after(150):  # paged summaries of a big table: longer than until's bound
                while len(newcomer.table.records) < n + 2:
                    await newcomer.table.wait_changed()
            assert set(hub.table.records) <= set(newcomer.table.records)
            assert newcomer.table.stats["refused_full"] == newcomer.table.stats["refused_rate"] == 0
