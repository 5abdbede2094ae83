"""One row per owner: the seq held and when last seen live on its OwnerDoc (ocf.nodetable.rows)."""

import sys

import pytest

from ocf import open_node
from ocf.identity import Identity
from ocf.nodetable.record import OwnerDoc, Record


def _record(seed: str, seq: int = 1) -> Record:
    owner = Identity.from_seed(seed)
    doc = OwnerDoc(owner.peer_id)
    doc.update({"id": str(owner.peer_id), "role": ["worker"], "status": "online", "service": []})
    return Record.create(owner, seq, doc)


@pytest.mark.timeout(60)
async def test_the_seq_and_last_seen_of_an_owner_are_fields_of_its_row_not_dicts_of_their_own(node_config):
    n = 300
    async with open_node(node_config(mode="standalone")) as node:
        t = node.table
        records = [_record(f"row-{i}") for i in range(n)]
        for record in records:
            t.insert(record, t.verify_record(record))
        owner = records[0].owner
        assert t.records[owner] == 1 and len(t.records) == n + 1 and owner in t.records
        assert owner not in t.last_seen and t.last_seen.get(owner, 0.0) == 0.0  # relayed: never seen
        t.last_seen[owner] = 12.5
        assert t.docs[owner].seen == 12.5 and set(t.last_seen) == {owner}

        newer = _record("row-0", seq=2)  # a newer record keeps when its owner was last seen
        t.insert(newer, t.verify_record(newer))
        assert t.records[owner] == 2 and t.last_seen[owner] == 12.5

        stranger = Identity.from_seed("stranger").peer_id
        with pytest.raises(KeyError):  # liveness is kept only for rows that exist
            t.last_seen[stranger] = 1.0
        assert stranger not in t.records and t.records.get(stranger) is None

        t.evict(owner)
        assert owner not in t.records and owner not in t.last_seen and len(t.records) == n

        # The figure: the table's containers of one entry per owner are the rows and the names
        # (by_text), no more, besides records not yet written to LMDB (_unstored, emptied by the
        # next commit); a dict of 300 owners is 9.3 KB, of 1,000 about 37 KB.
        per_owner = [name for name, value in vars(t).items() if isinstance(value, dict) and len(value) >= n - 1]
        assert sorted(per_owner) == ["_unstored", "by_text", "docs"], per_owner
        assert sys.getsizeof(t.records) + sys.getsizeof(t.last_seen) <= 2 * 48  # two views, no tables
