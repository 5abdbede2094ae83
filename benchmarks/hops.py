"""What does one gateway hop cost, apart from the machine's noise?

``benchmarks/gateway.py`` measures what a user sees: four processes (client,
dispatcher, worker, mock LLM) sharing two cores. On this machine that
figure moves by a third from one hour to the next, with the speed of the
machine itself, and each process runs up to twice slower there than alone.
This benchmark isolates the gateway's own work so that two builds can be
compared at any hour:

* one process runs a canned backend (a raw socket answering a fixed chat
  completion), a dispatcher node, a worker node offering the backend as
  ``llm`` (real TCP, and real Noise + yamux between the two nodes) and a
  client sending requests one at a time;
* the baseline is the same client talking to the backend directly, in the
  same run; a scenario's CPU time per request minus the baseline's is the
  cost of its hops;
* the floor is one hop through a minimal Trio HTTP relay with none of the
  gateway's features (``benchmarks/floor_relay.py``), in the same run;
* ``--instructions`` counts instructions per request instead, under
  valgrind's callgrind, counting only the window of the requests (a tiny
  C library switches counting on and off from inside the program, so the
  start-up and warm-up, which vary from run to run, are not counted): each
  scenario runs twice, once sending its requests and once sitting idle for
  as long as those requests took, and the difference is divided by the
  number of requests. The idle run cancels the nodes' timed background
  work (membership probes, DHT refresh, QUIC timers), which grows with wall
  time, and wall time under valgrind grows with the machine's load;
* the two nodes talk TCP + Noise + yamux unless ``--transport quic``, so that
  a hop's cost compares across builds whatever transport a peer prefers.

Run: ``python benchmarks/hops.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio

from ocf.config import Config, ServiceSpec
from ocf.node import open_node

import floor_relay  # benchmarks/, next to this file

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello there"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
).encode()
MODELS = json.dumps(
    {"object": "list", "data": [{"id": "m1", "object": "model", "created": 0, "owned_by": "bench"}]}
).encode()
REQUEST = json.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]}).encode()

SCENARIOS = {
    "direct": "backend directly (baseline)",
    "floor": "1 hop: minimal Trio HTTP relay (floor)",
    "service_local": "1 hop: worker /v1/_service",
    "p2p": "2 hops: dispatcher /v1/p2p -> worker",
    "service": "2 hops: dispatcher /v1/service -> worker",
}


async def canned_backend(stream: trio.SocketStream) -> None:
    """A keep-alive HTTP/1.1 server that answers every request at once with a fixed body."""
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(buf) < length:
            buf += await stream.receive_some(65536)
        buf = buf[length:]
        path = head.split(b" ", 2)[1]
        body = b"{}" if path == b"/health" else MODELS if path == b"/v1/models" else COMPLETION
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
        )


async def requests(port: int, path: bytes, n: int) -> None:
    """``n`` sequential chat completions on one keep-alive connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    request = b"POST %b HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
        path,
        len(REQUEST),
        REQUEST,
    )
    for _ in range(n):
        await stream.send_all(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += await stream.receive_some(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{path.decode()} answered {head[:200]!r}")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
        while len(rest) < length:
            rest += await stream.receive_some(65536)
    await stream.aclose()


class Bench:
    """A canned backend, a dispatcher and a worker serving it, all in this process."""

    def __init__(self, backend_port: int, floor_port: int, dispatcher: object, worker: object) -> None:
        self.backend_port = backend_port
        self.floor_port = floor_port
        self.dispatcher_port = _port(dispatcher.gateway_url)  # type: ignore[attr-defined]
        self.worker_port = _port(worker.gateway_url)  # type: ignore[attr-defined]
        self.worker_id = str(worker.peer_id)  # type: ignore[attr-defined]

    def target(self, scenario: str) -> tuple[int, bytes]:
        if scenario == "direct":
            return self.backend_port, b"/v1/chat/completions"
        if scenario == "floor":
            return self.floor_port, b"/v1/chat/completions"
        if scenario == "service_local":
            return self.worker_port, b"/v1/_service/llm/v1/chat/completions"
        if scenario == "p2p":
            return self.dispatcher_port, f"/v1/p2p/{self.worker_id}/v1/_service/llm/v1/chat/completions".encode()
        return self.dispatcher_port, b"/v1/service/llm/v1/chat/completions"

    async def warm_up(self) -> None:
        for scenario in SCENARIOS:
            port, path = self.target(scenario)
            with trio.fail_after(30):
                while True:  # the dispatcher learns the worker's service through the node table
                    try:
                        await requests(port, path, 1)
                        break
                    except RuntimeError:
                        await trio.sleep(0.05)
            await requests(port, path, 50)


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


#: For counting instructions: timers far apart, so that the nodes' timed background work (membership
#: probes, table verification), which is no request's cost, hardly falls into the counted window.
QUIET_TIMERS = {"membership_probe_interval": 3600.0, "verify_interval": 3600.0}


async def with_bench(work, transport: str = "tcp", quiet: bool = False) -> None:  # type: ignore[no-untyped-def]
    logging.disable(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="ocf-hops-"))
    try:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, canned_backend, 0)
            backend_port = listeners[0].socket.getsockname()[1]
            # The floor: what a hop costs with none of the gateway's features (see floor_relay.py).
            listeners = await nursery.start(trio.serve_tcp, functools.partial(floor_relay.serve_trio, backend_port), 0)
            floor_port = listeners[0].socket.getsockname()[1]
            common = dict(
                host="127.0.0.1", tcpport=0, udpport=0, port=0, log_level="warning", ws=False, quic=transport == "quic"
            )
            if quiet:  # those of the timers this build has
                common.update({k: v for k, v in QUIET_TIMERS.items() if k in attrs.fields_dict(Config)})
            async with open_node(Config(mode="standalone", data_dir=tmp / "dispatcher", **common)) as dispatcher:
                bootstrap = (str(dispatcher.listen_addrs[0]),)
                services = (ServiceSpec("llm", backend_port, "127.0.0.1"),)
                async with open_node(
                    Config(mode="node", data_dir=tmp / "worker", bootstrap_addrs=bootstrap, services=services, **common)
                ) as worker:
                    await worker.bootstrap.wait_connected()
                    await worker.services.refresh()
                    bench = Bench(backend_port, floor_port, dispatcher, worker)
                    await bench.warm_up()
                    await work(bench)
            nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- CPU time -------------------------------------------------------------------------------


def cpu_table(n: int, rounds: int, transport: str) -> dict[str, float]:
    """Best CPU µs per request of each scenario, rounds interleaved so drifts hit all alike."""
    best = {s: float("inf") for s in SCENARIOS}

    async def work(bench: Bench) -> None:
        for _ in range(rounds):
            for scenario in SCENARIOS:
                port, path = bench.target(scenario)
                t0 = time.process_time()
                await requests(port, path, n)
                best[scenario] = min(best[scenario], (time.process_time() - t0) / n * 1e6)

    trio.run(with_bench, work, transport)
    return best


# --- instructions (callgrind) ---------------------------------------------------------------


def child(scenario: str, n: int, idle: float, transport: str) -> None:
    """Run under valgrind: set everything up, send ``n`` requests of ``scenario`` (or sit ``idle`` seconds), exit.

    Prints how long the requests took, for the idle run that is subtracted.
    """
    import lmdb

    # Valgrind cannot reserve LMDB's default 64 GiB of address space; 64 MiB is plenty here.
    open_env = lmdb.open
    lmdb.open = lambda *a, **k: open_env(*a, **dict(k, map_size=min(k.get("map_size", 1 << 26), 1 << 26)))  # type: ignore[assignment]

    toggle = ctypes.CDLL(os.environ["OCF_CALLGRIND_TOGGLE"]).ocf_toggle_collect

    async def work(bench: Bench) -> None:
        port, path = bench.target(scenario)
        toggle()  # count from here: start-up and warm-up are not the requests' cost
        t0 = trio.current_time()
        await requests(port, path, n)
        await trio.sleep(idle)
        elapsed = trio.current_time() - t0
        toggle()
        print(f"elapsed {elapsed:.3f}")

    trio.run(with_bench, work, transport, True)


TOGGLE_C = """
#include <valgrind/callgrind.h>
void ocf_toggle_collect(void) { CALLGRIND_TOGGLE_COLLECT; }
"""


def build_toggle(directory: Path) -> Path:
    """A one-function library that switches callgrind's counting on and off from inside the program.

    Counting only the window of the requests (and of the idle run) leaves out
    the interpreter's start, key generation, LMDB and the warm-up, which are
    thousands of times the cost of one request and vary from run to run by
    more than the 2% a comparison must see.
    """
    source, library = directory / "toggle.c", directory / "toggle.so"
    source.write_text(TOGGLE_C)
    built = subprocess.run(
        ["gcc", "-O1", "-shared", "-fPIC", "-o", str(library), str(source)], capture_output=True, text=True
    )
    if built.returncode != 0:
        raise SystemExit(f"--instructions needs gcc and valgrind's headers (valgrind/callgrind.h):\n{built.stderr}")
    return library


def instructions(scenario: str, n: int, transport: str, toggle: Path) -> float:
    """Instructions per request: (window with n requests - window idle as long) / n."""
    counts = []
    elapsed = 0.0
    for requests_ in (n, 0):
        out = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                "--collect-atstart=no",
                sys.executable,
                __file__,
                "--child",
                scenario,
                "--requests",
                str(requests_),
                "--idle",
                str(0.0 if requests_ else elapsed),
                "--transport",
                transport,
            ],
            capture_output=True,
            text=True,
            check=False,
            env=dict(os.environ, OCF_CALLGRIND_TOGGLE=str(toggle)),
        )
        match = re.search(r"Collected : (\d+)", out.stderr)
        if out.returncode != 0 or match is None:
            raise SystemExit(f"callgrind run failed:\n{out.stderr[-2000:]}")
        counts.append(int(match.group(1)))
        if requests_:
            elapsed = float(re.search(r"elapsed ([0-9.]+)", out.stdout).group(1))  # type: ignore[union-attr]
    return (counts[0] - counts[1]) / n


# --- report ---------------------------------------------------------------------------------


def report(title: str, unit: str, values: dict[str, float], fmt: str) -> None:
    base = values["direct"]
    hops = {"direct": 0, "floor": 1, "service_local": 1, "p2p": 2, "service": 2}
    print(f"{'measurement':44s} {unit:>16s} {'ratio':>7s} {'hops':>14s} {'per hop':>14s}")
    print("-" * 99)
    for scenario, label in SCENARIOS.items():
        value = values[scenario]
        added = value - base
        per_hop = added / hops[scenario] if hops[scenario] else 0.0
        print(
            f"{label:44s} {format(value, fmt):>16s} {value / base:7.2f}"
            f" {format(added, fmt) if hops[scenario] else '':>14s}"
            f" {format(per_hop, fmt) if hops[scenario] else '':>14s}"
        )
    print(f"({title}; 'hops' is the scenario minus the baseline: the gateways' own cost)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per scenario and round (default 500; 600 with --instructions)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds for CPU time; the best round counts (default 5)"
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="count instructions per request under valgrind's callgrind (repeatable; slow: minutes)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument(
        "--transport",
        choices=("tcp", "quic"),
        default="tcp",
        help="how the two nodes talk: TCP + Noise + yamux or QUIC (default tcp, comparable across builds)",
    )
    parser.add_argument("--child", choices=list(SCENARIOS), help=argparse.SUPPRESS)
    parser.add_argument("--idle", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests or 0, args.idle, args.transport)
        return
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
        n = args.requests or (100 if args.quick else 600)
        with tempfile.TemporaryDirectory(prefix="ocf-hops-") as directory:
            toggle = build_toggle(Path(directory))
            values = {scenario: instructions(scenario, n, args.transport, toggle) for scenario in SCENARIOS}
        report(
            f"instructions per request under callgrind, {n} requests per scenario, nodes over {args.transport}",
            "instructions/req",
            values,
            ",.0f",
        )
        return
    n = args.requests or (100 if args.quick else 500)
    rounds = 2 if args.quick else args.rounds
    values = cpu_table(n, rounds, args.transport)
    report(
        f"CPU time per request, best of {rounds} interleaved rounds of {n} requests, all in one process,"
        f" nodes over {args.transport}",
        "CPU µs/req",
        values,
        ".0f",
    )


if __name__ == "__main__":
    main()
