"""A provider's node vanishing under load, through the real CLI: never a 500.

Three ``python -m ocf start`` processes (a dispatcher and two workers serving
models ``m1`` and ``m2`` through ``examples/mock_llm.py``), a client sending
requests for both models at a steady rate, then worker 2's node is killed
(``kill -9``, or stopped with SIGTERM or Ctrl-C). What the dispatcher must answer:

- ``m1``: always 200 (one model's outage is invisible to another's clients);
- ``m2``: 503 with ``Retry-After`` while worker 2 is still in the node table,
  404 once it has gone from it, never a 500 (nor any other status);
- its log: no traceback.

The kill -9 variant observes a minute with ``OCF_TEST_FULL=1`` and a bounded
20 s otherwise (enough for the table to forget the worker: ``--stale-after``
and ``--verify-interval`` are short here).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
FULL = os.environ.get("OCF_TEST_FULL") == "1"
#: Seconds of load after the kill; the table must have forgotten worker 2 well before the end.
OBSERVE_KILL = 60.0 if FULL else 20.0
OBSERVE_STOP = 12.0
#: Requests per second per model: steady load without hogging a shared CI machine.
RATE = 20.0
TABLE_FLAGS = ["--verify-interval", "2", "--stale-after", "8"]  # stale after 8 s unseen (liveness is kept 5 s)


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.gw = free_port()

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        path = self.tmp / f"{name}.log"
        self.logs[name] = path
        with path.open("w") as out:
            proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "src")),
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def wait(self, what: str, check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                assert proc.poll() is None or name == "worker2", f"{name} exited:\n{self.log(name)[-3000:]}"
            try:
                result = check()
                if result:
                    return result
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                last = exc
            time.sleep(0.1)  # polling subprocesses over HTTP: there is no event to wait on
        raise AssertionError(f"timed out waiting for {what} (last: {last!r})")

    def start(self) -> None:
        py = sys.executable
        llm1, llm2, t0, p1, t1, p2, t2 = (free_port() for _ in range(7))
        self.spawn("llm1", [py, "examples/mock_llm.py", "--port", str(llm1), "--model", "m1"])
        self.spawn("llm2", [py, "examples/mock_llm.py", "--port", str(llm2), "--model", "m2"])
        base = [py, "-m", "ocf", "start", "--host", "127.0.0.1", *TABLE_FLAGS]
        self.spawn(
            "dispatcher",
            [
                *base,
                "--mode",
                "standalone",
                "--port",
                str(self.gw),
                "--tcpport",
                str(t0),
                "--udpport",
                "0",
                "--data-dir",
                str(self.tmp / "d"),
            ],
        )
        health = self.wait("the dispatcher", lambda: httpx.get(f"{self.url}/v1/health", timeout=2).json())
        join = ["--mode", "node", "--bootstrap.addr", f"/ip4/127.0.0.1/tcp/{t0}/p2p/{health['peer_id']}"]
        for name, port, tport, llm in (("worker1", p1, t1, llm1), ("worker2", p2, t2, llm2)):
            self.spawn(
                name,
                [
                    *base,
                    *join,
                    "--port",
                    str(port),
                    "--tcpport",
                    str(tport),
                    "--udpport",
                    "0",
                    "--data-dir",
                    str(self.tmp / name),
                    "--service.name",
                    "llm",
                    "--service.port",
                    str(llm),
                ],
            )

        def both_answer() -> bool:
            return all(chat(self.url, model).status_code == 200 for model in ("m1", "m2"))

        self.wait("both models answering through the dispatcher", both_answer)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.gw}"

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def chat(url: str, model: str, client: httpx.Client | None = None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return (client or httpx).post(f"{url}/v1/service/llm/v1/chat/completions", json=body, timeout=30)


class Load:
    """Requests for one model at a steady rate in a thread; every answer kept as (t, status, retry_after, body)."""

    #: Seconds each request took, in the order of ``answers``.
    durations: list[float]

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.answers: list[tuple[float, int, str | None, str]] = []
        self.durations = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    r = chat(self.url, self.model, client)
                    self.answers.append((t, r.status_code, r.headers.get("retry-after"), r.text[:300]))
                except httpx.HTTPError as exc:
                    self.answers.append((t, -1, None, repr(exc)))
                self.durations.append(time.monotonic() - t)
                self._stop.wait(max(0.0, 1 / RATE - (time.monotonic() - t)))

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def statuses(self, since: float = 0.0) -> list[int]:
        return [s for t, s, _, _ in self.answers if t >= since]


def _phases(statuses: list[int]) -> list[int]:
    """``[200, 200, 503, 503, 404]`` -> ``[200, 503, 404]``: the statuses in the order they took over."""
    return [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]


def _check_failover(m1: Load, m2: Load, stopped_at: float, dispatcher_log: str) -> dict:
    m1_after, m2_after = m1.statuses(stopped_at), m2.statuses(stopped_at)
    figures = {
        "m2_phases": _phases(m2_after),
        "m2_changes_at_s": [
            round(t - stopped_at, 1)
            for i, (t, st, _, _) in enumerate(m2.answers)
            if t >= stopped_at and (i == 0 or m2.answers[i - 1][1] != st)
        ],
        "m1": {s: m1_after.count(s) for s in set(m1_after)},
        "m2": {s: m2_after.count(s) for s in set(m2_after)},
        "tracebacks": dispatcher_log.count("Traceback"),
        "m1_slowest_s": round(
            max(d for (t, *_), d in zip(m1.answers, m1.durations, strict=True) if t >= stopped_at), 3
        ),
    }
    bad = [a for a in m1.answers + m2.answers if a[1] >= 500 and a[1] != 503]
    assert not bad, f"{figures}: {bad[:5]}"
    assert set(m1.statuses()) == {200}, figures
    assert figures["m1_slowest_s"] < 2.0, figures  # m1's clients do not notice (generous bound for a busy CI box)
    # answered (in flight at the stop), then unavailable while still listed, then unknown: never back
    assert figures["m2_phases"] in ([404], [503, 404], [200, 404], [200, 503, 404]), figures
    assert all(ra is not None and int(ra) >= 1 for t, s, ra, _ in m2.answers if s == 503), "503 without Retry-After"
    # Once the table has forgotten the worker, m2 is unknown for good (checked over the last seconds).
    tail = [s for t, s, _, _ in m2.answers if t >= m2.answers[-1][0] - 3.0]
    assert tail and set(tail) == {404}, figures
    assert figures["tracebacks"] == 0, dispatcher_log[-5000:]
    assert len(m1_after) >= 10 and len(m2_after) >= 10, figures
    return figures


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_of_a_provider_never_yields_500(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start()
        with Load(cluster.url, "m1") as m1, Load(cluster.url, "m2") as m2:
            time.sleep(1.0)  # a second of normal traffic before the kill (a load duration, not a wait)
            killed_at = time.monotonic()
            cluster.procs["worker2"].send_signal(signal.SIGKILL)
            time.sleep(OBSERVE_KILL)
        figures = _check_failover(m1, m2, killed_at, cluster.log("dispatcher"))
        print("kill -9 figures:", figures)
        assert figures["m2"].get(503, 0) >= 1, figures  # killed, it cannot say it left: listed, unreachable
    finally:
        cluster.stop_all()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_graceful_stop_of_a_provider_never_yields_500(tmp_path, sig):
    cluster = Cluster(tmp_path)
    try:
        cluster.start()
        with Load(cluster.url, "m1") as m1, Load(cluster.url, "m2") as m2:
            time.sleep(1.0)
            stopped_at = time.monotonic()
            worker2 = cluster.procs["worker2"]
            worker2.send_signal(sig)
            assert worker2.wait(timeout=10) == 0
            time.sleep(OBSERVE_STOP)
        figures = _check_failover(m1, m2, stopped_at, cluster.log("dispatcher"))
        print(f"{sig.name} figures:", figures)
        assert figures["m2_phases"][-1] == 404 and figures["m2"][404] >= figures["m2"].get(503, 0), (
            figures
        )  # it said it left
    finally:
        cluster.stop_all()
