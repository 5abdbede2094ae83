"""Node table records on disk, grouped on deflated shelves (ocf.nodetable.shelf)."""

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocf import open_node
from ocf.errors import ValidationError
from ocf.identity import Identity
from ocf.nodetable import shelf
from ocf.nodetable.record import OwnerDoc, Record
from ocf.store import Store

from ..stored import stored_records

entries = st.dictionaries(st.binary(min_size=1, max_size=255), st.binary(max_size=3000), max_size=40)


@given(entries)
def test_a_shelf_gives_back_exactly_what_was_put_on_it(held):
    assert shelf.decode(shelf.encode(held)) == held


@settings(max_examples=300)
@given(entries.filter(bool), st.data())
def test_a_damaged_shelf_is_a_validation_error_never_another_one(held, data):
    """Whatever a disk does to a shelf (cut short, bytes changed), reading it gives the entries or a
    ValidationError: never garbage entries (zlib's checksum), never an exception of another kind."""
    good = shelf.encode(held)
    if data.draw(st.booleans()):
        bad = good[: data.draw(st.integers(0, len(good) - 1))]
    else:
        at = data.draw(st.integers(0, len(good) - 1))
        bad = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1 :]
    with contextlib.suppress(ValidationError):
        assert shelf.decode(bad) == held


def test_the_shelf_of_a_record_depends_on_the_stores_secret_salt():
    """A peer cannot choose keys that pile records on one shelf: it does not know where they go."""
    # 1,000 owners, so that every shelf gets some whatever the salt: with 200, one of 32 shelves
    # stayed empty for about one salt in 18 (32 x (31/32)^200), and the test failed that often;
    # with 1,000, about 5 x 10^-13.
    raws = [Identity.from_seed(str(i)).peer_id.raw for i in range(1000)]
    a, b = shelf.new_salt(), shelf.new_salt()
    on_a = [shelf.index(raw, a) for raw in raws]
    assert set(on_a) == set(range(shelf.SHELVES))
    assert on_a == [shelf.index(raw, a) for raw in raws]
    # Another salt moves about 31 in 32 (969 of 1,000; fewer than 900: about 10^-23).
    assert sum(x != y for x, y in zip(on_a, [shelf.index(raw, b) for raw in raws], strict=True)) > 900


def _gpu_node_record(i: int) -> Record:
    owner = Identity.generate()
    text = str(owner.peer_id)
    doc = OwnerDoc(owner.peer_id)
    doc.update(
        {
            "id": text,
            "owner": "",
            "role": ["worker"],
            "status": "online",
            "version": "0.1.0",
            "public_address": "",
            "addrs": [f"/ip4/10.0.{i // 250}.{i % 250}/tcp/43905/p2p/{text}", f"/ip4/127.0.0.1/tcp/43905/p2p/{text}"],
            "hardware": {
                "cpus": 64,
                "host_memory": 540_000_000_000,
                "host_memory_used": 12_000_000_000 + i,
                "gpus": [{"name": "NVIDIA A100-SXM4-80GB", "total_memory": 81920, "used_memory": i % 4096}] * 2,
            },
            "service": [
                {
                    "name": "llm",
                    "host": "localhost",
                    "port": "8080",
                    "status": "healthy",
                    "identity_group": [f"model=org/model-{i % 7}"],
                }
            ],
        }
    )
    return Record.create(owner, 1, doc)


@pytest.mark.timeout(120)
async def test_a_thousand_records_take_under_0_8_kb_of_file_each(node_config):
    """One LMDB key per record took 1,204 bytes of file (all of it resident) per 592-byte record of a
    GPU node with an LLM service: leaves two-thirds full, plus the pages recent transactions freed. On
    deflated shelves: 705. Written through the table, in pages of 400 as a joiner gets them. (Automerge
    deflates an entry's long values itself, so what shelves save here is mostly LMDB's slack; entries
    without a service, or with short ones, also share their text: a 300-node simulation's, 0.49x.)"""
    n = 1000
    records = [_gpu_node_record(i) for i in range(n)]
    size = sum(len(r.to_bytes()) for r in records) / n
    cfg = node_config(mode="standalone")
    async with open_node(cfg) as node:
        t = node.table
        for start in range(0, n, 400):
            for record in records[start : start + 400]:
                t.insert(record, record.verify())
            assert await t.wait_stored(records[start : start + 400]) == len(records[start : start + 400])
        info, stat = node.store.env.info(), node.store.env.stat()
        file_per_record = (info["last_pgno"] + 1) * stat["psize"] / n
        assert len(stored_records(node.store)) == n + 1  # and our own
        assert t.record(records[0].owner) == records[0]  # read back from its shelf
    assert 450 < size < 700  # what a record is, for the figure below
    assert file_per_record < 800, f"{file_per_record:.0f} bytes of file per {size:.0f}-byte record"
    async with open_node(cfg) as node:  # and a restart loads them all
        assert len(node.table.records) == n + 1


async def test_records_an_older_build_kept_one_to_a_key_move_onto_shelves(node_config):
    cfg = node_config(mode="standalone")
    async with open_node(cfg) as node:
        me = node.peer_id
    records = [_gpu_node_record(i) for i in range(40)]
    with Store.open(cfg.data_dir) as store:
        for record in records:
            store.put_bytes("nodetable", record.owner.raw, record.to_bytes())  # the older layout
    async with open_node(cfg) as node:
        assert all(node.table.record(r.owner) == r for r in records)
        await node.table._drain_writes(10.0)
        assert not node.table._unstored
    with Store.open(cfg.data_dir) as store:
        assert all(store.get_bytes("nodetable", r.owner.raw) is None for r in records)  # old keys gone
        stored = stored_records(store)
        assert set(stored) == {me.raw} | {r.owner.raw for r in records}
        assert all(stored[r.owner.raw] == r.to_bytes() for r in records)
    async with open_node(cfg) as node:
        assert len(node.table.records) == 41


async def test_a_damaged_shelf_is_dropped_at_start_and_the_node_goes_on(node_config, caplog):
    cfg = node_config(mode="standalone")
    records = [_gpu_node_record(i) for i in range(40)]
    async with open_node(cfg) as node:
        for record in records:
            node.table.insert(record, record.verify())
        await node.table.wait_stored(records)
        lost = node.table.shelf_of(records[0].owner)
    with Store.open(cfg.data_dir) as store:
        store.put_bytes("nodetable", shelf.key(lost), os.urandom(300))
    async with open_node(cfg) as node:
        on_lost = {r.owner for r in records if node.table.shelf_of(r.owner) == lost}
        assert on_lost and all(r.owner in node.table.records for r in records if r.owner not in on_lost)
        assert not on_lost & set(node.table.records)
        assert node.table.own_entry()["status"] == "online"
        await node.table._drain_writes(10.0)
    assert any("unreadable node table shelf" in r.getMessage() for r in caplog.records)
    with Store.open(cfg.data_dir) as store:
        stored_records(store)  # every shelf readable again
