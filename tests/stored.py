"""What a node table keeps in LMDB, read the way a restart reads it (shelves and older per-record keys)."""

from __future__ import annotations

from ocf.nodetable import shelf
from ocf.nodetable.table import DB


def stored_records(store) -> dict[bytes, bytes]:
    """Every stored record by its owner's raw peer ID."""
    out: dict[bytes, bytes] = {}
    db = store.db(DB)
    with store.read() as txn:
        for key, value in txn.cursor(db=db):
            key = bytes(key)
            if shelf.is_shelf(key):
                out.update(shelf.decode(bytes(value)))
            elif key != shelf.SALT_KEY:
                out[key] = bytes(value)
    return out


def stored_record(store, raw: bytes) -> bytes | None:
    return stored_records(store).get(raw)
