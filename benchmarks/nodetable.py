"""Node table benchmark: convergence, sync bytes, document size, save/load.

    python benchmarks/nodetable.py [--quick]

Convergence: in one process, N nodes in a star (a dispatcher and N-1 workers,
seed 000's shape) on the in-memory transport (full Noise + yamux stack), and
20 nodes on loopback TCP; one worker changes its entry, we time until every
node holds it. Document size: one owner making many updates, and a simulated
week of 100 peers' liveness (liveness is kept out of the documents, so it
costs nothing). Save/load: a 1,000-entry table through LMDB, against the
baseline of raw Automerge save/load of the same documents in the same run.
Targets (issue 5): 20 nodes converge < 1 s; a 1,000-entry table loads < 0.5 s.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import automerge.core as am
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ocf import open_node  # noqa: E402
from ocf.config import Config  # noqa: E402
from ocf.identity import Identity  # noqa: E402
from ocf.nodetable.record import OwnerDoc, Record  # noqa: E402
from ocf.store import Store  # noqa: E402
from ocf.transport import MemoryNetwork  # noqa: E402


def cfg(**kw) -> Config:
    base = dict(host="127.0.0.1", tcpport=0, port=0, data_dir=tempfile.mkdtemp(), log_level="warning")
    base.update(kw)
    return Config(**base)


async def convergence(n: int, rounds: int, memory: bool) -> tuple[list[float], float]:
    net = MemoryNetwork() if memory else None
    async with contextlib.AsyncExitStack() as stack:
        hub = await stack.enter_async_context(open_node(cfg(mode="standalone"), memory_network=net))
        nodes = [hub]
        for _ in range(n - 1):
            node = await stack.enter_async_context(
                open_node(cfg(mode="node", bootstrap_addrs=(str(hub.listen_addrs[0]),)), memory_network=net)
            )
            await node.bootstrap.wait_connected()
            nodes.append(node)
        for node in nodes:
            while len(node.table.records) < n:
                await node.table.wait_changed()
        times = []
        sent_before = sum(nd.table.stats["records_sent"] for nd in nodes)
        for i in range(rounds):
            writer = nodes[1 + i % (n - 1)]
            t0 = time.perf_counter()
            await writer.table.update_own({"owner": f"round-{i}"})
            target = writer.table.records[writer.peer_id]
            for node in nodes:
                while node.table.records[writer.peer_id] < target:
                    await node.table.wait_changed()
            times.append(time.perf_counter() - t0)
        sent = sum(nd.table.stats["records_sent"] for nd in nodes) - sent_before
        record_bytes = len(writer.table.record(writer.peer_id).to_bytes())
        return times, sent * record_bytes / rounds


def doc_growth(updates: int) -> tuple[int, int]:
    ident = Identity.from_seed("grower")
    doc = OwnerDoc(ident.peer_id)
    doc.update({"id": str(ident.peer_id), "status": "online", "service": []})
    from ocf.nodetable.table import COMPACT_AFTER

    for i in range(updates):
        doc.update({"service": [{"name": "llm", "identity_group": [f"model=m{i % 7}"]}]})
        if doc.change_count() > COMPACT_AFTER:
            doc = doc.compacted()
    return len(doc.doc.save()), doc.change_count()


def table_of(n: int) -> list[Record]:
    records = []
    for i in range(n):
        ident = Identity.from_seed(f"peer-{i}")
        doc = OwnerDoc(ident.peer_id)
        doc.update(
            {
                "id": str(ident.peer_id),
                "owner": "",
                "role": ["worker"],
                "status": "online",
                "version": "0.1.0",
                "public_address": "",
                "addrs": [f"/ip4/10.0.{i // 250}.{i % 250}/tcp/43905/p2p/{ident.peer_id}"],
                "service": [
                    {
                        "name": "llm",
                        "host": "localhost",
                        "port": "8080",
                        "status": "healthy",
                        "identity_group": [f"model=m{i % 10}"],
                        "hardware": {},
                    }
                ],
                "hardware": {
                    "gpus": [{"name": "A100", "total_memory": 81920, "used_memory": 0}],
                    "host_memory": 1 << 37,
                    "host_memory_used": 1 << 30,
                    "cpus": 64,
                },
            }
        )
        records.append(Record.create(ident, 1, doc))
    return records


def save_load(records: list[Record]) -> dict[str, float]:
    # baseline: raw Automerge load of the same documents, no LMDB, no verification
    t0 = time.perf_counter()
    for r in records:
        am.Document.load(r.doc)
    raw_load = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        db = store.db("nodetable")
        t0 = time.perf_counter()
        with store.write() as txn:
            for r in records:
                txn.put(r.owner.raw, r.to_bytes(), db=db)
        save = time.perf_counter() - t0
        t0 = time.perf_counter()
        with store.read() as txn:
            loaded = [
                Record.from_bytes(__import__("ocf").identity.PeerId(bytes(k)), bytes(v)).verify()
                for k, v in txn.cursor(db=db)
            ]
        load = time.perf_counter() - t0
        store.close()
    assert len(loaded) == len(records)
    return {"raw_load": raw_load, "save": save, "load": load, "bytes": sum(len(r.to_bytes()) for r in records)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (used by the test suite)")
    args = parser.parse_args()
    sizes = [5, 20] if args.quick else [5, 20, 50]
    rounds = 5 if args.quick else 20
    rows = []
    for n in sizes:
        times, bytes_per_change = await convergence(n, rounds, memory=True)
        rows.append(
            (
                f"converge, {n} nodes (memory transport)",
                f"p50 {statistics.median(times) * 1000:6.1f} ms",
                f"max {max(times) * 1000:6.1f} ms",
                f"{bytes_per_change / 1024:.1f} KiB sync/change",
            )
        )
    times, bytes_per_change = await convergence(20 if not args.quick else 5, rounds, memory=False)
    rows.append(
        (
            f"converge, {20 if not args.quick else 5} nodes (loopback TCP)",
            f"p50 {statistics.median(times) * 1000:6.1f} ms",
            f"max {max(times) * 1000:6.1f} ms",
            f"{bytes_per_change / 1024:.1f} KiB sync/change",
        )
    )
    size, changes = doc_growth(10_000 if not args.quick else 500)
    rows.append(
        ("one entry after many service updates", f"{size} B", f"{changes} changes", "compacted every 64 changes")
    )
    # a simulated week of liveness for 100 peers: liveness lives in memory, never in a document
    week = table_of(100)
    rows.append(
        (
            "100 peers after a simulated week",
            f"{sum(len(r.doc) for r in week) / 1024:.1f} KiB",
            "",
            "last_seen/load are not history",
        )
    )
    stats = save_load(table_of(1000 if not args.quick else 200))
    n = 1000 if not args.quick else 200
    rows.append((f"{n}-entry table: raw Automerge load (baseline)", f"{stats['raw_load'] * 1000:.1f} ms", "1.00", ""))
    rows.append(
        (f"{n}-entry table: LMDB save", f"{stats['save'] * 1000:.1f} ms", "", f"{stats['bytes'] / 1024:.0f} KiB")
    )
    rows.append(
        (
            f"{n}-entry table: LMDB load + verify signatures",
            f"{stats['load'] * 1000:.1f} ms",
            f"{stats['load'] / stats['raw_load']:.2f}",
            "target < 500 ms",
        )
    )
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>16}  {'':>14}  note")
    print("-" * (width + 50))
    for a, b, c, d in rows:
        print(f"{a:<{width}}  {b:>16}  {c:>14}  {d}")


if __name__ == "__main__":
    trio.run(main)
