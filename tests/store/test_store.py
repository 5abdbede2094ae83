import multiprocessing
import os

import pytest

from ocf.errors import DataDirLocked, StoreCorrupt
from ocf.store import Store


def test_roundtrip_and_named_dbs(tmp_path):
    with Store.open(tmp_path) as store:
        store.put_json("a", b"k", {"x": 1})
        store.put_bytes("b", b"k", b"raw")
        with store.write() as txn:
            store.put_json("a", b"k2", [1, 2], txn)
            store.delete("b", b"k", txn)
        assert store.get_json("a", b"k") == {"x": 1}
        assert store.get_json("a", b"k2") == [1, 2]
        assert store.get_bytes("b", b"k") is None
    with Store.open(tmp_path) as store:
        assert store.get_json("a", b"k") == {"x": 1}


def test_aborted_transaction_leaves_nothing(tmp_path):
    with Store.open(tmp_path) as store:
        with pytest.raises(RuntimeError), store.write() as txn:
            store.put_bytes("a", b"k", b"v", txn)
            raise RuntimeError("boom")
        assert store.get_bytes("a", b"k") is None


def test_second_open_in_same_process_is_refused(tmp_path):
    with Store.open(tmp_path), pytest.raises(DataDirLocked, match=str(os.getpid())):
        Store.open(tmp_path)
    Store.open(tmp_path).close()  # released on close


def _hold(path, ready, done):
    store = Store.open(path)
    ready.set()
    done.wait(30)
    store.close()


def test_second_process_is_refused(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(tmp_path, ready, done))
    proc.start()
    try:
        assert ready.wait(30)
        with pytest.raises(DataDirLocked, match="in use by another ocf node"):
            Store.open(tmp_path)
    finally:
        done.set()
        proc.join(30)
    Store.open(tmp_path).close()


def test_corrupt_store_is_a_clear_error_and_cleanslate_recovers(tmp_path):
    Store.open(tmp_path).close()
    data = tmp_path / "store" / "data.mdb"
    data.write_bytes(b"\xde\xad" * 4096)
    with pytest.raises(StoreCorrupt, match="--cleanslate"):
        Store.open(tmp_path)
    with Store.open(tmp_path, cleanslate=True) as store:
        store.put_json("a", b"k", 1)
        assert store.get_json("a", b"k") == 1


def test_cleanslate_keeps_identity(tmp_path):
    from ocf.identity import load_or_create

    ident, _ = load_or_create(tmp_path)
    with Store.open(tmp_path) as store:
        store.put_json("a", b"k", 1)
    with Store.open(tmp_path, cleanslate=True) as store:
        assert store.get_json("a", b"k") is None
    assert load_or_create(tmp_path)[0].peer_id == ident.peer_id


def test_non_json_value_is_reported(tmp_path):
    with Store.open(tmp_path) as store:
        store.put_bytes("a", b"k", b"\xff not json")
        with pytest.raises(StoreCorrupt):
            store.get_json("a", b"k")


def test_creating_a_db_inside_a_write_txn_does_not_deadlock(tmp_path):
    with Store.open(tmp_path) as store:
        with store.write() as txn:
            txn.put(b"k", b"v", db=store.db("fresh"))
        assert store.get_bytes("fresh", b"k") == b"v"
        with pytest.raises(RuntimeError), store.write() as txn:
            txn.put(b"k", b"v", db=store.db("aborted"))
            raise RuntimeError
        assert store.get_bytes("aborted", b"k") is None


def test_nested_write_is_refused(tmp_path):
    from ocf.errors import StoreError

    with Store.open(tmp_path) as store, store.write(), pytest.raises(StoreError, match="nested"), store.write():
        pass
