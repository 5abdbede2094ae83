"""Real node processes on loopback, started as users start them: converge, route, survive losing a third.

Thirty processes, in CI too: they converge, and recover from losing ten, in about 30 s.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import pytest

from ocf.identity import Identity
from tests.conftest import free_port

N = 30

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def start(i: int, tmp_path, tcp: int, http: int, bootstrap: str | None) -> subprocess.Popen:
    args = [
        sys.executable, "-m", "ocf", "start",
        "--seed", f"scale-proc-{i}",
        "--data-dir", str(tmp_path / f"n{i}"),
        "--host", "127.0.0.1", "--port", str(http), "--tcpport", str(tcp), "--udpport", "0",
        "--membership.degree", "4", "--membership.suspicion", "3",
        "--log-level", "warning",
    ]  # fmt: skip
    args += ["--mode", "standalone"] if bootstrap is None else ["--bootstrap.addr", bootstrap]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def connected(http: int) -> set[str]:
    try:
        table = httpx.get(f"http://127.0.0.1:{http}/v1/dnt/table", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return set()
    return {key.lstrip("/") for key, entry in table.items() if entry.get("connected")}


def wait_for(predicate, timeout: float) -> None:
    """Poll other processes (no event crosses a process boundary), up to ``timeout``."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.5)


def test_processes_converge_route_and_survive_losing_a_third(tmp_path):
    ids = [str(Identity.from_seed(f"scale-proc-{i}").peer_id) for i in range(N)]
    tcp = [free_port() for _ in range(N)]
    http = [free_port() for _ in range(N)]
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start(0, tmp_path, tcp[0], http[0], None))
        boot = f"/ip4/127.0.0.1/tcp/{tcp[0]}/p2p/{ids[0]}"
        for i in range(1, N):
            procs.append(start(i, tmp_path, tcp[i], http[i], boot))
        wait_for(lambda: all(connected(http[i]) == set(ids) for i in range(N)), timeout=240)
        # Route: node 1's gateway reaches the last node's over a transport stream.
        r = httpx.get(f"http://127.0.0.1:{http[1]}/v1/p2p/{ids[-1]}/v1/health", timeout=30)
        assert r.status_code == 200
        victims = list(range(N - N // 3, N))
        for i in victims:
            procs[i].send_signal(signal.SIGKILL)
        alive = set(ids) - {ids[i] for i in victims}
        survivors = [i for i in range(N) if i not in victims]
        wait_for(lambda: all(connected(http[i]) == alive for i in survivors), timeout=120)
        r = httpx.get(f"http://127.0.0.1:{http[survivors[-1]]}/v1/p2p/{ids[0]}/v1/health", timeout=30)
        assert r.status_code == 200
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
