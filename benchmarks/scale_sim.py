"""Protocol-level scale run: N sans-IO SWIM machines on a simulated datagram network (``scale.py --protocol``).

The full-stack run (``scale.py``) costs this shared machine about a
hundredth of a core per node per simulated second, so 1,000 full nodes for
ten simulated minutes do not fit in an afternoon. This run keeps everything
the membership protocol decides (the real :class:`~ocf.membership.swim.Swim`
machines, real Ed25519 signatures, the real wire form for byte counts) and
replaces transport and time with an event queue: each message arrives after
the one-way latency (plus jitter), or is lost with probability ``--loss``
(a datagram loss, harsher than the retransmission a stream would do). Each
node keeps ``--degree`` neighbours: it "dials" random living members it
knows while below that, and drops a neighbour it sees dead or departed.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import random
import resource
import time

from ocf.identity import Identity
from ocf.membership import messages
from ocf.membership.swim import Swim, SwimConfig
from ocf.membership.update import Status
from ocf.membership.verify import SignatureCache


#: One message in this many is serialised to count bytes (the rest are counted as that average).
SAMPLE = 8


class Net:
    def __init__(self, args, rows) -> None:
        self.args = args
        self.rows = rows
        self.rng = random.Random(args.seed)
        self.now = 0.0
        self.queue: list = []
        self.seq = itertools.count()
        self.verify = SignatureCache(size=1 << 20)
        self.config = SwimConfig(
            probe_interval=args.probe, ack_timeout=args.probe / 2, anti_entropy=args.anti_entropy, spread=args.degree
        )
        self.nodes: dict[str, Swim] = {}
        self.graph: dict[str, set[str]] = {}
        self.gone: set[str] = set()
        self.counter = itertools.count()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.msgs: collections.Counter[str] = collections.Counter()
        self.false_dead: list[tuple[str, str, float]] = []
        self.gone_seen: dict[str, list[float]] = collections.defaultdict(list)
        self.inc_seen: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
        self.next_keep = 0.0
        self.sized = itertools.count()

    # --- nodes ---------------------------------------------------------------------------------

    def add(self, join: bool = True) -> str:
        ident = Identity.from_seed(f"proto-{next(self.counter)}")
        name = str(ident.peer_id)
        node = Swim(name, ident.sign, self.verify, self.now, incarnation=1, config=self.config, rng=random.Random(name))
        self.nodes[name] = node
        self.graph[name] = set()
        live = [p for p in self.nodes if p not in self.gone and p != name]
        if join and live:
            self.link(name, self.rng.choice(live))
        return name

    def link(self, a: str, b: str) -> None:
        if b in self.graph[a] or a == b:
            return
        self.graph[a].add(b)
        self.graph[b].add(a)
        for x, y in ((a, b), (b, a)):
            self.nodes[x].set_neighbors(sorted(self.graph[x]))
            self.nodes[x].connected(y)
            self.flush(x)

    def unlink(self, a: str, b: str) -> None:
        self.graph[a].discard(b)
        self.graph[b].discard(a)
        self.nodes[a].set_neighbors(sorted(self.graph[a]))
        self.nodes[b].set_neighbors(sorted(self.graph[b]))

    def kill(self, name: str, graceful: bool = False) -> None:
        if graceful:
            own = self.nodes[name].leave()
            for peer in self.graph[name]:
                self.nodes[name].outbox.append((peer, messages.Gossip((own,))))
            self.flush(name)
        self.gone.add(name)
        if graceful:  # the transport tells neighbours the connection closed
            for peer in list(self.graph[name]):
                self.unlink(name, peer)
                self.nodes[peer].disconnected(name)

    def live(self) -> list[str]:
        return [p for p in self.nodes if p not in self.gone]

    # --- the event loop ------------------------------------------------------------------------

    def flush(self, name: str) -> None:
        node = self.nodes[name]
        out, node.outbox = node.outbox, []
        for peer, message in out:
            if name in self.gone:
                break
            # Sizing every message costs more than the protocol itself; one in SAMPLE is sized, scaled up.
            if next(self.sized) % SAMPLE == 0:
                self.bytes[name] += SAMPLE * (len(json.dumps(messages.to_wire(message), separators=(",", ":"))) + 2)
            self.msgs[name] += 1
            if peer in self.gone or peer not in self.nodes:
                continue
            if self.args.loss and self.rng.random() < self.args.loss:
                continue
            latency = self.args.latency / 1000.0
            at = self.now + latency * (0.5 + self.rng.random())
            heapq.heappush(self.queue, (at, next(self.seq), name, peer, message))
        changes, node.changes = node.changes, []
        for peer, status in changes:
            if status.gone:
                self.gone_seen[peer].append(self.now)
                if status == Status.DEAD and peer not in self.gone:
                    self.false_dead.append((name, peer, self.now))
                if peer in self.graph[name]:
                    self.unlink(name, peer)
            m = node.members.get(peer)
            if m is not None:
                self.inc_seen[(peer, m.incarnation)].append(self.now)

    def keep_degree(self) -> None:
        d = self.args.degree
        for name in self.live():
            if len(self.graph[name]) < d:
                node = self.nodes[name]
                known = [p for p, m in node.members.items() if not m.status.gone and p not in self.graph[name]]
                for peer in self.rng.sample(known, min(2, d - len(self.graph[name]), len(known))):
                    if peer not in self.gone:
                        self.link(name, peer)

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        ticks: list = [(self.nodes[p].next_deadline(), p) for p in self.live()]
        heapq.heapify(ticks)
        while True:
            t_msg = self.queue[0][0] if self.queue else float("inf")
            while ticks and (ticks[0][1] in self.gone or ticks[0][0] != self.nodes[ticks[0][1]].next_deadline()):
                heapq.heappop(ticks)  # stale entry
            t_tick = ticks[0][0] if ticks else float("inf")
            t = min(t_msg, t_tick, self.next_keep)
            if t > end:
                self.now = end
                return
            self.now = max(self.now, t)
            if t == self.next_keep:
                self.next_keep = self.now + 1.0
                self.keep_degree()
                for p in self.live():
                    heapq.heappush(ticks, (self.nodes[p].next_deadline(), p))
                continue
            if t_msg <= t_tick:
                _, _, sender, peer, message = heapq.heappop(self.queue)
                if peer in self.gone:
                    continue
                self.nodes[peer].receive(sender, message, self.now)
                self.flush(peer)
                heapq.heappush(ticks, (self.nodes[peer].next_deadline(), peer))
            else:
                _, p = heapq.heappop(ticks)
                self.nodes[p].tick(self.now)
                self.flush(p)
                heapq.heappush(ticks, (self.nodes[p].next_deadline(), p))

    def converged(self, sample: int | None = None) -> float:
        """Share of (observer, live peer) pairs seeing the peer alive; ``sample`` observers at random."""
        live = self.live()
        observers = live if sample is None or sample >= len(live) else self.rng.sample(live, sample)
        ok = sum(
            1
            for a in observers
            for b in live
            if a != b and (m := self.nodes[a].members.get(b)) is not None and not m.status.gone
        )
        return ok / max(1, len(observers) * (len(live) - 1))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args, rows, n: int, *, full: bool) -> tuple[float, float]:
    net = Net(args, rows)
    w0 = time.perf_counter()
    r0 = rss()
    for _ in range(n):
        net.add()
        net.run(args.join_gap)
    t_join_end = net.now
    while net.converged(sample=20) < 1.0 or net.converged() < 1.0:
        net.run(1.0)
        if net.now > 600:
            break
    rows.append((f"[protocol] N={n}: all joined and converged", f"{net.now:.1f} s sim (joins took {t_join_end:.1f} s)"))
    rows.append((f"[protocol] N={n}: memory per node (RSS growth / N)", f"{(rss() - r0) / n / (1 << 20):.2f} MiB"))
    net.run(60.0)  # let the join gossip drain
    b0, m0, t0 = sum(net.bytes.values()), sum(net.msgs.values()), net.now
    net.run(args.idle)
    live = len(net.live())
    bps = (sum(net.bytes.values()) - b0) / live / (net.now - t0)
    mps = (sum(net.msgs.values()) - m0) / live / (net.now - t0)
    rows.append((f"[protocol] N={n}: idle traffic per node", f"{bps / 1024:.2f} KiB/s, {mps:.1f} messages/s"))
    if not full:
        return bps, mps
    # A metadata change (a provider's load, re-signed at a higher incarnation) spreading.
    p50s, p99s = [], []
    for _ in range(args.rounds):
        name = net.rng.choice(net.live())
        node = net.nodes[name]
        node.set_load(node.load + 1)
        start = net.now
        net.run(node.config.load_interval + 0.01)
        key = (name, node.incarnation)
        net.run(10.0)
        times = sorted(t - start for t in net.inc_seen[key])
        others = len(net.live()) - 1
        p50s.append(times[int(0.5 * others) - 1] if len(times) >= int(0.5 * others) else float("inf"))
        p99s.append(times[int(0.99 * others) - 1] if len(times) >= int(0.99 * others) else float("inf"))
    rows.append(
        (
            "[protocol] a signed metadata change reaches 50% / 99%",
            f"{max(p50s):.2f} s / {max(p99s):.2f} s (worst of {args.rounds}, from the re-signed update)",
        )
    )
    kills = []
    for _ in range(args.kills):
        victim = net.rng.choice(net.live())
        start = net.now
        observers = len(net.live()) - 1
        net.kill(victim)
        net.run(20.0)
        seen = sorted(net.gone_seen[victim])
        kills.append(seen[int(0.99 * observers) - 1] - start if len(seen) >= int(0.99 * observers) else float("inf"))
    rows.append(
        (
            "[protocol] crash seen dead by 99% (target < 10 s)",
            f"median {pct(kills, 0.5):.2f} s, max {max(kills):.2f} s ({len(kills)} crashes)",
        )
    )
    fp0 = len(net.false_dead)
    events = int(n * args.churn * args.minutes)
    gap = args.minutes * 60 / max(1, events)
    for _ in range(events):
        net.run(gap * (0.5 + net.rng.random()))
        net.kill(net.rng.choice(net.live()), graceful=net.rng.random() < 0.5)
        net.add()
    net.run(30.0)
    pairs = {(a, b) for a, b, _ in net.false_dead[fp0:]}
    rows.append(
        (
            f"[protocol] churn {args.minutes:g} sim min at {args.churn * 100:g}%/min ({events} left, {events} joined)",
            f"{len(net.false_dead) - fp0} false positives ({len(pairs)} pairs; target 0); "
            f"converged {net.converged() * 100:.2f}%",
        )
    )
    stats = collections.Counter()
    for p in net.live():
        stats.update(
            {k: v for k, v in net.nodes[p].stats.items() if k in ("probes", "probes_failed", "suspected", "refuted")}
        )
    rows.append(
        (
            "[protocol] probes / failed / suspicions / refutations",
            f"{stats['probes']} / {stats['probes_failed']} / {stats['suspected']} / {stats['refuted']}",
        )
    )
    rows.append(
        ("[protocol] signature checks / cache hits (one cache per process)", f"{net.verify.checks} / {net.verify.hits}")
    )
    rows.append((f"[protocol] N={n}: wall time", f"{time.perf_counter() - w0:.0f} s"))
    return bps, mps


def run_protocol(args, rows) -> None:
    base_b, base_m = measure(args, rows, args.baseline, full=False) if args.baseline else (0.0, 0.0)
    bps, mps = measure(args, rows, args.nodes, full=True)
    if base_b:
        rows.append(
            (
                f"[protocol] idle traffic ratio N={args.nodes} / N={args.baseline} (target <= 1.5)",
                f"bytes {bps / base_b:.2f}, messages {mps / base_m:.2f}",
            )
        )
