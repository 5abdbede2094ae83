"""Scale benchmark: N full nodes (transport, membership, node table) in one process, with churn.

    python benchmarks/scale.py --nodes N [--churn R] [--latency MS] [--loss P] [--minutes M] [--quick]

Every node runs the real stack on the in-memory network (multistream, Noise,
yamux, SWIM over /ocf/swim/1.0.0, node table sync), its links simulated by
:mod:`ocf.transport.memlink` (one-way latency, loss as TCP retransmission
delay, crashes that tell no one). Each node joins through one random member
and keeps ``--degree`` neighbours. Time is Trio's MockClock (virtual): it
advances only when every task waits, so protocol timings are those of N
machines with a core each, not of N nodes sharing this machine's CPU; the
CPU each node spent (its tasks' steps, attributed by a context variable) is
reported per simulated second.

Shortcuts, said here and in the table: all nodes share one signature cache
and one record-verification cache (each record is checked once per process
instead of once per node, or N^2 Ed25519 checks would take the run's hour);
the per-node cost a real node pays is printed separately. Each node still
gets its own copy of what verification returns, so memory per node counts
every node's copy of every entry. glibc's mmap threshold is pinned at 128
KiB (:func:`fixed_mmap_threshold`): a thousand LMDB environments in one
process would otherwise have their big, mostly untouched buffers carved
from touched heap pages, which no node in a process of its own does.

Reported: time to build and converge; a service change reaching 50/99% of
nodes; a crash seen as dead by 99%; false positives (a live node declared
dead anywhere) through churn (``--churn`` of the nodes leave and as many
join per minute, half crashing, half leaving gracefully); idle bytes and
messages per node per second, against an N=100 baseline (run first, in a
process of its own, so that its leftovers do not count in N's memory); memory
per node; the busiest node's CPU; routing lookup time with 1,000 providers
against the old per-request scan.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import contextvars
import copy
import gc
import math
import logging
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ocf.config import Config  # noqa: E402
from ocf.gateway import routeindex, routing  # noqa: E402
from ocf.identity import Identity  # noqa: E402
from ocf.membership.driver import open_membership  # noqa: E402
from ocf.membership.update import Status  # noqa: E402
from ocf.membership.verify import SignatureCache  # noqa: E402
from ocf.nodetable import open_nodetable  # noqa: E402
from ocf.nodetable.record import OwnerDoc, Record  # noqa: E402
from ocf.nodetable.table import NodeTable  # noqa: E402
from ocf.store import Store  # noqa: E402
from ocf.transport import MemoryNetwork, open_host  # noqa: E402
from ocf.transport.memlink import Links  # noqa: E402
from ocf.version import __version__  # noqa: E402

SIM_NODE: contextvars.ContextVar[int] = contextvars.ContextVar("sim_node", default=-1)


class CpuByNode(trio.abc.Instrument):
    """CPU of each task step, summed by the simulated node whose context the task runs in."""

    def __init__(self) -> None:
        self.cpu: collections.Counter[int] = collections.Counter()
        self._t0 = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._t0 = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.cpu[task.context.get(SIM_NODE, -1)] += time.thread_time() - self._t0


def share_record_checks() -> tuple[dict, list[float]]:
    """Verify each distinct record once per process (see the module docstring); returns the cost log.

    The CPU is shared, not the memory: each caller gets its own copy of the
    verified entry (a fresh object and fresh bytes), as a node of its own would.
    """
    cache: dict = {}
    costs: list[float] = []
    original = NodeTable.verify_record

    def verify_record(self: NodeTable, record: Record) -> OwnerDoc:
        key = (record.owner.raw, record.seq, record.signature)
        doc = cache.get(key)
        if doc is None:
            t0 = time.perf_counter()
            doc = original(self, record)
            costs.append(time.perf_counter() - t0)
            cache[key] = doc
        mine = copy.copy(doc)
        mine._packed = bytes(bytearray(doc._packed))  # noqa: SLF001 - the frozen fields, as a node of its own holds them
        return mine

    NodeTable.verify_record = verify_record  # type: ignore[method-assign]
    return cache, costs


class Sim:
    def __init__(self, args: argparse.Namespace, n: int, root: Path, tag: str) -> None:
        self.args = args
        self.n = n
        self.root = root / tag
        self.links = Links(latency=args.latency / 1000.0, loss=args.loss, seed=args.seed)
        self.net = MemoryNetwork(self.links)
        self.verifier = SignatureCache(size=1 << 20)
        self.rng = random.Random(args.seed)
        self.nodes: dict[int, SimpleNamespace] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.stops: dict[int, trio.Event] = {}  # set: the node leaves its block, as Ctrl-C does (a graceful stop)
        self.names: dict[int, str] = {}  # node -> /memory name
        self.by_peer: dict[str, int] = {}
        self.gone: set[str] = set()  # peers crashed or departed
        self.counter = 0
        # membership observations
        self.alive_seen: collections.Counter[str] = collections.Counter()  # peer -> observers seeing it alive
        self.dead_at: dict[str, list[float]] = collections.defaultdict(list)  # peer -> times observers saw it gone
        self.false_dead: list[tuple[str, str, float]] = []
        self.graceful: set[str] = set()  # peers stopped gracefully
        self.left_seen: collections.Counter[str] = collections.Counter()  # peer -> gone notices saying it left
        # (owner, seq) -> when each node stored it, for the owners a measurement watches only: kept for
        # every insert, this instrument alone held N^2 floats (about 32 MB at N=1,000) in the nodes' memory row.
        self.watched: set[str] = set()
        self.record_at: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
        self.retired_stats: collections.Counter[str] = collections.Counter()  # node table counters of nodes gone

    def config(self, i: int) -> Config:
        a = self.args
        return Config(
            mode="node",
            host="127.0.0.1",
            tcpport=0,
            port=0,
            data_dir=self.root / str(i),
            log_level="error",
            membership_degree=a.degree,
            membership_probe_interval=a.probe,
            membership_anti_entropy=a.anti_entropy,
            verify_interval=a.anti_entropy,
        )

    async def start_node(self, nursery: trio.Nursery, join: bool = True) -> int:
        i = self.counter
        self.counter += 1
        live = self.live()  # not a node that is leaving (gracefully, for a second or two) nor a crashed one
        target = self.nodes[self.rng.choice(live)].listen_addrs[0] if (join and live) else None
        await nursery.start(self._run_node, i, target)
        return i

    async def _run_node(self, i: int, target: object, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        SIM_NODE.set(i)
        config = self.config(i)
        identity = Identity.from_seed(f"scale-{self.root.name}-{i}")
        store = Store.open(config.data_dir, map_size=8 << 20, sync=False)
        # The parts of a node this simulation runs (no gateway, services or tracker).
        node = SimpleNamespace(peer_id=identity.peer_id, host=None, membership=None, table=None, listen_addrs=[])
        peer = str(node.peer_id)
        stop = trio.Event()
        try:
            with trio.CancelScope() as scope:
                async with contextlib.AsyncExitStack() as stack:
                    node.host = await stack.enter_async_context(open_host(identity, config, self.net))
                    node.listen_addrs = list(node.host.listen_addrs)
                    self.names[i] = node.listen_addrs[0].value_for("memory") or ""
                    node.membership = await stack.enter_async_context(
                        open_membership(node.host, identity, config, verifier=self.verifier)
                    )
                    node.membership.on_change(self._observer(peer))
                    node.table = await stack.enter_async_context(
                        open_nodetable(node.host, config, identity, store, __version__, node.membership)
                    )
                    self._watch_records(peer, node.table)
                    self.nodes[i] = node
                    self.scopes[i] = scope
                    self.stops[i] = stop
                    self.by_peer[peer] = i
                    task_status.started()
                    if target is not None:
                        with contextlib.suppress(Exception):
                            await node.host.connect(target)
                    await stop.wait()
        finally:
            if node.table is not None:
                self.retired_stats.update(node.table.stats)
            self.nodes.pop(i, None)
            self.scopes.pop(i, None)
            self.stops.pop(i, None)
            store.close()

    def _observer(self, observer: str):
        def changed(pid: object, status: Status) -> None:
            peer = str(pid)
            now = trio.current_time()
            if status.gone:
                self.dead_at[peer].append(now)
                if status == Status.LEFT:
                    self.left_seen[peer] += 1
                if status == Status.DEAD and peer not in self.gone and peer in self.by_peer:
                    self.false_dead.append((observer, peer, now))

        return changed

    def _watch_records(self, observer: str, table: NodeTable) -> None:
        original = table.insert

        def insert(record: Record, doc: OwnerDoc, *, stored: bool = False) -> None:
            original(record, doc, stored=stored)
            if self.watched:
                owner = str(record.owner)
                if owner in self.watched:
                    self.record_at[(owner, record.seq)].append(trio.current_time())

        table.insert = insert  # type: ignore[method-assign]

    def table_stats(self) -> collections.Counter[str]:
        """The node table counters summed over every node of the run, gone or not."""
        total = collections.Counter(self.retired_stats)
        for node in self.nodes.values():
            total.update(node.table.stats)
        return total

    def live(self) -> list[int]:
        return [i for i in self.nodes if str(self.nodes[i].peer_id) not in self.gone]

    def converged(self) -> float:
        """Fraction of (observer, live peer) pairs where the observer sees the peer alive."""
        live = self.live()
        if len(live) < 2:
            return 1.0
        peers = [str(self.nodes[i].peer_id) for i in live]
        ok = 0
        for i in live:
            members = self.nodes[i].membership.swim.members
            me = str(self.nodes[i].peer_id)
            for p in peers:
                if p != me:
                    m = members.get(p)
                    ok += m is not None and not m.status.gone
        return ok / (len(live) * (len(live) - 1))

    def table_full(self) -> float:
        live = self.live()
        return sum(min(len(self.nodes[i].table.records), len(live)) for i in live) / (len(live) * len(live))

    def tables_complete(self) -> float:
        """Fraction of (node, live node) pairs where the node's table holds that live node's record."""
        live = self.live()
        ids = [self.nodes[i].peer_id for i in live]
        held = sum(sum(1 for p in ids if p in self.nodes[i].table.records) for i in live)
        return held / (len(live) * len(live)) if live else 1.0

    async def crash(self, i: int, graceful: bool = False) -> str:
        """Kill node ``i`` silently, or stop it as a user does (its departure sent, its connections closed).

        A graceful stop leaves the node's block: a cancel would stop its pushers and senders before
        the departure, so it would be found dead by probing, as a crash is.
        """
        node = self.nodes[i]
        peer = str(node.peer_id)
        self.gone.add(peer)
        if graceful:
            self.graceful.add(peer)
            self.stops[i].set()
        else:
            self.links.crash(self.names[i])
            self.scopes[i].cancel()
        return peer


async def full_collections(every: float) -> None:
    """Run Python's full (oldest-generation) garbage collection every ``every`` simulated seconds, and only then.

    One process holding a thousand nodes has a heap of gigabytes. Left to its
    own trigger, the collector walks all of it whenever the objects promoted
    since the last walk reach a quarter of it, and Trio's many short-lived
    objects that outlive a young collection get there fast: that took a third
    of the run's CPU at N=1,000. A real node's heap is a thousandth of this.
    Young collections still run as usual, so short cycles are still freed.
    """
    gc.set_threshold(10_000, 20, 1 << 30)
    try:
        while True:
            await trio.sleep(every)
            gc.collect()
    finally:
        gc.set_threshold(*DEFAULT_GC)
        gc.unfreeze()  # what churn froze


DEFAULT_GC = gc.get_threshold()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def wait_until(pred, step: float = 0.25, limit: float = 600.0) -> float:
    t0 = trio.current_time()
    while not pred():
        if trio.current_time() - t0 > limit:
            raise TimeoutError("condition not reached")
        await trio.sleep(step)
    return trio.current_time() - t0


async def build(sim: Sim, nursery: trio.Nursery, rows: list, cpu: CpuByNode) -> None:
    t0 = trio.current_time()
    w0 = time.perf_counter()
    rss0 = rss_bytes()
    await sim.start_node(nursery, join=False)
    for k in range(2, sim.n + 1):
        await sim.start_node(nursery)
        await trio.sleep(sim.args.join_gap)
        if k % 100 == 0:  # a thousand nodes take a while: show that it moves
            print(f"    {k} of {sim.n} started ({time.perf_counter() - w0:.0f} s wall)", file=sys.stderr, flush=True)
    started = trio.current_time() - t0
    await wait_until(lambda: sim.converged() >= 1.0)
    members_t = trio.current_time() - t0
    await wait_until(lambda: sim.table_full() >= 1.0)
    table_t = trio.current_time() - t0
    gc.collect()
    per_node = memory_per_node(rss0, sim.n)
    rows.append((f"N={sim.n}: nodes started (one joins every {sim.args.join_gap * 1000:g} ms)", f"{started:.1f} s sim"))
    rows.append((f"N={sim.n}: every node sees every node alive", f"{members_t:.1f} s sim"))
    rows.append(
        (f"N={sim.n}: every table holds every record", f"{table_t:.1f} s sim ({time.perf_counter() - w0:.0f} s wall)")
    )
    rows.append((f"N={sim.n}: memory per node at convergence (RSS growth / N)", per_node))
    rows.append(records_row(sim, f"N={sim.n}: node table records sent / stored, to converge"))


def records_row(sim: Sim, label: str) -> tuple[str, str]:
    """Record copies sent against records stored, over all nodes so far: 1.00 would be no copy wasted."""
    st = sim.table_stats()
    sent, stored = st["records_sent"], st["records_received"]
    return (label, f"{sent} / {stored} ({sent / max(1, stored):.2f} sent per record stored)")


async def idle_traffic(sim: Sim, seconds: float, cpu: CpuByNode) -> tuple[float, float, float]:
    stats = sim.links.stats
    b0, w0 = sum(stats.bytes.values()), sum(stats.writes.values())
    cpu0 = dict(cpu.cpu)
    t0 = trio.current_time()
    trio.lowlevel.add_instrument(cpu)
    try:
        await trio.sleep(seconds)
    finally:
        trio.lowlevel.remove_instrument(cpu)
    dt = trio.current_time() - t0
    n = len(sim.live())
    bps = (sum(stats.bytes.values()) - b0) / n / dt
    wps = (sum(stats.writes.values()) - w0) / n / dt
    busiest = max((c - cpu0.get(k, 0.0)) for k, c in cpu.cpu.items() if k >= 0) / dt
    return bps, wps, busiest


async def change_propagation(sim: Sim, rounds: int) -> tuple[list[float], list[float]]:
    p50s, p99s = [], []
    for r in range(rounds):
        i = sim.rng.choice(sim.live())
        node = sim.nodes[i]
        t0 = trio.current_time()
        sim.watched.add(str(node.peer_id))
        await node.table.set_services([{"name": "llm", "status": "healthy", "identity_group": [f"model=m{r}"]}])
        key = (str(node.peer_id), node.table.records[node.peer_id])
        n = len(sim.live()) - 1
        await wait_until(lambda key=key, n=n: len(sim.record_at[key]) >= n, step=0.05)
        times = sorted(t - t0 for t in sim.record_at.pop(key)[1:])
        sim.watched.discard(str(node.peer_id))
        p50s.append(percentile(times, 0.5))
        p99s.append(percentile(times, 0.99))
    return p50s, p99s


async def kill_detection(sim: Sim, kills: int) -> list[float]:
    out = []
    for _ in range(kills):
        i = sim.rng.choice(sim.live())
        t0 = trio.current_time()
        peer = await sim.crash(i)
        observers = len(sim.live())
        await wait_until(
            lambda peer=peer, observers=observers: len(sim.dead_at[peer]) >= int(0.99 * observers), step=0.1, limit=120
        )
        out.append(sorted(sim.dead_at[peer])[int(0.99 * observers) - 1] - t0)
    return out


async def churn(sim: Sim, nursery: trio.Nursery, minutes: float, rate: float) -> tuple[int, int]:
    """``rate`` of the nodes leave and as many join per minute, at random moments; half crash."""
    events = int(sim.n * rate * minutes)
    if events == 0:
        await trio.sleep(minutes * 60)
        return 0, 0
    gap = minutes * 60 / events
    left = joined = 0
    w0 = time.perf_counter()
    t0 = trio.current_time()
    fp0 = len(sim.false_dead)
    for k in range(1, events + 1):
        if k % max(1, events // 10) == 0:  # a long run reports what it has found so far, not only at the end
            print(
                f"    churn: {k} of {events} events, {(trio.current_time() - t0) / 60:.1f} sim min, "
                f"{len(sim.false_dead) - fp0} false positives so far ({time.perf_counter() - w0:.0f} s wall)",
                file=sys.stderr,
                flush=True,
            )
        await trio.sleep(gap * (0.5 + sim.rng.random()))
        live = sim.live()
        await sim.crash(sim.rng.choice(live), graceful=sim.rng.random() < 0.5)
        left += 1
        await sim.start_node(nursery)
        joined += 1
    await trio.sleep(sim.args.probe * 20)
    return left, joined


def routing_lookup(providers: int) -> tuple[float, float]:
    entries = {}
    for i in range(providers):
        peer = f"12D3KooWpeer{i:06d}"
        entries[peer] = {
            "id": peer,
            "connected": True,
            "service": [{"name": "llm", "status": "healthy", "identity_group": [f"model=m{i % 10}"]}],
        }
    index = routeindex.build(entries, "me")
    rng = random.Random(1)
    loads = {peer: rng.randrange(4) for peer in entries}

    def weigh(p: routing.Provider) -> float:
        return routeindex.weight(True, None, loads[p.peer])  # the simulation measures no RTTs

    reps = 20000
    t0 = time.perf_counter()
    for _ in range(reps):
        routeindex.pick(index.lookup("llm", {"model": "m3"}), weigh, rng)
    new = (time.perf_counter() - t0) / reps
    reps_old = 200
    t0 = time.perf_counter()
    for _ in range(reps_old):
        found = routing.providers_of(entries, "llm", "me")
        keys = routing.identity_keys(found)
        cands = routing.select(found, {"model": "m3"}, service="llm", known=list, has_body=True, keys=keys)
        routing.choose(cands, loads, rng)
    old = (time.perf_counter() - t0) / reps_old
    return new, old


def memory_per_node(rss0: dict[str, int], n: int) -> str:
    """Resident memory the process grew by since ``rss0``, per node: heap, and the LMDB file's pages.

    The two are told apart because they are not the same cost: anonymous
    memory (Python objects, native heaps) is the node's own, while the pages
    of its LMDB file that it has read or written are the kernel's page cache,
    mapped into the process, which the kernel drops under memory pressure.
    """
    now = rss_bytes()
    mib = {k: (now[k] - rss0[k]) / n / (1 << 20) for k in now}
    return f"{mib['total']:.2f} MiB (heap {mib['anon']:.2f}, LMDB file pages {mib['file']:.2f})"


def fixed_mmap_threshold(size: int = 128 * 1024) -> str:
    """Pin glibc's mmap threshold (as ``MALLOC_MMAP_THRESHOLD_`` does) for this process; say what was done.

    A shortcut of the simulation, like the shared caches: a thousand LMDB
    environments in one process. Each opens with megabytes of transaction
    buffers, mostly never touched. glibc serves blocks that large with
    mmap (fresh pages: not resident until written), but the first time it
    frees one it raises its threshold to that size, and later environments'
    buffers are carved from the heap, over pages other nodes touched and
    freed: resident. A node in a process of its own opens its one
    environment at start, before that. N=1,000 on 9a25dde: 3.07 MiB per node
    (heap 2.60) with the threshold moving, 2.62 (heap 2.15) pinned; the
    census of Python objects the same.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if libc.mallopt(-3, size) == 1:  # M_MMAP_THRESHOLD; also stops glibc moving it
            return f"glibc mmap threshold pinned at {size // 1024} KiB"
    except (OSError, AttributeError):
        pass
    return "allocator defaults (not glibc)"


def rss_bytes() -> dict[str, int]:
    """Resident bytes: ``total``, ``anon`` (heap) and ``file`` (mapped file pages), from /proc/self/status."""
    fields = {"VmRSS": "total", "RssAnon": "anon", "RssFile": "file"}
    out = dict.fromkeys(fields.values(), 0)
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = int(value.split()[0]) * 1024
    return out


class Rows(list):
    """The table's rows, each also printed to stderr as it is measured (a long run shows progress)."""

    def append(self, row: tuple[str, str]) -> None:
        print(f"  {row[0]}: {row[1]}", file=sys.stderr, flush=True)
        super().append(row)


def baseline_in_own_process(args: argparse.Namespace) -> tuple[list[tuple[str, str]], float, float]:
    """Measure the baseline size in a process of its own: its rows, and its idle bytes and writes per second.

    In the same process, the N=1,000 run's memory per node came out 0.5 MiB
    higher after an N=100 run (4.34 against 3.83 MiB): what the allocator
    kept from the first run is not the second run's nodes' memory.
    """
    import concurrent.futures
    import multiprocessing

    base = copy.copy(args)
    base.nodes, base.baseline = args.baseline, 0
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_run_baseline, base).result()


def _run_baseline(args: argparse.Namespace) -> tuple[list[tuple[str, str]], float, float]:
    logging.getLogger("ocf").setLevel(logging.CRITICAL)
    fixed_mmap_threshold()
    measured: dict[str, float] = {}
    rows = trio.run(main, args, None, measured, clock=trio.testing.MockClock(autojump_threshold=0))
    return list(rows), measured["bps"], measured["wps"]


async def main(
    args: argparse.Namespace,
    baseline: tuple[float, float] | None = None,
    measured: dict[str, float] | None = None,
) -> list[tuple[str, str]]:
    """Build ``args.nodes`` nodes and measure them; ``baseline`` is the baseline's idle (bytes/s, writes/s).

    Without a baseline (the baseline's own run) only the build, memory and
    idle traffic are measured, and the idle figures go into ``measured``.
    The nodes' stores go in a temporary directory, removed at the end (a
    run of 1,000 nodes leaves half a gigabyte).
    """
    with tempfile.TemporaryDirectory(prefix="ocf-scale-") as tmp:
        return await _measure(args, baseline, measured, Path(tmp))


async def _measure(
    args: argparse.Namespace,
    baseline: tuple[float, float] | None,
    measured: dict[str, float] | None,
    root: Path,
) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = Rows()
    cpu = CpuByNode()  # on only while idle traffic is measured: an instrument costs every task step
    _, record_costs = share_record_checks()
    baseline_bps, baseline_wps = baseline if baseline is not None else (None, None)
    target = measured is None
    n = args.nodes
    sim = Sim(args, n, root, f"n{n}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(full_collections, 30.0)
        rss0 = rss_bytes()
        await build(sim, nursery, rows, cpu)
        await trio.sleep(args.settle)  # the joins' gossip drains before "idle" is measured
        gc.collect()
        rows.append((f"N={n}: memory per node after {args.settle:g} s settling", memory_per_node(rss0, n)))
        bps, wps, busiest = await idle_traffic(sim, args.idle, cpu)
        rows.append(
            (
                f"N={n}: idle traffic per node ({args.idle:g} s, whole anti-entropy rounds)",
                f"{bps / 1024:.2f} KiB/s, {wps:.1f} writes/s",
            )
        )
        rows.append((f"N={n}: busiest node's CPU (idle)", f"{busiest * 100:.1f}% of a core"))
        if target:
            if baseline_bps and baseline_wps:
                rows.append(
                    (
                        f"idle traffic ratio N={n} / N={args.baseline} (target <= 1.5)",
                        f"bytes {bps / baseline_bps:.2f}, writes {wps / baseline_wps:.2f}",
                    )
                )
            p50s, p99s = await change_propagation(sim, args.rounds)
            rows.append(("service change reaches 50% of nodes", f"{statistics_fmt(p50s)}"))
            rows.append(("service change reaches 99% of nodes (target < 5 s)", f"{statistics_fmt(p99s)}"))
            kills = await kill_detection(sim, args.kills)
            rows.append(("crash seen dead by 99% of nodes (target < 10 s)", statistics_fmt(kills)))
            fp0 = len(sim.false_dead)
            # The built network's objects never become garbage as a whole: moved out of the collector's
            # sight, a full collection walks only what churn creates (it was a tenth of the churn's CPU at
            # N=1,000). A departed node's cycles among them stay until the run ends: bounded, a run's worth.
            gc.collect()
            gc.freeze()
            left, joined = await churn(sim, nursery, args.minutes, args.churn)
            rows.append(
                (
                    f"churn: {args.minutes:g} sim min at {args.churn * 100:g}%/min ({left} left, {joined} joined)",
                    f"{len(sim.false_dead) - fp0} false positives (target 0)",
                )
            )
            told = sum(sim.left_seen[p] for p in sim.graceful)
            gone = sum(len(sim.dead_at[p]) for p in sim.graceful)
            rows.append(
                (
                    "graceful stops: observers' gone notices that say left, not dead",
                    f"{told / gone * 100:.1f}% ({told} of {gone})" if gone else "none",
                )
            )
            conv = sim.converged()
            rows.append(("after churn: (observer, live peer) pairs seeing alive", f"{conv * 100:.2f}%"))
            end = trio.current_time()
            try:  # records missed during churn come by offers, wants, or the digest rounds (30 s)
                await wait_until(lambda: sim.tables_complete() >= 1.0, step=0.5, limit=120.0)
                held = f"100% within {trio.current_time() - end:.1f} s"
            except TimeoutError:
                held = f"{sim.tables_complete() * 100:.2f}% after 120 s"
            rows.append(("after churn: (node, live node) pairs whose record the node holds", held))
            rows.append(("false positives over the whole run", str(len(sim.false_dead))))
            rows.append(records_row(sim, "node table: records sent / stored (all nodes, whole run)"))
            m = [sim.nodes[i].membership.summary_stats() for i in sim.live()]
            rows.append(
                (
                    "membership: probes / failed / suspicions / refutations (all nodes)",
                    f"{sum(x['probes'] for x in m)} / {sum(x['probes_failed'] for x in m)} / "
                    f"{sum(x['suspected'] for x in m)} / {sum(x['refuted'] for x in m)}",
                )
            )
        else:
            assert measured is not None
            measured["bps"], measured["wps"] = bps, wps
        nursery.cancel_scope.cancel()
    if not target:
        return rows
    new, old = routing_lookup(1000)
    rows.append(("routing lookup + pick, 1,000 providers (target < 20 us)", f"{new * 1e6:.1f} us"))
    rows.append(
        ("  baseline: per-request scan (providers_of + select + choose)", f"{old * 1e6:.0f} us ({old / new:.0f}x)")
    )
    check = statistics_mean(record_costs)
    rows.append(
        (
            "shared caches: record verifications done once per process",
            f"{len(record_costs)} x {check * 1000:.2f} ms; a real node pays N x that at join",
        )
    )
    rows.append(("  membership signature checks / cache hits (shared)", f"{sim.verifier.checks} / {sim.verifier.hits}"))
    return rows


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def statistics_fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {percentile(values, 0.5):.2f} s, max {max(values):.2f} s ({len(values)} runs)"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--baseline", type=int, default=100, help="same-run baseline size for the idle-traffic ratio")
    p.add_argument("--churn", type=float, default=0.10, help="fraction of nodes leaving (and joining) per minute")
    p.add_argument("--minutes", type=float, default=10.0, help="simulated minutes of churn")
    p.add_argument("--latency", type=float, default=5.0, help="one-way link latency, ms")
    p.add_argument("--loss", type=float, default=0.0, help="probability a write is lost (costs a retransmission)")
    p.add_argument("--degree", type=int, default=8)
    p.add_argument("--probe", type=float, default=0.5)
    p.add_argument("--anti-entropy", type=float, default=30.0)
    p.add_argument("--join-gap", type=float, default=0.02, help="simulated seconds between two joins")
    p.add_argument("--settle", type=float, default=90.0, help="simulated seconds after convergence before idle")
    p.add_argument(
        "--idle",
        type=float,
        default=None,
        help="simulated seconds of idle measurement (default: two anti-entropy rounds; rounded up to whole rounds)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--protocol",
        action="store_true",
        help="membership protocol only: sans-IO machines on a simulated datagram network (see scale_sim.py)",
    )
    p.add_argument("--quick", action="store_true", help="CI size: 24 nodes, baseline 8, 1 simulated minute")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.baseline, args.minutes, args.rounds, args.kills = 24, 8, 1.0, 1, 1
        args.settle, args.idle = 10.0, 1.0  # one anti-entropy round
    # Idle traffic is mostly probes plus one digest per neighbour per anti-entropy round. A window
    # that is not a whole number of rounds counts a share of those digests that depends on how the
    # nodes' timers happen to line up (N=100 starts within 2 s, N=1,000 over 20 s), not on N.
    rounds = max(1, math.ceil((args.idle if args.idle is not None else 2 * args.anti_entropy) / args.anti_entropy))
    args.idle = rounds * args.anti_entropy
    return args


def run(args: argparse.Namespace) -> None:
    logging.getLogger("ocf").setLevel(logging.CRITICAL)  # refusals while tables fill are expected, and counted
    w0 = time.perf_counter()
    if args.protocol:
        from scale_sim import run_protocol

        rows: list[tuple[str, str]] = Rows()
        run_protocol(args, rows)
    else:
        rows = Rows()
        rows.append(("allocator (see fixed_mmap_threshold)", fixed_mmap_threshold()))
        baseline = None
        if args.baseline and args.baseline < args.nodes:
            base_rows, bps, wps = baseline_in_own_process(args)
            rows.extend(base_rows)
            baseline = (bps, wps)
        clock = trio.testing.MockClock(autojump_threshold=0)
        rows.extend(trio.run(main, args, baseline, clock=clock))
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'measurement':<{width}}value")
    print("-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    print(
        f"(latency {args.latency:g} ms one way, loss {args.loss:g}, degree {args.degree}, probe {args.probe:g} s; "
        f"virtual time; wall {time.perf_counter() - w0:.0f} s)"
    )


if __name__ == "__main__":
    run(parse())
