"""Membership across whole nodes in one process: bounded degree, a silent crash detected, a graceful leave."""

from __future__ import annotations

import gc
import time

import pytest
import trio

from ocf import open_node
from ocf.membership.messages import Ping
from ocf.membership.update import Status
from ocf.transport import MemoryNetwork
from ocf.transport.memlink import Links
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


class Cluster:
    def __init__(self, node_config, n: int, **overrides) -> None:
        self.node_config = node_config
        self.n = n
        self.overrides = overrides
        self.links = Links(latency=0.002)
        self.net = MemoryNetwork(self.links)
        self.nodes: list = []
        self.scopes: list[trio.CancelScope] = []
        self.stops: list[trio.Event] = []

    async def _run(self, cfg, task_status=trio.TASK_STATUS_IGNORED) -> None:
        stop = trio.Event()  # set: leave the block as a user's Ctrl-C does (a graceful stop)
        with trio.CancelScope() as scope:  # cancelled: every task dies at once (with a crash, silently)
            async with open_node(cfg, memory_network=self.net) as node:
                task_status.started((node, scope, stop))
                await stop.wait()

    async def start(self, nursery: trio.Nursery) -> None:
        for _ in range(self.n):
            await self.add(nursery)

    async def add(self, nursery: trio.Nursery, via: int = 0):
        """Start one more node; the first is the standalone one the others bootstrap through (or ``via``)."""
        boot = (str(self.nodes[via].listen_addrs[0]),) if self.nodes else ()
        cfg = self.node_config(
            mode="node" if self.nodes else "standalone", bootstrap_addrs=boot, log_level="warning", **self.overrides
        )
        node, scope, stop = await nursery.start(self._run, cfg)
        self.nodes.append(node)
        self.scopes.append(scope)
        self.stops.append(stop)
        return node

    def all_alive(self) -> bool:
        """Every node sees every other node alive."""
        return all(sees(a, b, Status.ALIVE) for a in self.nodes for b in self.nodes if a is not b)

    def converged(self) -> bool:
        """Every node sees every other alive and holds every node's record."""
        return self.all_alive() and all(len(n.table.records) == len(self.nodes) for n in self.nodes)

    async def until(self, predicate, limit: float = 60) -> None:
        """Wait until ``predicate()`` holds, checking again after any task's step.

        Not on membership changes alone: ``converged`` also counts table
        records, which may arrive after the last membership change (such a
        wait then waited for a change that never came, and timed out at rest).
        """
        with trio.fail_after(limit):
            await wait_until(predicate)


def sees(observer, peer, status) -> bool:
    return observer.membership.status(peer.peer_id) == status


async def test_crash_is_detected_and_leaves_the_table_view(node_config):
    cluster = Cluster(node_config, 6, membership_degree=3, membership_suspicion=1.0, membership_probe_interval=0.2)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        nodes = cluster.nodes
        await cluster.until(cluster.all_alive)
        victim = nodes[3]
        cluster.links.crash(victim.listen_addrs[0].value_for("memory"))
        cluster.scopes[3].cancel()
        rest = [n for n in nodes if n is not victim]
        await cluster.until(lambda: all(sees(n, victim, Status.DEAD) for n in rest))
        assert all(str(victim.peer_id) not in n.table.entries() for n in rest)
        assert sum(n.membership.swim.stats["declared_dead"] for n in rest) >= 1
        nursery.cancel_scope.cancel()


async def test_graceful_leave_is_seen_as_left(node_config):
    cluster = Cluster(node_config, 4, membership_degree=3)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        nodes = cluster.nodes
        await cluster.until(cluster.all_alive)
        leaver = nodes[2]
        cluster.stops[2].set()
        rest = [n for n in nodes if n is not leaver]
        try:
            await cluster.until(lambda: all(sees(n, leaver, Status.LEFT) for n in rest), limit=20)
        except trio.TooSlowError:
            raise AssertionError([n.membership.status(leaver.peer_id) for n in rest]) from None
        assert all(n.membership.swim.stats["declared_dead"] == 0 for n in rest)  # no one had to suspect it
        nursery.cancel_scope.cancel()


async def test_a_left_is_read_by_neighbours_before_the_node_is_gone(node_config):
    """A leaving node's signed "left" is delivered, not only written: it waits (within a second) until
    each neighbour's handler has read it. Here the hub starts reading a new stream 0.3 s late; when the
    "left" was only written, the connection's close reset the stream first and the hub never read it."""
    from ocf.membership.driver import PROTOCOL

    net = MemoryNetwork()
    async with open_node(node_config(mode="standalone"), memory_network=net) as hub:
        cfg = node_config(mode="node", bootstrap_addrs=(str(hub.listen_addrs[0]),))
        async with open_node(cfg, memory_network=net) as worker:
            await wait_until(lambda: hub.membership.alive(worker.peer_id) and worker.membership.alive(hub.peer_id))
            leaving = worker.peer_id

            async def late(stream):
                await trio.sleep(0.3)
                await hub.membership.handle(stream)

            hub.host.set_stream_handler(PROTOCOL, late)
            senders = worker.membership._senders
            closed = dict(senders)
            for send in closed.values():
                send.close()  # the worker's next messages go over new streams, which the hub reads late
            with trio.fail_after(10):
                await wait_until(lambda: all(senders.get(peer) is not send for peer, send in closed.items()))
            t0 = trio.current_time()
        took = trio.current_time() - t0
        assert hub.membership.status(leaving) == Status.LEFT  # already: no waiting here
        assert took < 5.0  # within the 5 s a shutdown may take (README); the budgets are 1 s each


async def test_node_table_digests_do_not_grow_with_the_table(node_config):
    """Once converged, a node table round is one fixed-size digest per neighbour, whatever N."""
    from ocf.nodetable import wire

    cluster = Cluster(node_config, 5, membership_degree=4)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        nodes = cluster.nodes
        await cluster.until(cluster.converged)
        digest = wire.encode(wire.digest_message(nodes[0].table.digest))
        assert len(digest) < 64 * 17 + 32
        assert len({tuple(n.table.digest) for n in nodes}) == 1  # equal tables, equal digests
        nursery.cancel_scope.cancel()


async def test_node_table_digests_rest_while_both_sides_agree_and_repair_when_not(node_config):
    """At rest no table digest is sent between agreeing peers (it was 60% of idle bytes); a difference restarts them."""
    cluster = Cluster(node_config, 3, membership_degree=2, verify_interval=0.2)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        nodes = cluster.nodes
        await cluster.until(cluster.converged)
        with trio.fail_after(30):
            await wait_until(lambda: all(n.table.stats["digests_skipped"] >= 10 for n in nodes))
        rounds = [n.table.stats["digests_skipped"] for n in nodes]
        received = [n.table.stats["sync_rounds"] for n in nodes]
        with trio.fail_after(30):
            await wait_until(
                lambda: all(n.table.stats["digests_skipped"] >= r + 18 for n, r in zip(nodes, rounds, strict=True))
            )
        # About 20 rounds per node: at most one digest in ten is sent (the forced one), per neighbour.
        grew = [n.table.stats["sync_rounds"] - r for n, r in zip(nodes, received, strict=True)]
        assert max(grew) <= 3 * 2, grew
        # No stream keeps its last message while it waits for the next (a digest is 4 KB, a page up to 256 members).
        ours = [[format(h, "x") for h in n.table.digest] for n in nodes]
        ours += [[format(h, "x") for h in n.membership.swim.digest] for n in nodes]
        gc.collect()
        messages = [o for o in gc.get_objects() if type(o) is dict and o.get("t") in ("digest", "dig")]
        kept = [o for o in messages if o.get("d") in ours]
        assert kept == []
        # One node loses a record (as if it had missed it): its digest changes, it sends it, and it is repaired.
        victim, lost = nodes[1], nodes[2].peer_id
        victim.table._forget([lost])
        with trio.fail_after(30):
            await wait_until(lambda: lost in victim.table.records)
        nursery.cancel_scope.cancel()


async def test_load_is_read_from_its_source_when_membership_wakes(node_config):
    # How the gateway publishes: membership reads its in-flight count, nobody calls in per request.
    cluster = Cluster(node_config, 2, membership_probe_interval=0.2)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        a, b = cluster.nodes
        await cluster.until(lambda: sees(b, a, Status.ALIVE))
        serving = [6]
        a.membership.load_from(lambda: serving[0])
        with trio.fail_after(30):
            await wait_until(lambda: b.membership.load(a.peer_id) == 6)
        nursery.cancel_scope.cancel()


async def test_a_node_keeps_one_peer_id_and_one_name_per_peer(node_config):
    """Table and membership share each peer's PeerId and its text: at N=1,000 a second set cost ~0.3 KB a peer."""
    cluster = Cluster(node_config, 5, membership_degree=3, membership_probe_interval=0.2)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        nodes = cluster.nodes
        await cluster.until(cluster.converged)
        # A new signed alive (here: a load change) arrives with a fresh copy of the name; it must not be kept.
        nodes[1].membership.load_from(lambda: 3)
        with trio.fail_after(30):
            await wait_until(lambda: all(n.membership.load(nodes[1].peer_id) == 3 for n in nodes if n is not nodes[1]))
        # So does a new record (here: a service change): its owner is read as the PeerId already kept.
        await nodes[1].table.set_services([{"name": "llm", "status": "healthy", "identity_group": ["model=m"]}])
        seq = nodes[1].table.records[nodes[1].peer_id]
        with trio.fail_after(30):
            await wait_until(lambda: all(n.table.records.get(nodes[1].peer_id) == seq for n in nodes))
        for node in nodes:
            swim = node.membership.swim
            names = {name: name for name in swim.members}
            for other in nodes:
                if other is node:
                    continue
                text = str(other.peer_id)
                pid = node.table.by_text[text]
                assert node.membership._pid(text) is pid  # one PeerId: the table's
                assert names[text] is str(pid)  # one text: the member's name is the table's
                assert swim.members[text].proof.peer is str(pid)
                assert node.table.docs[pid].owner is pid  # the record's owner too, after an update
            assert list(node.membership._ids) == [str(node.peer_id)]  # membership keeps no PeerId of its own
        nursery.cancel_scope.cancel()


async def test_heartbeats_are_forgotten_once_membership_vouches_and_a_joiner_still_gets_every_record(node_config):
    """A start-up heartbeat helps a record travel while it is news; after BEAT_RELAY_FOR it costs memory for nothing."""
    from ocf.nodetable.table import BEAT_RELAY_FOR

    cluster = Cluster(node_config, 5, membership_degree=2, membership_probe_interval=0.2)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        nodes = cluster.nodes
        await cluster.until(cluster.converged)
        assert sum(len(n.table.beats) for n in nodes) > 5  # each holds some peers' beats
        for node in nodes:
            node.table.clock = lambda: time.time() + BEAT_RELAY_FOR + 1
            await node.table.prune()
        assert [set(n.table.beats) - {n.peer_id} for n in nodes] == [set()] * 5
        # A joiner gets every record, most relayed by nodes that now hold no heartbeat to send with them.
        joiner = await cluster.add(nursery, via=4)
        await cluster.until(lambda: cluster.all_alive(), limit=30)
        with trio.fail_after(30):
            await wait_until(lambda: len(joiner.table.records) == 6)
        nursery.cancel_scope.cancel()


async def test_a_long_absence_is_repaired(node_config, autojump_clock):
    """Two halves apart for longer than members are remembered find each other again and repair what changed.

    The partition outlasts suspicion, death and the tombstone (dead_keep), so
    each side has forgotten the other's members; a record changed meanwhile
    must still reach the other side once the links heal.
    """
    from ocf.membership.swim import SwimConfig

    cluster = Cluster(node_config, 6, membership_degree=3)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        nodes = cluster.nodes
        await cluster.until(cluster.all_alive)
        names = [n.listen_addrs[0].value_for("memory") for n in nodes]
        left, right = nodes[:3], nodes[3:]
        cluster.links.partition(names[:3], names[3:])
        await cluster.until(lambda: all(not a.membership.alive(b.peer_id) for a in left for b in right), limit=60)
        with trio.fail_after(SwimConfig().dead_keep + 120):  # past the tombstones: the other side is forgotten
            await wait_until(lambda: all(a.membership.status(b.peer_id) is None for a in left for b in right))
        changed = right[1]
        await changed.table.set_services([{"name": "llm", "status": "healthy", "identity_group": ["model=absent"]}])
        cluster.links.heal()
        await cluster.until(cluster.all_alive, 300)

        def repaired() -> bool:
            entries = [n.table.entry(changed.peer_id) or {} for n in left]
            return all(any("model=absent" in s["identity_group"] for s in e.get("service", [])) for e in entries)

        with trio.fail_after(120):
            await wait_until(repaired)
        nursery.cancel_scope.cancel()


async def test_a_member_that_is_no_neighbour_is_reached_at_its_signed_addresses(node_config):
    """An indirect probe or a suspicion goes to members we are not connected to: dialed at their own addresses."""
    cluster = Cluster(node_config, 6, membership_degree=2)
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery)
        nodes = cluster.nodes
        await cluster.until(cluster.all_alive)
        pairs = [(a, b) for a in nodes for b in nodes if a is not b and not a.host.is_connected(b.peer_id)]
        assert pairs, "degree 2 of 6 leaves some members unconnected"
        observer, target = pairs[0]
        assert not observer.host.peer_addrs(target.peer_id)  # nothing learned but membership's view
        # What the target signed, as the observer holds it: its listen addresses without /p2p/<ID>
        # (the member is named beside them), 57 bytes shorter each than the listen address.
        signed = observer.membership.swim.members[str(target.peer_id)].addrs
        assert signed == tuple(str(a.without_p2p()) for a in target.listen_addrs)
        assert all("/p2p/" not in a for a in signed)
        shorter = [len(str(full)) - len(a) for full, a in zip(target.listen_addrs, signed, strict=True)]
        assert shorter == [len(f"/p2p/{target.peer_id}")] * len(signed) == [57] * len(signed)
        before = observer.membership.stats["dropped_unreachable"]
        lookups = observer.dht.stats["lookups"] + observer.dht.stats["lookups_refused"]
        observer.membership.swim._send(str(target.peer_id), Ping(999_999, ()))
        observer.membership._flush()
        stats = observer.membership.stats
        with trio.fail_after(30):  # whichever comes first: the dial, or the message given up
            await wait_until(
                lambda: observer.host.is_connected(target.peer_id) or stats["dropped_unreachable"] > before
            )
        assert observer.host.is_connected(target.peer_id) and stats["dropped_unreachable"] == before
        assert observer.dht.stats["lookups"] + observer.dht.stats["lookups_refused"] == lookups  # no DHT detour
        nursery.cancel_scope.cancel()
