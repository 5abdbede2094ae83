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


def test_update_rewrites_and_deletes_in_one_transaction(tmp_path):
    with Store.open(tmp_path) as store:
        keys = [i.to_bytes(4, "big") for i in range(5)]
        store.update("t", [(k, lambda old, k=k: k * 2) for k in keys])
        assert all(store.get_bytes("t", k) == k * 2 for k in keys)
        seen = []

        def rewrite(old):
            seen.append(old)
            return None if old == keys[0] * 2 else old + b"!"

        store.update("t", [(k, rewrite) for k in keys] + [(b"absent", lambda old: None)])
        assert seen == [k * 2 for k in keys]  # each function got what was stored
        assert store.get_bytes("t", keys[0]) is None
        assert [store.get_bytes("t", k) for k in keys[1:]] == [k * 2 + b"!" for k in keys[1:]]
        store.update("t", [])


def test_a_full_map_is_a_store_error_and_nothing_of_the_transaction_is_written(tmp_path):
    """LMDB refusing a write (here: its map is full) is a StoreError naming the store, not an lmdb exception."""
    from ocf.errors import StoreError

    with Store.open(tmp_path, map_size=256 << 10) as store:
        store.update("t", [(b"first", lambda old: b"kept")])
        items = [(i.to_bytes(4, "big"), os.urandom(2000)) for i in range(400)]  # 800 KB into a 256 KiB map
        with pytest.raises(StoreError, match=r"cannot write to 't' in .*MDB_MAP_FULL"):
            store.update("t", [(k, lambda old, v=v: v) for k, v in items])
        assert store.get_bytes("t", items[0][0]) is None  # the transaction was aborted whole
        assert store.get_bytes("t", b"first") == b"kept"
        store.update("t", [(b"small", lambda old: b"ok")])  # the store is still usable
        assert store.get_bytes("t", b"small") == b"ok"


def _heap_growth(path, per_txn, queue):
    def anon():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    with Store.open(path, sync=False) as store:
        pages = [[(os.urandom(38), os.urandom(700)) for _ in range(400)] for _ in range(3)]
        before = anon()
        for page in pages:
            for i in range(0, len(page), per_txn):
                store.update("nodetable", [(k, lambda old, v=v: v) for k, v in page[i : i + per_txn]])
        queue.put(anon() - before)


def test_small_transactions_bound_the_pages_lmdb_keeps(tmp_path):
    """LMDB keeps the pages its largest write transaction dirtied until the store closes.

    Three 400-record pages from a peer, written at random keys, grew the heap
    by 1.1 MiB in one transaction per page; in transactions of 16 keys, by
    about 0.2 MiB. This is why the node table commits a few shelves at a time.
    Measured in a child process, whose heap is not the test runner's.
    """
    queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=_heap_growth, args=(tmp_path, 16, queue))
    child.start()
    growth = queue.get(timeout=60)
    child.join(timeout=60)
    assert growth < 0.5 * 2**20, f"heap grew {growth / 2**20:.2f} MiB writing 1,200 records"
