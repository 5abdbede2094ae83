#!/usr/bin/env python
"""A node that is both LLM dispatcher and job tracker: what the tracker's load costs the rest.

    python benchmarks/jobs_colocated.py [--quick] [--seconds 10] [--rate 1000] [--token-delay 0.01]

One node (``python -m ocf start --mode standalone --jobs --service.name llm``,
its own process) fronts ``examples/mock_llm.py`` (another process). This
process measures, on that node's gateway:

* ``/v1/health`` latency, one probe every 20 ms;
* the gap between tokens of streamed chat completions relayed by the node
  (``/v1/service/llm/v1/chat/completions``, ``"stream": true``), minus the
  mock's own ``--token-delay``,

first with the tracker idle (the baseline, same run), then while a load
process runs tracker workers at ``--rate`` jobs/s (paced batch-10
``complete`` + ``claim`` requests, what ``ocf.jobs.client`` sends), which
makes the tracker commit (fsync) continuously. The table prints p50, p99 and
max of each, and the p99 the load added; the target is an added p99 under
5 ms for both, which needs the tracker's commits off the event loop's thread.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
#: The benchmark node's admin token (a throwaway node; passed with --admin-token).
ADMIN_TOKEN = "bench-admin-token"
ADMIN = {"x-ocf-admin-token": ADMIN_TOKEN}
PROMPT = " ".join(f"word{i}" for i in range(120))
BATCH = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    )


def wait_healthy(url: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # another process: nothing to wait on but its port
    raise RuntimeError(f"{what} did not become healthy")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(base: str, seconds: float, token_delay: float) -> dict[str, list[float]]:
    """Health latencies and token gaps (less the mock's delay), in ms, over ``seconds``."""
    out: dict[str, list[float]] = {"health": [], "token_gap": []}
    body = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    async with (
        httpx.AsyncClient(base_url=base, timeout=30) as probe,
        httpx.AsyncClient(base_url=base, timeout=30) as streamer,
    ):

        async def health() -> None:
            while True:
                start = time.perf_counter()
                r = await probe.get("/v1/health")
                assert r.status_code == 200
                out["health"].append((time.perf_counter() - start) * 1000)
                await trio.sleep(0.02)

        async def stream() -> None:
            while True:
                async with streamer.stream("POST", "/v1/service/llm/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    last = None
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        now = time.perf_counter()
                        if last is not None:
                            out["token_gap"].append(max(0.0, (now - last - token_delay) * 1000))
                        last = now

        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(health)
                nursery.start_soon(stream)
    return out


async def load(base: str, rate: float, seconds: float, workers: int) -> dict[str, Any]:
    """Tracker workers completing ``rate`` jobs/s in total (batch 10), paced; returns jobs done."""
    done = 0
    per_worker = rate / BATCH / workers  # requests per second per worker
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=workers + 4)) as http:

        async def worker(i: int) -> None:
            nonlocal done
            r = await http.post("/v1/jobs/bench/workers", json={"nickname": f"w{i}", "stage": "one"})
            headers = {"Authorization": f"Bearer {r.json()['token']}"}
            held: list[dict[str, Any]] = []
            next_at = time.perf_counter()
            while True:
                next_at += 1 / per_worker
                results = [{"id": j["id"], "output": j["input"]} for j in held]
                r = await http.post(
                    "/v1/jobs/bench/complete", json={"results": results, "claim": BATCH}, headers=headers
                )
                answer = r.json()
                done += sum(1 for x in answer["results"] if x["status"] == "done")
                held = answer["jobs"]
                await trio.sleep(max(0.0, next_at - time.perf_counter()))

        started = time.perf_counter()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for i in range(workers):
                    nursery.start_soon(worker, i)
        elapsed = time.perf_counter() - started
    return {"done": done, "rate": done / elapsed}


def run_load_process(args: argparse.Namespace) -> None:
    result = trio.run(load, args.load, args.rate, args.seconds, args.workers)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short windows (used by the test suite)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per phase (default 10; quick 3)")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="tracker jobs/s during the loaded phase (default 1000)"
    )
    parser.add_argument("--workers", type=int, default=20, help="simulated tracker workers (default 20)")
    parser.add_argument(
        "--token-delay", type=float, default=0.01, help="mock LLM pause between tokens (default 0.01 s)"
    )
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    if args.load:
        run_load_process(args)
        return

    tmp = Path(tempfile.mkdtemp(prefix="ocf-colocated-"))
    llm_port, port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen] = []
    try:
        llm = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "examples" / "mock_llm.py"),
                "--port",
                str(llm_port),
                "--model",
                "m1",
                "--token-delay",
                str(args.token_delay),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env(),
        )
        procs.append(llm)
        wait_healthy(f"http://127.0.0.1:{llm_port}/health", llm, "mock LLM")
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ocf",
                "start",
                "--mode",
                "standalone",
                "--jobs",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--tcpport",
                "0",
                "--data-dir",
                str(tmp / "node"),
                "--service.name",
                "llm",
                "--service.port",
                str(llm_port),
                "--log-level",
                "warning",
                "--admin-token",
                ADMIN_TOKEN,
                "--register-burst",
                "1000000",
            ],
            stdout=(tmp / "node.log").open("w"),
            stderr=subprocess.STDOUT,
            env=env(),
            cwd=ROOT,
        )
        procs.append(node)
        wait_healthy(f"{base}/v1/health", node, "node")
        deadline = time.monotonic() + 30
        while (
            "m1" not in httpx.get(f"{base}/v1/service/llm/v1/models", timeout=5).text
        ):  # the registrar publishes within a second or two
            if time.monotonic() > deadline:
                raise RuntimeError("the node never published its llm service")
            time.sleep(0.2)
        jobs = int(args.rate * args.seconds * 1.5) + 1000
        httpx.put(
            f"{base}/v1/jobs/bench", json={"stages": [{"name": "one", "lease_timeout": 600}]}, headers=ADMIN, timeout=30
        ).raise_for_status()
        for first in range(0, jobs, 50_000):
            lines = "".join(f'"job-{i}"\n' for i in range(first, min(jobs, first + 50_000)))
            httpx.post(
                f"{base}/v1/jobs/bench/jobs",
                content=lines,
                headers={"content-type": "application/x-ndjson", **ADMIN},
                timeout=120,
            ).raise_for_status()

        baseline = trio.run(measure, base, args.seconds, args.token_delay)
        loader = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--load",
                base,
                "--rate",
                str(args.rate),
                "--seconds",
                str(args.seconds + 1),
                "--workers",
                str(args.workers),
            ],
            stdout=subprocess.PIPE,
            env=env(),
            text=True,
        )
        procs.append(loader)
        time.sleep(0.5)  # let the load reach its pace before measuring
        loaded = trio.run(measure, base, args.seconds, args.token_delay)
        out, _ = loader.communicate(timeout=60)
        achieved = json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()

    columns = ("idle p50", "idle p99", "load p50", "load p99", "load max")
    header = f"{'measurement (ms)':<26}{''.join(f'{c:>10}' for c in columns)}{'added p99':>11}  {'target':>10}"
    print(header)
    print("-" * len(header))
    for key, label in (("health", "/v1/health latency"), ("token_gap", "token gap (less delay)")):
        base, load = baseline[key], loaded[key]
        added = percentile(load, 0.99) - percentile(base, 0.99)
        verdict = "ok" if added < 5 else "OVER"
        figures = (percentile(base, 0.5), percentile(base, 0.99), percentile(load, 0.5), percentile(load, 0.99))
        print(
            f"{label:<26}{''.join(f'{v:>10.2f}' for v in figures)}{max(load or [0]):>10.2f}{added:>11.2f}"
            f"  {'< 5 ' + verdict:>10}"
        )
    print(
        f"co-located tracker + LLM relay, {args.seconds:g} s per phase;"
        f" tracker load achieved {achieved['rate']:,.0f} jobs/s (target {args.rate:,.0f})"
    )
    print(
        f"samples (idle/load): health {len(baseline['health'])}/{len(loaded['health'])},"
        f" token gaps {len(baseline['token_gap'])}/{len(loaded['token_gap'])}"
    )


if __name__ == "__main__":
    main()
