"""Offers and wants (``/ocf/nodetable/2.1.0``): a record goes whole to each node about once, and an
offerer that never delivers, or offers owners that do not exist, costs a bounded delay and bounded memory.

Each test asserts a figure: record copies sent against nodes reached, the delay a silent offerer
causes, the wants a flood of invented owners leaves in memory.
"""

import contextlib

import pytest
import trio

from ocf import open_node
from ocf.nodetable import sync as syncmod
from ocf.nodetable import wire
from ocf.transport import MemoryNetwork

from ._nodetable_attacker import items, open_raw_stream, poll, push_records, random_ids, sybils

pytestmark = pytest.mark.timeout(120)


async def until(node, predicate):
    with trio.fail_after(30):
        while not predicate(node):
            await node.table.wait_changed()


@contextlib.asynccontextmanager
async def clique(node_config, n, net):
    """``n`` nodes, every one connected to every other, each table holding every node's record."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for _ in range(n):
            node = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))
            for other in nodes:
                await node.host.connect(other.listen_addrs[0])
            nodes.append(node)
        for node in nodes:
            for other in nodes:
                await until(node, lambda nd, o=other: nd.table.entry(o.peer_id) is not None)
        yield nodes


def sent(nodes) -> int:
    return sum(node.table.stats["records_sent"] for node in nodes)


async def test_a_relayed_record_goes_whole_to_each_node_once(node_config):
    """A record from an owner nobody is connected to reaches a clique of 8 through one node: 7 copies, one per node.

    Pushed whole, each node that got the record first sent it on to every neighbour not yet known
    to hold it: in this clique of 8, 42 copies for 7 nodes (each sent it to all 6 others); offered, 7.
    """
    net = MemoryNetwork()
    ((ident, record1),) = sybils(1)[:1]
    async with clique(node_config, 8, net) as nodes:
        source = nodes[0]
        stream = await open_raw_stream(nodes[-1], source)  # the owner's record reaches one node only
        before = sent(nodes)
        offers_before = sum(n.table.stats["offers_sent"] for n in nodes)
        # Counted from here: while the clique was built, a node could be handed a member's record by a
        # neighbour before it met that member itself, and rightly refuse it as stale (relayed without a
        # heartbeat, its owner not yet alive in membership); that record comes again once it is.
        stale_before = [n.table.stats["refused_stale"] for n in nodes]
        await push_records(stream, items(((ident, record1),)))
        for node in nodes:
            await until(node, lambda nd: nd.table.entry(ident.peer_id) is not None)
        copies = sent(nodes) - before
        offered = sum(n.table.stats["offers_sent"] for n in nodes) - offers_before
        # 7 nodes lacked it (the one that pushed it held none: it is a raw stream): 7 whole copies,
        # give or take a want that crossed the copy it asked for.
        assert 7 <= copies <= 9, copies
        assert offered >= 7
        assert [n.table.stats["refused_stale"] for n in nodes] == stale_before


async def test_an_offerer_that_never_delivers_costs_one_want_timeout(node_config):
    """A neighbour offers a record it never sends: the victim asks the next offerer after WANT_TIMEOUT (2 s)."""
    net = MemoryNetwork()
    ((ident, record1),) = sybils(1)[:1]
    text = str(ident.peer_id)
    async with contextlib.AsyncExitStack() as stack:
        victim = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))
        honest = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))
        liar = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))

        async def swallow(stream):  # reads the victim's wants and never answers
            while await stream.receive_some(65536):
                pass

        liar.host.set_stream_handler(wire.PROTOCOL, swallow)
        for node in (honest, liar):
            await node.host.connect(victim.listen_addrs[0])
        await liar.host.connect(honest.listen_addrs[0])
        await poll(lambda: liar.peer_id in victim.table.pending and honest.peer_id in victim.table.pending)
        # Settled: the honest two hold each other, and no early digest is due (a digest exchange would
        # hand the victim the record whole, by another way than the one this test is about).
        await poll(
            lambda: all(
                nd.table.entry(o.peer_id) is not None and not nd.table._digest_due
                for nd in (victim, honest)
                for o in (victim, honest)
            )
        )

        offer = await open_raw_stream(liar, victim)
        await offer.send_all(wire.encode({"t": "offer", "o": {text: record1.seq}}))
        await poll(lambda: text in victim.table.sync._wanted)
        asked_at = trio.current_time()
        source = await open_raw_stream(liar, honest)
        await push_records(source, items(((ident, record1),)))  # the honest node holds it and offers it on

        await until(victim, lambda nd: nd.table.entry(ident.peer_id) is not None)
        delay = trio.current_time() - asked_at
        assert syncmod.WANT_TIMEOUT - 0.1 <= delay < syncmod.WANT_TIMEOUT + 3.0, delay
        assert victim.table.stats["wants_retried"] >= 1
        await poll(lambda: text not in victim.table.sync._wanted)  # done once the batch is stored


async def test_offers_of_invented_owners_hold_a_bounded_number_of_wants(node_config):
    """100,000 offered owners that exist nowhere: at most WANTS_PER_PEER (256) wants kept, the rest refused."""
    net = MemoryNetwork()
    async with clique(node_config, 2, net) as (victim, attacker):
        stream = await open_raw_stream(attacker, victim)
        ids = random_ids(100_000)
        step = 1000
        for i in range(0, len(ids), step):
            await stream.send_all(wire.encode({"t": "offer", "o": dict.fromkeys(ids[i : i + step], 1)}))
        stats = victim.table.stats
        await poll(lambda: stats["wants_refused"] + stats["wants_sent"] >= len(ids))
        assert stats["wants_refused"] >= 0.9 * len(ids)  # wants time out after 2 s, freeing room for a few more
        s = victim.table.sync
        assert len(s._wanted) <= syncmod.WANTS_PER_PEER
        assert s._unanswered[attacker.peer_id] <= syncmod.WANTS_PER_PEER
        assert len(victim.table.records) == 2  # nothing invented was held
        # The victim still takes real news from the same peer.
        await attacker.table.update_own({"owner": "still-heard"})
        await until(victim, lambda nd: (nd.table.entry(attacker.peer_id) or {}).get("owner") == "still-heard")


async def ask_20_times_and_check_paced(victim, stream, ask: dict) -> None:
    """Send ``ask`` (for all 300 records) 20 times, 0.1 s apart: the burst (1,024) and 64/s more are sent."""
    before = victim.table.stats["records_sent"]
    start = trio.current_time()
    for _ in range(20):  # each after the last was served (asks that meet in one round ask once)
        await stream.send_all(wire.encode(ask))
        await trio.sleep(0.1)
    await trio.sleep(0.5)  # a measurement window: the last ask is served as far as the budget lets it
    elapsed = trio.current_time() - start
    sent = victim.table.stats["records_sent"] - before
    cfg = victim.table.config
    assert sent <= cfg.nodetable_new_owner_burst + cfg.nodetable_new_owner_rate * (elapsed + 0.5), (sent, elapsed)
    assert sent >= 300  # the first whole table went at once
    assert victim.table.stats["sends_paced"] > 0


async def test_asking_for_the_whole_table_over_and_over_on_the_previous_protocol_is_paced(node_config):
    """The same over 2.0.0, where asking is a summary page that holds nothing: 20 of them, 0.1 s apart.

    A 2.0.0 peer cannot read offers, so what its summary says it lacks is pushed whole; each empty
    page (50 bytes) asked for all 300 records again, unpaced. Now what a summary asks for is paced
    like a want: the burst (1,024) and 64/s more.
    """
    net = MemoryNetwork()
    crowd = sybils(300)
    async with contextlib.AsyncExitStack() as stack:
        victim = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))
        attacker = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))
        attacker.host.remove_stream_handler(wire.PROTOCOL)  # the victim's pusher speaks 2.0.0 to it
        await attacker.host.connect(victim.listen_addrs[0])
        stream = await attacker.host.new_stream(victim.peer_id, wire.PROTOCOL_2_0)
        await push_records(stream, items(crowd))
        await until(victim, lambda nd: len(nd.table.records) == 302)
        await poll(lambda: attacker.peer_id in victim.table.pending)
        await ask_20_times_and_check_paced(victim, stream, {"t": "summary", "lo": "", "hi": None, "have": {}})


async def test_a_node_of_the_previous_protocol_gets_records_whole(node_config):
    """A 2.0.0 node cannot read offers: its neighbours push it whole records, as before, and nothing is refused."""
    net = MemoryNetwork()
    async with contextlib.AsyncExitStack() as stack:
        old = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))
        old.host.remove_stream_handler(wire.PROTOCOL)
        a = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))
        b = await stack.enter_async_context(open_node(node_config(mode="node"), memory_network=net))
        await a.host.connect(old.listen_addrs[0])
        await b.host.connect(a.listen_addrs[0])
        await b.table.update_own({"owner": "news"})
        await until(old, lambda nd: (nd.table.entry(b.peer_id) or {}).get("owner") == "news")
        for node in (old, a, b):
            assert node.table.stats["records_rejected"] == 0
            assert node.table.stats["sync_rounds"] > 0
        assert a.host.is_connected(old.peer_id)  # no stream reset for an unknown message kind ended the link


async def test_asking_for_the_whole_table_over_and_over_is_paced(node_config):
    """20 wants for all 300 records, 0.1 s apart (6,000 sends asked): the burst (1,024) and 64/s more are sent."""
    net = MemoryNetwork()
    crowd = sybils(300)
    async with clique(node_config, 2, net) as (victim, attacker):
        stream = await open_raw_stream(attacker, victim)
        await push_records(stream, items(crowd))
        await until(victim, lambda nd: len(nd.table.records) == 302)
        await poll(lambda: attacker.peer_id in victim.table.pending)
        texts = [str(ident.peer_id) for ident, _ in crowd]
        await ask_20_times_and_check_paced(victim, stream, {"t": "want", "o": texts})
        # Our own news still reaches even this peer (after what it asked for, at its rate).
        await victim.table.update_own({"owner": "unpaced"})
        await until(attacker, lambda nd: (nd.table.entry(victim.peer_id) or {}).get("owner") == "unpaced")
