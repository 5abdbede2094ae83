"""Real node processes on loopback, started as users start them: converge, route, survive losing a third.

Thirty processes, in CI too: they converge, and recover from losing ten, in about 30 s. A process
that could not bind its pre-picked port is started again on another (see :class:`Fleet`).
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


def wait_for(predicate, timeout: float, describe=lambda: "") -> None:
    """Poll other processes (no event crosses a process boundary), up to ``timeout``."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"condition not reached in time {describe()}")
        time.sleep(0.5)


class Fleet:
    """The processes, each restarted on fresh ports if it exits at start.

    A port picked free before a process starts can be taken before it binds:
    thirty processes open outgoing connections from the same ephemeral range.
    ``ocf start`` then exits with "Address already in use"; that says nothing
    about the product, so such a process is started again elsewhere.
    """

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.ids = [str(Identity.from_seed(f"scale-proc-{i}").peer_id) for i in range(N)]
        self.tcp = [free_port() for _ in range(N)]
        self.http = [free_port() for _ in range(N)]
        self.procs: list[subprocess.Popen] = []
        self.restarts = 0
        self.boot = ""

    def start_all(self) -> None:
        self.procs.append(start(0, self.tmp_path, self.tcp[0], self.http[0], None))
        wait_for(lambda: self.up(0), timeout=60, describe=lambda: f"node 0 exited {self.procs[0].poll()}")
        self.boot = f"/ip4/127.0.0.1/tcp/{self.tcp[0]}/p2p/{self.ids[0]}"
        for i in range(1, N):
            self.procs.append(start(i, self.tmp_path, self.tcp[i], self.http[i], self.boot))

    def up(self, i: int) -> bool:
        if self.procs[i].poll() is not None:
            raise AssertionError(f"node {i} exited with {self.procs[i].returncode}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.http[i]}/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def restart_exited(self) -> None:
        for i in range(1, N):
            if self.procs[i].poll() is not None:
                self.restarts += 1
                self.tcp[i], self.http[i] = free_port(), free_port()
                self.procs[i] = start(i, self.tmp_path, self.tcp[i], self.http[i], self.boot)

    def describe(self, nodes: list[int], want: set[str]) -> str:
        lacking = {i: sorted(self.ids.index(p) for p in want - connected(self.http[i])) for i in nodes}
        return f"(restarts {self.restarts}; node -> peers it does not see connected: {lacking})"

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def test_processes_converge_route_and_survive_losing_a_third(tmp_path):
    fleet = Fleet(tmp_path)
    ids, http = fleet.ids, fleet.http
    everyone = list(range(N))
    try:
        fleet.start_all()

        def converged() -> bool:
            fleet.restart_exited()
            return all(connected(http[i]) == set(ids) for i in everyone)

        wait_for(converged, timeout=240, describe=lambda: fleet.describe(everyone, set(ids)))
        # Route: node 1's gateway reaches the last node's over a transport stream.
        r = httpx.get(f"http://127.0.0.1:{http[1]}/v1/p2p/{ids[-1]}/v1/health", timeout=30)
        assert r.status_code == 200
        victims = list(range(N - N // 3, N))
        for i in victims:
            fleet.procs[i].send_signal(signal.SIGKILL)
        alive = set(ids) - {ids[i] for i in victims}
        survivors = [i for i in range(N) if i not in victims]
        wait_for(
            lambda: all(connected(http[i]) == alive for i in survivors),
            timeout=120,
            describe=lambda: fleet.describe(survivors, alive),
        )
        r = httpx.get(f"http://127.0.0.1:{http[survivors[-1]]}/v1/p2p/{ids[0]}/v1/health", timeout=30)
        assert r.status_code == 200
    finally:
        fleet.stop()
