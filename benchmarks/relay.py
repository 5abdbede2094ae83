"""Relay benchmark: direct against relayed connections, and hole punching through real NATs.

    python benchmarks/relay.py [--mib 16] [--rounds 20] [--punches 10] [--quick] [--no-netns]

Part 1, in one process on loopback TCP (the same-run baseline is the direct connection):
time to first byte on a fresh connection (dial, Noise + yamux, a stream, one byte echoed)
and on an open one (a stream and one byte), and one stream's throughput, direct (A -> B)
against relayed (A -> R -> B, Noise + yamux end to end over the relay's two streams). The
relay runs without limits here; by default it would cut each circuit at 128 KiB.

Part 2, in the NAT lab of tests/integration/natlab.py (network namespaces, needs root): a
relay and two nodes behind masquerading NATs; A dials B through the relay and B's DCUtR punches
a direct path; repeated ``--punches`` times, over TCP (nodes without QUIC) and over QUIC (the
NATs pass TCP to the relay only). Reports the share that succeeded and how long the upgrade
took (relayed connection up -> direct connection up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from ocf.config import Config  # noqa: E402
from ocf.identity import Identity  # noqa: E402
from ocf.transport import open_host  # noqa: E402
from ocf.transport.relay import RelayLimits, open_relay_client, open_relay_service  # noqa: E402

CHUNK = 64 * 1024
SINK = "/bench/sink/1.0.0"
ECHO = "/bench/echo/1.0.0"


def cfg(**kw: object) -> Config:
    per_ip = dict(max_connections_per_ip=100_000, max_pending_handshakes_per_ip=100_000)
    return Config(host="127.0.0.1", tcpport=0, port=0, ws=False, data_dir=Path(tempfile.mkdtemp()), **{**per_ip, **kw})  # type: ignore[arg-type]


async def sink_handler(stream) -> None:  # type: ignore[no-untyped-def]
    while await stream.receive_some():
        pass
    await stream.send_all(b"k")
    await stream.aclose()


async def echo_handler(stream) -> None:  # type: ignore[no-untyped-def]
    while data := await stream.receive_some():
        await stream.send_all(data)


async def first_byte(host, peer) -> None:  # type: ignore[no-untyped-def]
    stream = await host.new_stream(peer, ECHO)
    await stream.send_all(b"x")
    await stream.receive_some(1)
    await stream.aclose()


async def push(host, peer, nbytes: int) -> float:  # type: ignore[no-untyped-def]
    stream = await host.new_stream(peer, SINK)
    block = os.urandom(CHUNK)
    t0 = time.perf_counter()
    for _ in range(nbytes // CHUNK):
        await stream.send_all(block)
    await stream.send_eof()
    await stream.receive_some()
    await stream.aclose()
    return nbytes / (time.perf_counter() - t0)


async def loopback_numbers(mib: int, rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (direct, relayed)."""
    unlimited = RelayLimits(circuit_duration=0, circuit_data=0, hop_rate=1e9, hop_burst=10**9)
    async with (
        open_host(Identity.generate(), cfg()) as r,
        open_relay_service(r, unlimited),
        open_host(Identity.generate(), cfg()) as a,
        open_relay_client(a),
        open_host(Identity.generate(), cfg()) as b,
        open_relay_client(b) as bc,
    ):
        for h in (a, b):
            h.set_stream_handler(SINK, sink_handler)
            h.set_stream_handler(ECHO, echo_handler)
        await b.connect(r.listen_addrs[0])
        held = await bc.reserve(r.peer_id)
        await a.connect(r.listen_addrs[0])
        targets = {"direct": b.listen_addrs[0], "relayed": held.addrs[0]}
        out: dict[str, dict[str, float]] = {"ttfb_fresh": {}, "ttfb_open": {}, "throughput": {}}
        for kind, addr in targets.items():
            fresh, warm = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await a.connect(addr)
                await first_byte(a, b.peer_id)
                fresh.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await first_byte(a, b.peer_id)
                warm.append(time.perf_counter() - t0)
                await a.disconnect(b.peer_id)
                while a.is_connected(b.peer_id):
                    await a.wait_changed()
            await a.connect(addr)
            await push(a, b.peer_id, CHUNK * 16)  # warm-up: window auto-tuning
            out["throughput"][kind] = max([await push(a, b.peer_id, mib << 20) for _ in range(2)])
            out["ttfb_fresh"][kind] = statistics.median(fresh)
            out["ttfb_open"][kind] = statistics.median(warm)
            await a.disconnect(b.peer_id)
            while a.is_connected(b.peer_id):
                await a.wait_changed()
        return {name: (v["direct"], v["relayed"]) for name, v in out.items()}


PUNCH_NODE = r"""
import json, sys, time, trio
from pathlib import Path
from ocf.config import Config
from ocf.identity import Identity, Multiaddr
from ocf.transport import open_host
from ocf.transport.relay import RelayLimits, open_relay_service
from ocf.transport.relay.nat import open_nat

role, relay_ip, punches, punch = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
import os, ocf.log; ocf.log.setup(os.environ.get("OCF_BENCH_LOG", "warning"), sys.stderr)
ids = {r: Identity.from_seed(f"bench-punch-{r}") for r in "RAB"}
cfg = Config(host="0.0.0.0", tcpport=43905, ws=False, reachability="private" if role != "R" else "public",
             data_dir=Path("/tmp"), dial_timeout=5.0, quic=punch == "quic")
relay_addr = f"/ip4/{relay_ip}/tcp/43905/p2p/{ids['R'].peer_id}"

async def main():
    async with open_host(ids[role], cfg) as host:
        if role == "R":
            async with open_relay_service(host, RelayLimits(circuit_duration=0, circuit_data=0)), open_nat(host, cfg):
                print("ready", flush=True)
                await trio.sleep_forever()
        async with open_nat(host, cfg) as nat:
            await host.connect(relay_addr)
            while not nat.client.reservations:
                await host.wait_changed()
            print("ready", flush=True)
            if role == "B":
                await trio.sleep_forever()
            await trio.sleep(1)
            b = ids["B"].peer_id
            circuit = Multiaddr.parse(f"{relay_addr}/p2p-circuit/p2p/{b}")
            results = []
            for _ in range(punches):
                await host.connect(circuit)
                t0 = trio.current_time()
                with trio.move_on_after(15):
                    while not any(c.usable and not c.relayed for c in host.connections(b)):
                        await host.wait_changed()
                direct = [c for c in host.connections(b) if c.usable and not c.relayed]
                quic = any(c.remote_addr is not None and c.remote_addr.has("quic-v1") for c in direct)
                results.append([bool(direct), trio.current_time() - t0, quic])
                await host.disconnect(b)
                while host.is_connected(b):
                    await host.wait_changed()
                await trio.sleep(0.5)
            print(json.dumps(results), flush=True)

trio.run(main)
"""


def punch_numbers(punches: int, punch: str = "tcp") -> tuple[int, int, list[float]] | str:
    """(succeeded, attempts, seconds of the successful ones), or why the lab could not run.

    ``punch="tcp"``: the nodes run without QUIC. ``"quic"``: the NATs pass TCP to the relay only, so
    a success is a QUIC hole punch (counted only when the direct connection is QUIC).
    """
    from tests.integration.natlab import RELAY_IP, LabUnavailable, nat_lab

    try:
        with nat_lab(punch) as lab, tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "punch_node.py"
            script.write_text(PUNCH_NODE)
            procs = {}
            for role in ("R", "B", "A"):
                procs[role] = subprocess.Popen(
                    lab.exec_argv(role, [sys.executable, str(script), role, RELAY_IP, str(punches), punch]),
                    stdout=subprocess.PIPE,
                    stderr=(Path(tmp) / f"{role}.err").open("w"),
                    text=True,
                    env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
                )
                lab.procs.append(procs[role])  # type: ignore[arg-type]
                assert procs[role].stdout is not None
                if procs[role].stdout.readline().strip() != "ready":
                    return f"{role} did not start: {(Path(tmp) / f'{role}.err').read_text()[-300:]}"
            assert procs["A"].stdout is not None
            results = json.loads(procs["A"].stdout.readline())
            if os.environ.get("OCF_BENCH_LOG"):
                for role in procs:
                    print(f"--- {role}\n" + (Path(tmp) / f"{role}.err").read_text()[-20000:], file=sys.stderr)
    except LabUnavailable as exc:
        return str(exc)
    times = [t for ok, t, quic in results if ok and (quic or punch == "tcp")]
    return len(times), len(results), times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--punches", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--no-netns", action="store_true", help="skip the NAT lab part")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.rounds, args.punches = 4, 5, 3
    loop = trio.run(loopback_numbers, args.mib, args.rounds)
    rows: list[tuple[str, str, str, str]] = []
    for name, unit, scale in (
        ("ttfb_fresh", "ms", 1000),
        ("ttfb_open", "ms", 1000),
        ("throughput", "MiB/s", 1 / 2**20),
    ):
        direct, relayed = loop[name]
        rows.append((f"{name} direct (baseline)", f"{direct * scale:.2f} {unit}", "1.00", ""))
        rows.append((f"{name} relayed", f"{relayed * scale:.2f} {unit}", f"{relayed / direct:.2f}", "relayed/direct"))
    if not args.no_netns:
        for kind in ("tcp", "quic"):
            punch = punch_numbers(args.punches, kind)
            if isinstance(punch, str):
                rows.append((f"hole punch {kind} (NAT lab)", "not run", "", punch[:60]))
                continue
            ok, total, times = punch
            rows.append((f"hole punches succeeded, {kind}", f"{ok}/{total}", f"{ok / max(total, 1):.2f}", "share"))
            if times:
                median = f"{statistics.median(times) * 1000:.0f} ms"
                rows.append((f"hole punch time, {kind} (median)", median, "", "relayed -> direct"))
                rows.append((f"hole punch time, {kind} (max)", f"{max(times) * 1000:.0f} ms", "", ""))
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>14}  {'ratio':>6}  note")
    print("-" * (width + 40))
    for name, value, ratio, note in rows:
        print(f"{name:<{width}}  {value:>14}  {ratio:>6}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
