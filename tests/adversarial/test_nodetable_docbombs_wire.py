"""A hostile peer pushes document bombs over the node-table protocol: the node refuses each and stays up."""

import hashlib
import time

import automerge.core as am
import httpx
import pytest
import trio

from ocf import open_node
from ocf.identity import Identity
from ocf.nodetable import PROTOCOL, wire
from ocf.nodetable.heartbeat import Heartbeat
from ocf.nodetable.record import Record, signing_bytes
from ocf.transport import MemoryNetwork
from tests.waiting import wait_until

from .test_nodetable_docbombs import ALICE, PANIC_DOC, _status

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


def _signed(identity, data, seq=1):
    return Record(identity.peer_id, seq, data, identity.sign(signing_bytes(identity.peer_id, seq, data)))


def _as_owner(data, identity):
    """The same bomb written by another actor: swap the actor ID, repair the chunk checksum."""
    data = data.replace(ALICE.peer_id.raw, identity.peer_id.raw)
    return data[:4] + hashlib.sha256(data[8:]).digest()[:4] + data[8:]


def _text_bomb():
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        text = tx.put_object(am.ROOT, "status", am.ObjType.Text)
        tx.splice_text(text, 0, 0, "a" * 1_000_000)
    return doc.save()


def _many_ops():
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        for i in range(5_000):
            tx.put(am.ROOT, "load", am.ScalarType.Int, i)
    return doc.save()


async def test_bombs_over_the_wire_are_refused_and_the_node_stays_up(node_config):
    mallories = [Identity.from_seed(f"mallory-{i}") for i in range(8)]
    # Eight owner-signed text bombs (the 21 KB freeze), eight many-op documents,
    # the panic document signed by its owner, and the same text bomb unsigned.
    text_bomb, many_ops = _text_bomb(), _many_ops()
    records = [_signed(m, _as_owner(text_bomb, m)) for m in mallories]
    records += [_signed(m, _as_owner(many_ops, m), seq=2) for m in mallories]
    records.append(_signed(ALICE, PANIC_DOC))
    records.append(Record(ALICE.peer_id, 2, records[0].doc, b"\0" * 64))
    net = MemoryNetwork()
    async with open_node(node_config(mode="standalone"), memory_network=net) as victim:
        async with open_node(node_config(mode="node", seed="attacker"), memory_network=net) as evil:
            await evil.host.connect(victim.listen_addrs[0])
            stream = await evil.host.new_stream(victim.peer_id, PROTOCOL)
            base = _status()["VmRSS"]
            start = trio.current_time()
            # Each with a fresh heartbeat its owner signed, as a relayed newcomer needs, so that
            # the record itself reaches the verification boundary.
            keys = {m.peer_id: m for m in [*mallories, ALICE]}
            now_ms = int(time.time() * 1000)
            items = [r.to_wire() | {"hb": Heartbeat.create(keys[r.owner], now_ms).to_wire()} for r in records]
            await stream.send_all(wire.encode({"t": "records", "records": items}))
            with trio.fail_after(10):
                await wait_until(lambda: victim.table.stats["records_rejected"] >= len(records))
            took = trio.current_time() - start
            grew = _status()["VmRSS"] - base
            await stream.aclose()
        async with httpx.AsyncClient(base_url=victim.gateway_url) as client:
            assert (await client.get("/v1/health")).status_code == 200
        assert victim.table.stats["records_rejected"] == len(records)
        assert all(m.peer_id not in victim.table.records for m in mallories)
        assert ALICE.peer_id not in victim.table.records
        assert grew < 64 * MIB
        assert took < 2.0  # 18 bombs in one message: the whole message is refused within this
