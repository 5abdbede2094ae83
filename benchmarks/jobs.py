#!/usr/bin/env python
"""Job tracker benchmark: claim/complete cycles, job creation, memory and LMDB size.

    python benchmarks/jobs.py [--quick] [--seconds 15] [--workers 100] [--clients 1] [--batches 1,10]
                              [--jobs 1000000] [--profile]

The tracker runs as its own process (``python -m ocf start --mode standalone
--jobs``, temp data dir, free port; SIGTERM at the end) so the load generator
does not share its interpreter. All processes share this machine's cores,
so read rates against the baselines measured in the same run.

1. **Cycles.** A 3-stage project; ``--workers`` simulated workers (spread
   evenly over the stages, one keep-alive connection each) loop
   ``POST claim {"max": b, "wait": 5}`` then ``POST complete`` with batch
   size b = 1 and 10. Reported: job-stage cycles/s (completions at any
   stage) and end-to-end jobs/s (last-stage completions, i.e. jobs that went
   through all 3 stages), with the server's CPU per request. Baseline in the
   same run: the same workers doing the same two-request loop against
   ``GET /v1/health`` ("bare gateway"); the ratio is tracker claim+complete
   request pairs/s over bare pairs/s, and "ceiling" is the end-to-end rate
   the tracker would reach if its requests cost no more than the bare ones.
   Then the same with ``POST complete {"results": [...], "claim": b}``,
   which reports a batch and leases the next in one request and one commit
   (what ``ocf.jobs.client`` does): one request per cycle instead of two.
   Before that, the load client's own CPU per request is measured for a
   minimal h11 client, httpx with an AsyncClient per worker and httpx with
   one shared pool (which is quadratic in concurrent requests); the cheapest
   generates the load. ``--clients N`` spreads the workers over N load
   processes (one is enough: it stays well under a core). Target (issue 7):
   >= 1,000 jobs/s end to end with batch 10. In-process rows (JobStore
   directly, no HTTP, with and without synced commits) show how much of a
   cycle is the store and how much is fsync.
2. **Creation.** ``--jobs`` jobs (inputs ``"shard-0000123.tar"``) through
   ``POST /v1/jobs/<p>/jobs`` as NDJSON batches with an Idempotency-Key,
   with the server's VmRSS and RssAnon (heap) before, after the first batch
   and at the end, and its peak (VmHWM); baseline: ``JobStore.add_jobs`` in
   process, same batches. Target: 1M in under 60 s with flat memory.
3. **Size.** ``data.mdb`` (its file size: LMDB's high-water mark, free pages
   included) after the creation run, per million jobs; and, in process, a
   smaller project run through all 3 stages (size after each stage),
   extrapolated to a million.

``--profile`` additionally runs the batch-10 load against a server with
cProfile switched on for the measured window only (and the garbage
collector's time, which cProfile does not see), and prints where its time
goes; cProfile slows the server, so those rates are not the reported ones.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h11
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

STAGES = [
    {"name": "crawl", "lease_timeout": 600},
    {"name": "filter", "lease_timeout": 600},
    {"name": "embed", "lease_timeout": 600},
]
CLAIM_WAIT = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard(i: int) -> str:
    return f"shard-{i:07d}.tar"


def ndjson(first: int, count: int) -> bytes:
    return "".join(f'"{shard(i)}"\n' for i in range(first, first + count)).encode()


# --- a minimal keep-alive HTTP/1.1 client ----------------------------------------------------


#: The benchmark tracker's admin token (a throwaway node; passed with --admin-token).
ADMIN_TOKEN = "bench-admin-token"
ADMIN = [("x-ocf-admin-token", ADMIN_TOKEN)]


class Conn:
    def __init__(self, stream: trio.SocketStream, port: int) -> None:
        self.stream = stream
        self.port = port
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> Conn:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(stream, port)

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None
    ) -> tuple[int, bytes]:
        c = self.h11
        hdrs = [("host", "bench"), ("content-length", str(len(body)))]
        if body and not any(k == "content-type" for k, _ in headers or ()):
            hdrs.append(("content-type", "application/json"))
        hdrs.extend(headers or ())
        await self.stream.send_all(
            c.send(h11.Request(method=method, target=target, headers=hdrs))
            + c.send(h11.Data(data=body))
            + c.send(h11.EndOfMessage())
        )
        status, parts = 0, []
        while True:
            event = c.next_event()
            if event is h11.NEED_DATA:
                c.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("server closed the connection mid-answer")
        if c.our_state is h11.MUST_CLOSE or c.their_state is h11.MUST_CLOSE:
            await self.stream.aclose()  # the server ends keep-alive after N requests (Hypercorn: 1000)
            self.stream = (await Conn.open(self.port)).stream
            self.h11 = h11.Connection(h11.CLIENT)
        else:
            c.start_next_cycle()
        return status, b"".join(parts)

    async def json(
        self,
        method: str,
        target: str,
        obj: Any = None,
        headers: list[tuple[str, str]] | None = None,
        expect: tuple[int, ...] = (200, 201),
    ) -> Any:
        status, body = await self.request(method, target, b"" if obj is None else json.dumps(obj).encode(), headers)
        if status not in expect:
            raise RuntimeError(f"{method} {target} -> {status}: {body[:300]!r}")
        return json.loads(body)

    async def aclose(self) -> None:
        await self.stream.aclose()


class HttpxConn:
    """The same interface over an ``httpx.AsyncClient``."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def request(
        self, method: str, target: str, body: bytes = b"", headers: list[tuple[str, str]] | None = None
    ) -> tuple[int, bytes]:
        hdrs = dict(headers or ())
        if body:
            hdrs.setdefault("content-type", "application/json")
        response = await self.client.request(method, target, content=body or None, headers=hdrs)
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self.client.aclose()


# --- the tracker process -----------------------------------------------------------------------


class Server:
    """``python -m ocf start --jobs`` in its own process, on a temp data dir and a free port."""

    def __init__(self, profile: Path | None = None) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="ocf-jobs-bench-"))
        self.port = free_port()
        self.log = self.data_dir / "node.log"
        self.profile = profile
        prefix = [__file__, "--serve-profiled", str(profile), "--"] if profile else ["-m", "ocf"]
        args = [
            sys.executable,
            *prefix,
            "start",
            "--mode",
            "standalone",
            "--jobs",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--tcpport",
            "0",
            "--data-dir",
            str(self.data_dir / "node"),
            "--log-level",
            "warning",
            "--admin-token",
            ADMIN_TOKEN,
            "--register-burst",
            "1000000",
            "--admin-burst",
            "1000000",
        ]
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        )
        self.proc = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tracker exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if trio.run(self._health) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("tracker did not answer /v1/health within 60 s")
            time.sleep(0.1)

    async def _health(self) -> int:
        conn = await Conn.open(self.port)
        try:
            return (await conn.request("GET", "/v1/health"))[0]
        finally:
            await conn.aclose()

    def status(self, field: str) -> int:
        """A /proc/<pid>/status field in bytes (VmRSS, VmHWM, RssAnon: heap, RssFile: mapped files incl. data.mdb)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu(self) -> tuple[float, float]:
        """Seconds of CPU the server has used: (user, system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tck = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tck, int(fields[12]) / tck

    @property
    def mdb(self) -> Path:
        return self.data_dir / "node" / "store" / "data.mdb"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def serve_profiled(out: str, argv: list[str]) -> int:
    """``ocf start`` with cProfile switched on by SIGUSR1 and off (written to ``out``) by SIGUSR2."""
    import cProfile

    from ocf.cli import main as ocf_main

    import gc

    profiler = cProfile.Profile()
    gc_time = {"on": False, "t": 0.0, "seconds": 0.0, "collections": [0, 0, 0]}

    def gc_callback(phase: str, info: dict[str, int]) -> None:  # cProfile does not see the collector
        if not gc_time["on"]:
            return
        if phase == "start":
            gc_time["t"] = time.perf_counter()
        else:
            gc_time["seconds"] += time.perf_counter() - gc_time["t"]
            gc_time["collections"][info["generation"]] += 1

    def start(*_: Any) -> None:
        gc_time["on"] = True
        profiler.enable()

    def stop(*_: Any) -> None:
        profiler.disable()
        gc_time["on"] = False
        profiler.dump_stats(out)
        Path(out + ".gc").write_text(json.dumps(gc_time))

    gc.callbacks.append(gc_callback)
    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    return ocf_main(argv)


# --- load generator (runs in --clients separate processes) ----------------------------------


async def client_process(spec: dict[str, Any]) -> dict[str, Any]:
    """One load process: its share of the workers, timed by the wall clock shared with the others."""
    port, batch, project = spec["port"], spec["batch"], spec["project"]
    done = [0, 0, 0]
    stats = {"requests": 0, "errors": 0, "empty_stage1": 0}
    snapshots: list[dict[str, Any]] = []
    measuring = False
    http = None
    if spec["impl"] == "httpx-shared":  # one pool for all workers of the process
        import httpx

        n = len(spec["workers"])
        http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            timeout=60,
        )
        conns: list[Any] = [HttpxConn(http) for _ in spec["workers"]]
    elif spec["impl"] == "httpx":  # one client (pool of one connection) per worker
        import httpx

        conns = [HttpxConn(httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)) for _ in spec["workers"]]
    else:
        conns = [await Conn.open(port) for _ in spec["workers"]]

    async def tracker_worker(conn: Any, token: str, stage: int) -> None:
        auth = [("authorization", f"Bearer {token}")]
        claim_body = json.dumps({"max": batch, "wait": CLAIM_WAIT}).encode()
        claim_path, complete_path = f"/v1/jobs/{project}/claim", f"/v1/jobs/{project}/complete"
        combined = spec["mode"] == "combined"  # complete + claim the next batch in one request
        jobs: list[dict[str, Any]] = []
        while True:
            if not jobs:
                status, body = await conn.request("POST", claim_path, claim_body, auth)
                stats["requests"] += 1
                if status != 200:
                    stats["errors"] += 1
                    continue
                jobs = json.loads(body)["jobs"]
                if not jobs:
                    if stage == 0 and measuring:
                        stats["empty_stage1"] += 1
                    continue
            results = [{"id": j["id"], "output": f"{j['input']}|{stage}"} for j in jobs]
            payload = {"results": results, "claim": batch} if combined else {"results": results}
            status, body = await conn.request("POST", complete_path, json.dumps(payload).encode(), auth)
            stats["requests"] += 1
            jobs = []
            if status != 200:
                stats["errors"] += 1
                continue
            answer = json.loads(body)
            for r in answer["results"]:
                if r["status"] == "done":
                    done[stage] += 1
                else:
                    stats["errors"] += 1
            if combined:
                jobs = answer["jobs"]

    async def bare_worker(conn: Any, token: str, stage: int) -> None:
        while True:
            for _ in range(2):  # the same two-request cycle, against a trivial route
                status, _ = await conn.request("GET", "/v1/health")
                stats["requests"] += 1
                stats["errors"] += status != 200
            done[stage] += 1

    def snapshot() -> None:
        snapshots.append(
            {"t": time.time(), "done": list(done), "requests": stats["requests"], "cpu": time.process_time()}
        )

    print("ready", flush=True)  # connections are open; the timetable comes on stdin
    spec.update(json.loads(await trio.to_thread.run_sync(sys.stdin.readline)))
    await trio.sleep(max(0.0, spec["start"] - time.time()))
    async with trio.open_nursery() as nursery:
        worker = tracker_worker if spec["mode"] in ("tracker", "combined") else bare_worker
        for conn, (token, stage) in zip(conns, spec["workers"], strict=True):
            nursery.start_soon(worker, conn, token, stage)
        await trio.sleep(max(0.0, spec["measure_from"] - time.time()))
        snapshot()
        measuring = True
        await trio.sleep(max(0.0, spec["measure_to"] - time.time()))
        snapshot()
        nursery.cancel_scope.cancel()
    for conn in conns[:1] if http is not None else conns:
        with trio.move_on_after(1):
            await conn.aclose()
    return {"snapshots": snapshots, **stats}


def run_load(
    server: Server,
    *,
    mode: str,
    impl: str,
    workers: list[tuple[str, int]],
    project: str,
    batch: int,
    clients: int,
    warmup: float,
    seconds: float,
) -> dict[str, float]:
    """Run the load in ``clients`` processes; rates over [warmup, warmup + seconds]."""
    spec = {"port": server.port, "mode": mode, "impl": impl, "project": project, "batch": batch}
    procs = []
    for k in range(clients):
        part = dict(spec, workers=workers[k::clients])
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--client-spec", json.dumps(part)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:  # wait until every process has imported and connected
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("a load process failed to start")
    start = time.time() + 0.2
    timetable = {"start": start, "measure_from": start + warmup, "measure_to": start + warmup + seconds}
    spec.update(timetable)
    for p in procs:
        p.stdin.write(json.dumps(timetable) + "\n")
        p.stdin.flush()
    time.sleep(max(0.0, spec["measure_from"] - time.time()))
    if server.profile:
        server.proc.send_signal(signal.SIGUSR1)
    cpu0, t0 = server.cpu(), time.time()
    time.sleep(max(0.0, spec["measure_to"] - time.time()))
    cpu1, t1 = server.cpu(), time.time()
    if server.profile:
        server.proc.send_signal(signal.SIGUSR2)
    outs = []
    for p in procs:
        out = p.stdout.read()
        p.wait(120)
        if p.returncode != 0:
            raise RuntimeError(f"load process failed with {p.returncode}")
        outs.append(json.loads(out))
    if any(len(o["snapshots"]) != 2 or o["snapshots"][1]["requests"] == o["snapshots"][0]["requests"] for o in outs):
        raise RuntimeError(f"a load process made no requests in the measured window: {outs} (spec {spec})")
    done = [sum(o["snapshots"][1]["done"][s] - o["snapshots"][0]["done"][s] for o in outs) for s in range(3)]
    elapsed = max(o["snapshots"][1]["t"] for o in outs) - min(o["snapshots"][0]["t"] for o in outs)
    requests = sum(o["snapshots"][1]["requests"] - o["snapshots"][0]["requests"] for o in outs)
    client_cpu = sum(o["snapshots"][1]["cpu"] - o["snapshots"][0]["cpu"] for o in outs)
    return {
        "cycles": sum(done) / elapsed,
        "e2e": done[2] / elapsed,
        "per_stage": [d / elapsed for d in done],
        "requests": requests / elapsed,
        "errors": sum(o["errors"] for o in outs),
        "empty_stage1": sum(o["empty_stage1"] for o in outs),
        "server_cpu": (sum(cpu1) - sum(cpu0)) / (t1 - t0),
        "server_sys": (cpu1[1] - cpu0[1]) / (t1 - t0),
        "client_cpu": client_cpu / elapsed,
        "client_us_per_req": client_cpu / max(requests, 1) * 1e6,
    }


async def setup_load_project(
    port: int, project: str, jobs: int, n_workers: int, batch_size: int
) -> list[tuple[str, int]]:
    conn = await Conn.open(port)
    await conn.json("PUT", f"/v1/jobs/{project}", {"stages": STAGES}, ADMIN)
    for first in range(0, jobs, batch_size):
        body = ndjson(first, min(batch_size, jobs - first))
        status, answer = await conn.request(
            "POST", f"/v1/jobs/{project}/jobs", body, [("content-type", "application/x-ndjson"), *ADMIN]
        )
        assert status == 201, answer[:300]
    workers = []
    for i in range(n_workers):
        stage = i % 3
        reg = await conn.json(
            "POST",
            f"/v1/jobs/{project}/workers",
            {"nickname": f"bench{i}", "user": f"user{i % 7}", "stage": STAGES[stage]["name"]},
        )
        workers.append((reg["token"], stage))
    await conn.aclose()
    return workers


# --- creation over HTTP --------------------------------------------------------------------


async def create_over_http(server: Server, total: int, batch: int) -> dict[str, Any]:
    bodies = [ndjson(first, min(batch, total - first)) for first in range(0, total, batch)]
    conn = await Conn.open(server.port)
    await conn.json("PUT", "/v1/jobs/create", {"stages": STAGES}, ADMIN)
    rss = [server.status("VmRSS")]
    anon = [server.status("RssAnon")]
    size0 = server.mdb.stat().st_size
    t0 = time.perf_counter()
    created = 0
    for n, body in enumerate(bodies):
        status, answer = await conn.request(
            "POST",
            "/v1/jobs/create/jobs",
            body,
            [("content-type", "application/x-ndjson"), ("idempotency-key", f"batch-{n}"), *ADMIN],
        )
        if status != 201:
            raise RuntimeError(f"creation batch {n} -> {status}: {answer[:300]!r}")
        created += json.loads(answer)["created"]
        rss.append(server.status("VmRSS"))
        anon.append(server.status("RssAnon"))
    elapsed = time.perf_counter() - t0
    await conn.aclose()
    assert created == total, created
    return {
        "rate": total / elapsed,
        "seconds": elapsed,
        "rss": rss,
        "anon": anon,
        "hwm": server.status("VmHWM"),
        "mdb": server.mdb.stat().st_size,
        "mdb0": size0,
    }


# --- in process (no HTTP): the store's own rates and sizes ----------------------------------


def in_process_create(total: int, batch: int) -> float:
    from ocf.jobs.store import JobStore
    from ocf.store import Store

    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        js = JobStore(store)
        js.create_project("create", {"stages": STAGES}, time.time())
        inputs = [[shard(i) for i in range(first, min(first + batch, total))] for first in range(0, total, batch)]
        t0 = time.perf_counter()
        for n, chunk in enumerate(inputs):
            js.add_jobs("create", chunk, time.time(), idempotency_key=f"batch-{n}")
        elapsed = time.perf_counter() - t0
        store.close()
    return total / elapsed


def in_process_rate(batch: int, seconds: float, *, sync: bool = True, jobs: int = 50_000) -> float:
    """Stage-1 claim + complete_many with JobStore directly (same synced commits, no HTTP), cycles/s."""
    from ocf.jobs.store import JobStore
    from ocf.store import Store

    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d, sync=sync)
        js = JobStore(store)
        now = time.time()
        js.create_project("p", {"stages": STAGES}, now)
        js.add_jobs("p", [shard(i) for i in range(jobs)], now)
        token = js.register_worker("p", nickname="w", stage=1, now=now)["token"]
        done = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            jobs = js.claim("p", token, time.time(), limit=batch)
            if not jobs:
                break
            js.complete_many("p", token, [{"id": j["id"], "output": f"{j['input']}|0"} for j in jobs], time.time())
            done += len(jobs)
        elapsed = time.perf_counter() - t0
        store.close()
    return done / elapsed


def in_process_sizes(total: int) -> list[int]:
    """data.mdb after creating ``total`` jobs, then after running them through each of the 3 stages."""
    from ocf.jobs.store import JobStore
    from ocf.store import Store

    with tempfile.TemporaryDirectory() as d:
        store = Store.open(d)
        js = JobStore(store)
        now = time.time()
        js.create_project("p", {"stages": STAGES}, now)
        for first in range(0, total, 50_000):
            js.add_jobs("p", [shard(i) for i in range(first, min(first + 50_000, total))], now)
        mdb = Path(d) / "store" / "data.mdb"
        sizes = [mdb.stat().st_size]
        for stage in range(3):
            token = js.register_worker("p", nickname=f"w{stage}", stage=stage + 1, now=now)["token"]
            while jobs := js.claim("p", token, time.time(), limit=1000):
                js.complete_many(
                    "p", token, [{"id": j["id"], "output": f"{j['input']}|{stage}"} for j in jobs], time.time()
                )
            sizes.append(mdb.stat().st_size)
        store.close()
    return sizes


# --- profiling ---------------------------------------------------------------------------------


def profile_summary(path: Path, seconds: float, top: int = 25) -> str:
    import io

    out = io.StringIO()
    gc_time = json.loads(Path(str(path) + ".gc").read_text())
    out.write(
        f"garbage collector: {gc_time['seconds']:.3f} s of the {seconds:.0f} s window, collections per generation "
        f"{gc_time['collections']}\n"
    )
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# --- main ------------------------------------------------------------------------------------


def server_note(r: dict[str, float]) -> str:
    """Server CPU use; a single-threaded server below 100% while clients wait is blocked (fsync), not idle."""
    per_req = 1e6 / r["requests"]
    return (
        f"{r['server_cpu'] * 100:.0f}% core, {r['server_cpu'] * per_req:.0f} us CPU/req"
        f" ({r['server_sys'] * per_req:.0f} of it system)"
    )


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (used by the test suite)")
    parser.add_argument(
        "--seconds", type=float, default=None, help="measured seconds per load run (default 15, quick 2)"
    )
    parser.add_argument("--workers", type=int, default=100, help="simulated workers, spread over the 3 stages")
    parser.add_argument("--clients", type=int, default=1, help="load generator processes")
    parser.add_argument(
        "--jobs", type=int, default=None, help="jobs to create over HTTP (default 1,000,000; quick 20,000)"
    )
    parser.add_argument("--batches", default="1,10", help="claim/complete batch sizes to measure (default 1,10)")
    parser.add_argument("--profile", action="store_true", help="also profile the server under the batch-10 load")
    parser.add_argument("--client-spec", help=argparse.SUPPRESS)
    parser.add_argument("--serve-profiled", help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--serve-profiled"]:
        sys.exit(serve_profiled(sys.argv[2], sys.argv[4:]))
    args = parser.parse_args()
    if args.client_spec:
        print(json.dumps(trio.run(client_process, json.loads(args.client_spec))))
        return

    quick = args.quick
    batches = [int(b) for b in args.batches.split(",")]
    seconds = args.seconds or (2.0 if quick else 15.0)
    warmup = 1.5 if quick else 3.0
    total = args.jobs or (20_000 if quick else 1_000_000)
    create_batch = 5_000 if quick else 50_000
    seed = 20_000 if quick else 200_000  # stage-1 jobs per load project: more than the run can use
    through = 20_000 if quick else 100_000  # jobs run through all 3 stages in process for sizes
    rows: list[tuple[str, str, str, str]] = []

    # 1. cycles over HTTP -------------------------------------------------------------------
    server = Server()
    try:
        projects = {
            b: trio.run(setup_load_project, server.port, f"load-b{b}", seed, args.workers, 50_000) for b in batches
        }
        workers_b1 = projects[batches[0]]
        cost = {}
        for impl in ("h11", "httpx", "httpx-shared"):
            cost[impl] = r = run_load(
                server,
                mode="bare",
                impl=impl,
                workers=workers_b1,
                project="",
                batch=1,
                clients=1,
                warmup=0.5 if quick else 1.0,
                seconds=1.0 if quick else 4.0,
            )
            what = {
                "h11": "minimal h11 client",
                "httpx": "httpx, an AsyncClient per worker",
                "httpx-shared": "httpx, one shared AsyncClient pool",
            }[impl]
            rows.append(
                (
                    f"load client cost: {what}, {args.workers} conns",
                    f"{r['requests']:8.0f} req/s",
                    "",
                    f"client {r['client_us_per_req']:.0f} us CPU/req ({r['client_cpu'] * 100:.0f}% of a core), server "
                    f"{r['server_cpu'] * 100:.0f}% core",
                )
            )
        impl = min(cost, key=lambda k: cost[k]["client_us_per_req"])
        clients = f"{args.clients} {impl} load process{'es' if args.clients > 1 else ''}"
        bare = run_load(
            server,
            mode="bare",
            impl=impl,
            workers=workers_b1,
            project="",
            batch=1,
            clients=args.clients,
            warmup=warmup,
            seconds=seconds,
        )
        bare_pairs = bare["requests"] / 2
        rows.append(
            (
                f"bare gateway: 2x GET /v1/health per cycle, {args.workers} workers (baseline)",
                f"{bare_pairs:8.0f} cycles/s",
                "1.00",
                f"{bare['requests']:.0f} req/s, server {server_note(bare)}; clients {bare['client_cpu'] * 100:.0f}% "
                f"({clients})",
            )
        )
        loads = {}
        for batch, workers in projects.items():
            project = f"load-b{batch}"
            r = loads[batch] = run_load(
                server,
                mode="tracker",
                impl=impl,
                workers=workers,
                project=project,
                batch=batch,
                clients=args.clients,
                warmup=warmup,
                seconds=seconds,
            )
            pairs = r["requests"] / 2
            notes = [f"{r['requests']:.0f} req/s, server {server_note(r)}; clients {r['client_cpu'] * 100:.0f}%"]
            if r["errors"]:
                notes.append(f"{r['errors']} errors")
            if r["empty_stage1"]:
                notes.append(f"stage 1 ran dry {r['empty_stage1']}x")
            rows.append(
                (
                    f"tracker, batch {batch}: claim+complete, {args.workers} workers over 3 stages",
                    f"{r['cycles']:8.0f} job-stage/s",
                    f"{pairs / bare_pairs:.2f}",
                    "; ".join(notes),
                )
            )
            target = f"; target >= 1000 at batch 10: {'met' if r['e2e'] >= 1000 else 'NOT met'}" if batch == 10 else ""
            rows.append(
                (
                    f"tracker, batch {batch}: end to end (all 3 stages)",
                    f"{r['e2e']:8.0f} jobs/s",
                    "",
                    f"per stage {' / '.join(f'{x:.0f}' for x in r['per_stage'])} /s{target}; "
                    f"ceiling if a request cost what /v1/health does: {bare_pairs * batch / 3:.0f}",
                )
            )
        for batch, workers in projects.items():
            project = f"load-b{batch}"
            r = run_load(
                server,
                mode="combined",
                impl=impl,
                workers=workers,
                project=project,
                batch=batch,
                clients=args.clients,
                warmup=warmup,
                seconds=seconds,
            )
            notes = [f"{r['requests']:.0f} req/s, server {server_note(r)}; clients {r['client_cpu'] * 100:.0f}%"]
            if r["errors"]:
                notes.append(f"{r['errors']} errors")
            rows.append(
                (
                    f"tracker, batch {batch}, complete+claim in one request: {args.workers} workers",
                    f"{r['cycles']:8.0f} job-stage/s",
                    f"{r['cycles'] / batch / bare_pairs:.2f}",
                    "; ".join(notes),
                )
            )
            target = f"; target >= 1000 at batch 10: {'met' if r['e2e'] >= 1000 else 'NOT met'}" if batch == 10 else ""
            rows.append(
                (
                    f"tracker, batch {batch}, complete+claim in one request: end to end",
                    f"{r['e2e']:8.0f} jobs/s",
                    "",
                    f"per stage {' / '.join(f'{x:.0f}' for x in r['per_stage'])} /s{target}",
                )
            )
        rss_after_load = server.status("VmRSS")
    finally:
        server.stop()
    rows.append(
        (f"tracker server RSS after the load runs ({len(batches) * seed:,} jobs held)", mib(rss_after_load), "", "")
    )
    for batch in batches:
        for sync in (True, False):
            rate = in_process_rate(batch, 1.0 if quick else 3.0, sync=sync, jobs=20_000 if quick else 50_000)
            rows.append(
                (
                    f"in process (no HTTP), batch {batch}: JobStore claim+complete_many"
                    f"{'' if sync else ', commits not synced'}",
                    f"{rate:8.0f} job-stage/s",
                    "",
                    f"{1e6 / rate * batch:.0f} us per claim+complete pair"
                    + ("" if sync else " (store CPU; the difference is fsync)"),
                )
            )

    # 2. creation ---------------------------------------------------------------------------
    direct = in_process_create(total, create_batch)
    rows.append(
        (
            f"create {total:,} jobs in process: JobStore.add_jobs, {create_batch:,}/txn (baseline)",
            f"{direct:8.0f} jobs/s",
            "1.00",
            "",
        )
    )
    server = Server()
    try:
        c = trio.run(create_over_http, server, total, create_batch)
    finally:
        server.stop()
    flat = c["anon"][-1] - c["anon"][1]
    rows.append(
        (
            f"create {total:,} jobs over HTTP: NDJSON, {create_batch:,}/request",
            f"{c['rate']:8.0f} jobs/s",
            f"{c['rate'] / direct:.2f}",
            f"{c['seconds']:.1f} s; target 1M < 60 s: {'met' if c['rate'] >= 1e6 / 60 else 'NOT met'}",
        )
    )
    m = 1 << 20
    rows.append(
        (
            "  server VmRSS: before / after 1st batch / after last (peak)",
            f"{c['rss'][0] / m:.0f} MiB",
            "",
            f"{c['rss'][1] / m:.0f} / {c['rss'][-1] / m:.0f} MiB (peak VmHWM {c['hwm'] / m:.0f} MiB); includes mapped "
            "data.mdb pages",
        )
    )
    rows.append(
        (
            "  server RssAnon (heap): before / after 1st batch / after last",
            f"{c['anon'][0] / m:.0f} MiB",
            "",
            f"{c['anon'][1] / m:.0f} / {c['anon'][-1] / m:.0f} MiB: {flat / m:+.1f} MiB from 1st to last batch "
            f"({'flat' if abs(flat) < 32 * m else 'GROWS'})",
        )
    )

    # 3. size -------------------------------------------------------------------------------
    per_m = 1e6 / total
    rows.append(
        (
            f"LMDB data.mdb after creating {total:,} jobs",
            mib(c["mdb"]),
            "",
            f"{mib((c['mdb'] - c['mdb0']) * per_m)} per million; {(c['mdb'] - c['mdb0']) / total:.0f} B/job",
        )
    )
    sizes = in_process_sizes(through)
    per_m = 1e6 / through
    rows.append(
        (
            f"LMDB, {through:,} jobs through 3 stages in process (x{per_m:.0f} = per million)",
            mib(sizes[0] * per_m),
            "",
            "after stage 1/2/3: " + " / ".join(mib(s * per_m) for s in sizes[1:]) + f" (extrapolated from {through:,})",
        )
    )

    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>20}  {'ratio':>6}  note")
    print("-" * (width + 60))
    for a, b, c_, d in rows:
        print(f"{a:<{width}}  {b:>20}  {c_:>6}  {d}")
    sys.stdout.flush()

    if args.profile:
        prof = Path(tempfile.mkdtemp()) / "server.prof"
        server = Server(profile=prof)
        try:
            workers = trio.run(setup_load_project, server.port, "load-b10", seed, args.workers, 50_000)
            r = run_load(
                server,
                mode="tracker",
                impl=impl,
                workers=workers,
                project="load-b10",
                batch=10,
                clients=args.clients,
                warmup=warmup,
                seconds=seconds,
            )
        finally:
            server.stop()
        print(
            f"\nserver profile, batch 10 under cProfile ({r['cycles']:.0f} job-stage/s, {r['e2e']:.0f} jobs/s while "
            "profiled):\n"
        )
        print(profile_summary(prof, seconds))
        shutil.rmtree(prof.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
