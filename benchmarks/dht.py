"""DHT benchmark: peer lookups among 200 nodes on the in-memory transport.

    python benchmarks/dht.py [--quick] [--nodes N] [--lookups L]

N hosts, each running a DHT server, in one process on the in-memory
transport (the full multistream + Noise + yamux stack, no sockets). The
network is simulated converged: every node's routing table has seen every
other node (in random order) and kept what k-buckets keep, with the
addresses identify would have recorded; no connections are open yet, as
after a restart. Then, L times, a random node opens a ping stream to a
random node whose address it does not know: the host asks the DHT, which
looks the peer up (FIND_NODE, k = 20, alpha = 3), dials the address found
and pings.

Then L full lookups (no early stop) of the k nodes closest to random
keys, whose answers are checked against the true k closest.

Baseline, in the same run: the same operation between nodes that already
know each other's address (a direct dial + ping, no lookup). The ratio is
what finding a peer by ID costs over dialing an address; most of it is the
Noise handshakes of the connections a lookup opens, one per peer asked.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ocf.config import Config  # noqa: E402
from ocf.dht import Dht, DhtLimits, open_dht  # noqa: E402
from ocf.dht.table import distance, key_of, peer_key  # noqa: E402
from ocf.identity import Identity  # noqa: E402
from ocf.transport import MemoryNetwork, open_host  # noqa: E402
from ocf.transport.ping import PROTOCOL as PING  # noqa: E402


async def ping_stream(origin: Dht, target: Dht) -> float:
    t0 = time.perf_counter()
    stream = await origin.host.new_stream(target.host.peer_id, PING)
    async with stream:
        await stream.send_all(b"p" * 32)
        got = b""
        while len(got) < 32:
            got += await stream.receive_some(32 - len(got))
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="50 nodes, 10 lookups")
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--lookups", type=int, default=None)
    args = parser.parse_args()
    n = args.nodes or (50 if args.quick else 200)
    lookups = args.lookups or (10 if args.quick else 40)
    rng = random.Random(42)
    net = MemoryNetwork()
    limits = DhtLimits(refresh_interval=0)
    cfg = Config(log_level="warning")
    t_build = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        nodes: list[Dht] = []
        for i in range(n):
            host = await stack.enter_async_context(open_host(Identity.from_seed(f"bench-dht-{i}"), cfg, net))
            nodes.append(await stack.enter_async_context(open_dht(host, cfg, mode="server", limits=limits)))
        for node in nodes:
            others = [o for o in nodes if o is not node]
            rng.shuffle(others)
            for other in others:
                node.table.add(other.host.peer_id)
            by_id = {o.host.peer_id: o for o in others}
            for peer in node.table:
                node.host.add_addrs(peer, by_id[peer].host.listen_addrs)
        build = time.perf_counter() - t_build
        table_sizes = [len(d.table) for d in nodes]

        pairs = []
        while len(pairs) < 2 * lookups:
            a, b = rng.sample(nodes, 2)
            if b.host.peer_id not in a.table and (a, b) not in pairs:
                pairs.append((a, b))
        direct_pairs, dht_pairs = pairs[:lookups], pairs[lookups:]

        direct = []
        for a, b in direct_pairs:
            a.host.add_addrs(b.host.peer_id, b.host.listen_addrs)
            direct.append(await ping_stream(a, b))

        found_times, messages, dials, found = [], [], [], 0
        for a, b in dht_pairs:
            assert not a.host.peer_addrs(b.host.peer_id)
            rpcs, dials0 = a.stats["rpcs"], net.dials
            try:
                found_times.append(await ping_stream(a, b))
                found += 1
            except Exception as exc:  # noqa: BLE001 - a miss is a figure, not a crash
                print(f"lookup failed: {exc!r}", file=sys.stderr)
            messages.append(a.stats["rpcs"] - rpcs)
            dials.append(net.dials - dials0)

        # Full lookups (no early stop): the k closest nodes to random keys, checked against the truth.
        full_times, full_messages, recall = [], [], []
        for _ in range(lookups):
            a = rng.choice(nodes)
            key = rng.randbytes(32)
            rpcs = a.stats["rpcs"]
            t0 = time.perf_counter()
            state = await a.lookup(key)
            full_times.append(time.perf_counter() - t0)
            full_messages.append(a.stats["rpcs"] - rpcs)
            truth = sorted(
                (o.host.peer_id for o in nodes if o is not a), key=lambda p: distance(peer_key(p), key_of(key))
            )[: limits.k]
            recall.append(len(set(state.closest()) & set(truth)) / len(truth))

    base = statistics.median(direct)
    rows = [
        (
            f"{n} nodes: build converged tables",
            f"{build:.1f} s",
            "",
            f"table size mean {statistics.mean(table_sizes):.0f}",
        ),
        ("direct dial + ping, address known (baseline)", f"{base * 1000:.2f} ms", "1.00", f"median of {len(direct)}"),
        (
            "DHT lookup + dial + ping, address unknown",
            f"{statistics.median(found_times) * 1000:.2f} ms" if found_times else "-",
            f"{statistics.median(found_times) / base:.2f}" if found_times else "-",
            f"median; p90 {pct(found_times, 0.9) * 1000:.1f} ms" if found_times else "",
        ),
        (
            "FIND_NODE messages per lookup",
            f"{statistics.mean(messages):.1f}",
            "",
            f"min {min(messages)} max {max(messages)} (k=20, alpha=3)",
        ),
        (
            "full lookup of the k closest to a random key",
            f"{statistics.median(full_times) * 1000:.2f} ms",
            f"{statistics.median(full_times) / base:.2f}",
            f"{statistics.mean(full_messages):.1f} FIND_NODE/lookup (max {max(full_messages)}),"
            f" {statistics.mean(recall) * 100:.0f}% of the true k closest",
        ),
        ("connections opened per lookup (incl. target)", f"{statistics.mean(dials):.1f}", "", ""),
        ("lookups that found the peer", f"{found}/{len(dht_pairs)}", "", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>12}  {'ratio':>6}  note")
    print("-" * (width + 50))
    for a, b, c, d in rows:
        print(f"{a:<{width}}  {b:>12}  {c:>6}  {d}")


if __name__ == "__main__":
    trio.run(main)
