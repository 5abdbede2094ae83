"""``ocf worker`` as volunteers run it: SIGTERM hands the lease back, a tracker restart is survived,
a command that cannot run is one line, and failures are counted and paced.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import free_port
from tests.integration.test_jobs_cli import ocf, start_tracker, stop

pytestmark = pytest.mark.timeout(240)


def spawn_worker(url: str, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ocf", "worker", *args]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OCF_TRACKER_URL=url, PYTHONUNBUFFERED="1"),
    )


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # another process over HTTP: there is no event to wait on
    raise AssertionError(f"timed out waiting for {what}")


def counts(url: str, project: str) -> dict:
    return httpx.get(f"{url}/v1/jobs/{project}", timeout=5).json()["stages"][0]


def test_sigterm_hands_the_lease_back(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_tracker(tmp_path / "d", port)
    try:
        ocf("jobs", "project", "p", "--stage", "slow:600", url=url, data_dir=tmp_path / "d")
        ocf("jobs", "create", "p", "--range", "0:1", url=url, data_dir=tmp_path / "d")
        worker = spawn_worker(
            url, "--project", "p", "--stage", "slow", "--", sys.executable, "-c", "import time; time.sleep(60)"
        )
        wait_for(lambda: counts(url, "p")["leased"] == 1, "the job to be leased")
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        rc = worker.wait(timeout=20)
        stderr = worker.stderr.read()
        assert rc == 143, stderr
        assert time.monotonic() - started < 15
        # Handed back at once, with no attempt used: not left to the 600 s lease.
        c = counts(url, "p")
        assert (c["leased"], c["pending"]) == (0, 1), (c, stderr)
        assert "Traceback" not in stderr and "completed 0 jobs, 0 failed" in stderr
    finally:
        stop(proc)


def test_worker_survives_a_tracker_restart(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "d"
    proc = start_tracker(data, port)
    try:
        total = 60
        ocf("jobs", "project", "p", "--stage", "one:60", url=url, data_dir=tmp_path / "d")
        ocf("jobs", "create", "p", "--range", f"0:{total}", url=url, data_dir=tmp_path / "d")
        # Each job takes a little while, so the restart lands in the middle of the run.
        worker = spawn_worker(
            url,
            "--project",
            "p",
            "--stage",
            "one",
            "--until-empty",
            "--max-backoff",
            "1",
            "--",
            sys.executable,
            "-c",
            "import sys, time; time.sleep(0.05); print(sys.stdin.read())",
        )
        wait_for(lambda: counts(url, "p")["done"] >= 5, "some progress")
        stop(proc)
        assert worker.poll() is None  # still running while the tracker is down
        proc = start_tracker(data, port)
        rc = worker.wait(timeout=120)
        stderr = worker.stderr.read()
        assert rc == 0, stderr
        c = counts(url, "p")
        assert c["done"] == total and c["failed"] == 0, (c, stderr)
        assert "retrying in" in stderr and "Traceback" not in stderr
        lines = httpx.get(f"{url}/v1/jobs/p/results").text.splitlines()
        assert len(lines) == total
    finally:
        stop(proc)


def test_unusable_command_is_one_line_and_failures_are_counted(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_tracker(tmp_path / "d", port)
    try:
        ocf("jobs", "project", "p", "--stage", "only", "--max-attempts", "1", url=url, data_dir=tmp_path / "d")
        ocf("jobs", "create", "p", "--range", "0:3", url=url, data_dir=tmp_path / "d")
        r = ocf("worker", "--project", "p", "--stage", "only", "--", "/nonexistent/cmd", url=url)
        assert (
            r.returncode == 127 and r.stderr.count("\n") <= 2 and "command not found: /nonexistent/cmd" in r.stderr
        ), r.stderr
        assert counts(url, "p")["pending"] == 3  # refused before registering or leasing anything
        started = time.monotonic()
        r = ocf(
            "worker",
            "--project",
            "p",
            "--stage",
            "only",
            "--until-empty",
            "--max-backoff",
            "0.4",
            "--",
            sys.executable,
            "-c",
            "import sys; sys.stderr.write('disk full\\n'); sys.exit(3)",
            url=url,
        )
        assert r.returncode == 0, r.stderr
        assert "completed 0 jobs, 3 failed" in r.stderr and "exited with code 3: disk full" in r.stderr, r.stderr
        # Paced: two pauses between three failing runs (jittered 0.5 s capped at 0.4 s), not 70 ms for all.
        assert time.monotonic() - started >= 0.6
        failures = httpx.get(f"{url}/v1/jobs/p/failures").json()["failures"]
        assert len(failures) == 3 and all("exited with code 3: disk full" in f["error"] for f in failures)
    finally:
        stop(proc)


def test_readme_example_workers_run_the_three_stages(tmp_path):
    """The README's walkthrough, with the example workers it names (examples/workers/)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_tracker(tmp_path / "d", port)
    try:
        r = ocf(
            "jobs",
            "project",
            "laion-crawl",
            "--stage",
            "crawl:600",
            "--stage",
            "embed:1800",
            "--stage",
            "filter",
            url=url,
            data_dir=tmp_path / "d",
        )
        assert r.returncode == 0, r.stderr
        r = ocf(
            "jobs", "create", "laion-crawl", "--pattern", "shard-{00000..00004}.tar", url=url, data_dir=tmp_path / "d"
        )
        assert r.returncode == 0 and "created 5 jobs" in r.stdout, r.stderr
        for stage in ("crawl", "embed", "filter"):
            script = os.path.join(root, "examples", "workers", f"{stage}.py")
            r = ocf(
                "worker",
                "--project",
                "laion-crawl",
                "--stage",
                stage,
                "--nickname",
                "alice",
                "--output",
                "json",
                "--until-empty",
                "--",
                sys.executable,
                script,
                url=url,
            )
            assert r.returncode == 0 and "completed 5 jobs, 0 failed" in r.stderr, r.stderr
        lines = [json.loads(line) for line in httpx.get(f"{url}/v1/jobs/laion-crawl/results").text.splitlines()]
        assert sorted(line["output"]["shard"] for line in lines) == [f"shard-{i:05d}.tar" for i in range(5)]
        assert all(len(line["output"]["kept"]) + line["output"]["dropped"] == 3 for line in lines)
    finally:
        stop(proc)
