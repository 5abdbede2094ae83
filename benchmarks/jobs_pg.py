"""The tracker on PostgreSQL against the embedded LMDB store, in one run (``jobs.py --store postgresql``).

Rows, each 100 workers (``--workers``) over HTTP at batch 10, one request per
cycle (complete a batch and claim the next):

1. LMDB, one node (the baseline: ratio 1.00);
2. PostgreSQL, one node;
3. PostgreSQL, two nodes sharing the database, half the load processes on each.

For each: end-to-end jobs/s (through all 3 stages), and CPU per job of the
ocf node(s) and of PostgreSQL (every process of the throwaway cluster,
``initdb``-ed for the run with ``fsync`` on, as a real deployment). Then,
in process, the cost of a claim+complete cycle with 10k and with 1M open
jobs (``--quick``: 10k and 100k), which must not grow with the queue.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from jobs import Server, run_load, setup_load_project  # noqa: E402

from tests.pgcluster import Cluster  # noqa: E402


def cluster_cpu(cluster: Cluster) -> float:
    """CPU seconds used so far by the postmaster and its live backends."""
    import psutil

    root = psutil.Process(cluster.pid())
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def claim_cost(url: str, open_jobs: int, cycles: int) -> tuple[float, float]:
    """Microseconds per claim+complete cycle with ``open_jobs`` pending jobs (in process, one connection).

    Two medians: the whole cycle, commit included, and the cycle's statements
    without its commit. The commit is an fsync, which costs the same whatever
    the queue holds but varies with the disk's other users; the second figure
    is the part that would grow with the queue if the claim did.
    """
    from ocf.jobs.pg import PgJobStore

    store = PgJobStore(url)
    try:
        now = time.time()
        store.create_project("q", {"stages": ["only"]}, now)
        for first in range(0, open_jobs, 50_000):
            store.add_jobs("q", range(first, min(open_jobs, first + 50_000)), now)
        token = store.register_worker("q", nickname="bench", stage="only", now=now)["token"]
        samples, statements = [], []
        for _ in range(cycles):
            t0 = time.perf_counter()
            with store.batch():
                jobs = store.claim("q", token, now, limit=10)
                store.complete_many("q", token, [{"id": j["id"], "output": 1} for j in jobs], now)
                t1 = time.perf_counter()
            samples.append(time.perf_counter() - t0)
            statements.append(t1 - t0)
        return statistics.median(samples) * 1e6, statistics.median(statements) * 1e6
    finally:
        store.close()


def compare_stores(args: Any) -> None:
    quick = args.quick
    seconds = args.seconds or (3.0 if quick else 15.0)
    warmup = 1.5 if quick else 3.0
    seed = 20_000 if quick else 200_000
    batch = 10
    rows: list[tuple[str, str, str, str]] = []
    cluster = Cluster(fsync=True)
    cluster.init()
    cluster.start()
    try:
        results = {}
        for label, n_nodes, store in (
            ("LMDB, one node", 1, None),
            ("PostgreSQL, one node", 1, "pg1"),
            ("PostgreSQL, two nodes", 2, "pg2"),
        ):
            extra: tuple[str, ...] = ("--jobs.store", cluster.create_database(store)) if store else ()
            nodes = [Server(extra=extra) for _ in range(n_nodes)]
            try:
                workers = trio.run(setup_load_project, nodes[0].port, "load", seed, args.workers, 50_000)
                r = results[label] = run_load(
                    nodes[0],
                    others=tuple(nodes[1:]),
                    mode="combined",
                    impl="h11",
                    workers=workers,
                    project="load",
                    batch=batch,
                    clients=max(args.clients, n_nodes),
                    warmup=warmup,
                    seconds=seconds,
                    cpu_extra=(lambda: cluster_cpu(cluster)) if store else None,
                )
            finally:
                for node in nodes:
                    node.stop()
            base = results["LMDB, one node"]["e2e"]
            stages_done = max(r["cycles"], 1.0)  # job-stage completions per second
            note = f"ocf {r['server_cpu'] / stages_done * 1e6:.0f} us CPU/job-stage ({r['server_cpu'] * 100:.0f}% core)"
            if store:
                pg_cpu = r["extra_cpu"]
                note += f", postgres {pg_cpu / stages_done * 1e6:.0f} us CPU/job-stage ({pg_cpu * 100:.0f}% core)"
            if r["errors"]:
                note += f"; {r['errors']} errors"
            rows.append(
                (
                    f"{label}: {args.workers} workers, batch {batch}, complete+claim",
                    f"{r['e2e']:8.0f} jobs/s",
                    f"{r['e2e'] / base:.2f}" if base else "-",
                    f"{r['cycles']:.0f} job-stages/s; {note}",
                )
            )
        two = results["PostgreSQL, two nodes"]["e2e"]
        rows.append(
            (
                "target: >= 1000 jobs/s end to end with two nodes",
                f"{two:8.0f} jobs/s",
                "",
                "met" if two >= 1000 else "NOT met",
            )
        )
        small, large = (10_000, 100_000) if quick else (10_000, 1_000_000)
        cycles = 200 if quick else 1000
        cost_small = claim_cost(cluster.create_database("q1"), small, cycles)
        cost_large = claim_cost(cluster.create_database("q2"), large, cycles)
        for n, (cycle, statements) in ((small, cost_small), (large, cost_large)):
            rows.append(
                (
                    f"claim 10 + complete 10, {n:,} open jobs (in process)",
                    f"{statements:8.0f} us",
                    f"{statements / cost_small[1]:.2f}",
                    f"median without the commit (the claim reads the head of a partial index); "
                    f"{cycle:.0f} us with it (one fsync)",
                )
            )
    finally:
        cluster.cleanup()
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>20}  {'ratio':>6}  note")
    print("-" * (width + 60))
    for a, b, c_, d in rows:
        print(f"{a:<{width}}  {b:>20}  {c_:>6}  {d}")
