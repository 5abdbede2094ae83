"""The tracker as users run it: ``ocf start --jobs`` as a process, driven by ``ocf jobs`` and ``ocf worker``,
and killed with SIGKILL in the middle of a run of many workers.
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
import trio

from tests.conftest import free_port

pytestmark = pytest.mark.timeout(240)


def start_tracker(data_dir, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "ocf",
        "start",
        "--mode",
        "standalone",
        "--jobs",
        "--data-dir",
        str(data_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tcpport",
        "0",
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            time.sleep(0.05)  # a subprocess over HTTP: there is no event to wait on
    proc.kill()
    raise AssertionError("tracker did not become healthy")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(timeout=15)


def ocf(*args: str, url: str, stdin: str | None = None, data_dir=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OCF_TRACKER_URL=url)
    if data_dir is not None:  # where `ocf jobs` finds the tracker's admin token, as a user's ~/.ocf
        env["OCF_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "ocf", *args], input=stdin, capture_output=True, text=True, timeout=120, env=env
    )


def test_cli_project_create_worker_results(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_tracker(tmp_path / "d", port)
    try:
        r = ocf(
            "jobs", "project", "shards", "--stage", "fetch:60", "--stage", "count:60", url=url, data_dir=tmp_path / "d"
        )
        assert r.returncode == 0 and "project shards created" in r.stdout, r.stderr
        r = ocf(
            "jobs",
            "create",
            "shards",
            "--pattern",
            "shard-{000..039}.tar",
            "--batch",
            "16",
            url=url,
            data_dir=tmp_path / "d",
        )
        assert r.returncode == 0 and "created 40 jobs" in r.stdout, r.stderr
        # stage 1: output the input's length as JSON; stage 2: double it (reads JSON from stdin)
        r = ocf(
            "worker",
            "--project",
            "shards",
            "--stage",
            "fetch",
            "--nickname",
            "alice",
            "--batch",
            "8",
            "--until-empty",
            "--output",
            "json",
            "--",
            sys.executable,
            "-c",
            "import sys; print(len(sys.stdin.read()))",
            url=url,
            data_dir=tmp_path / "d",
        )
        assert r.returncode == 0 and "completed 40 jobs" in r.stderr, r.stderr
        r = ocf(
            "worker",
            "--project",
            "shards",
            "--stage",
            "count",
            "--nickname",
            "bob",
            "--until-empty",
            "--output",
            "json",
            "--",
            sys.executable,
            "-c",
            "import sys, json, os; "
            "print(json.dumps({'n': int(sys.stdin.read()) * 2, 'job': os.environ['OCF_JOB_ID']}))",
            url=url,
            data_dir=tmp_path / "d",
        )
        assert r.returncode == 0, r.stderr
        out = tmp_path / "results.jsonl"
        r = ocf("jobs", "results", "shards", "-o", str(out), url=url, data_dir=tmp_path / "d")
        assert r.returncode == 0, r.stderr
        results = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(results) == 40 and {res["output"]["n"] for res in results} == {len("shard-000.tar") * 2}
        r = ocf("jobs", "status", "shards", url=url, data_dir=tmp_path / "d")
        assert r.returncode == 0 and "100.00% complete" in r.stdout, r.stdout
        r = ocf("jobs", "leaderboard", "shards", url=url, data_dir=tmp_path / "d")
        assert "alice" in r.stdout and "bob" in r.stdout
        # errors: one line, non-zero
        r = ocf("jobs", "status", "nope", url=url, data_dir=tmp_path / "d")
        assert r.returncode == 1 and "project 'nope' not found" in r.stderr and r.stderr.count("\n") == 1
        r = ocf("jobs", "create", "shards", "--range", "1-2", url=url, data_dir=tmp_path / "d")
        assert r.returncode == 2 and "range" in r.stderr
        r = ocf(
            "worker",
            "--project",
            "shards",
            "--stage",
            "fetch",
            "--until-empty",
            "--",
            "false",
            url=url,
            data_dir=tmp_path / "d",
        )
        assert r.returncode == 0  # nothing pending: exits cleanly
        r = ocf("jobs", "list", url="http://127.0.0.1:1")
        assert r.returncode == 1 and "cannot reach the tracker" in r.stderr
    finally:
        stop(proc)


def test_failing_command_fails_the_job_with_its_stderr(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_tracker(tmp_path / "d", port)
    try:
        ocf("jobs", "project", "p", "--stage", "only", "--max-attempts", "1", url=url, data_dir=tmp_path / "d")
        ocf("jobs", "create", "p", "--range", "0:2", url=url, data_dir=tmp_path / "d")
        r = ocf(
            "worker",
            "--project",
            "p",
            "--stage",
            "only",
            "--until-empty",
            "--",
            sys.executable,
            "-c",
            "import sys; sys.exit('boom: ' + sys.stdin.read())",
            url=url,
            data_dir=tmp_path / "d",
        )
        assert r.returncode == 0, r.stderr
        failures = httpx.get(f"{url}/v1/jobs/p/failures").json()["failures"]
        assert len(failures) == 2 and all("boom" in f["error"] for f in failures)
    finally:
        stop(proc)


async def test_kill_9_mid_run_loses_and_duplicates_nothing(tmp_path):
    """Workers keep going while the tracker is SIGKILLed and restarted; every job ends in results exactly once."""
    jobs = int(os.environ.get("OCF_TEST_KILL_JOBS", "600"))
    kills = 3
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/jobs/crash"
    data = tmp_path / "d"
    proc = start_tracker(data, port)
    up = trio.Event()  # replaced by an unset one just before each kill, set once the tracker is back
    up.set()
    admin = {"X-OCF-Admin-Token": (data / "admin.token").read_text().strip()}
    async with httpx.AsyncClient(timeout=10) as http:
        await http.put(
            url,
            headers=admin,
            json={
                "stages": [{"name": "one", "lease_timeout": 30}, {"name": "two", "lease_timeout": 30}],
                "max_attempts": 50,
            },
        )
        # Leases outlive a restart (a loaded machine takes seconds to start the tracker again): a lease
        # that expired meanwhile would rightly refuse its late completion, which is another test's subject.
        await http.post(url + "/jobs", headers=admin, json=list(range(jobs)))

        async def call(method: str, path: str, token: str | None = None, body=None) -> httpx.Response:
            """Retry across the tracker's death: the same request again once it is back."""
            while True:
                try:
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    return await http.request(method, url + path, json=body, headers=headers)
                except httpx.TransportError:
                    await up.wait()

        async def worker(i: int) -> None:
            stage = "one" if i % 2 else "two"
            token = (await call("POST", "/workers", body={"nickname": f"w{i}", "stage": stage})).json()["token"]
            while True:
                claimed = (await call("POST", "/claim", token, {"max": 5, "wait": 0.5})).json()["jobs"]
                if not claimed:
                    stats = (await call("GET", "/stats")).json()
                    if stats["results"] >= jobs and all(s["pending"] == s["leased"] == 0 for s in stats["stages"]):
                        return
                    continue
                r = await call(
                    "POST", "/complete", token, {"results": [{"id": j["id"], "output": j["input"]} for j in claimed]}
                )
                assert r.status_code == 200, r.text
                assert all(x["status"] in ("done", "already_done") for x in r.json()["results"]), r.text

        async def killer() -> None:
            nonlocal proc, up
            for n in range(kills):
                target = jobs * (n + 1) // (kills + 2)
                while (await call("GET", "/stats")).json()["results"] < target:  # noqa: ASYNC110
                    await trio.sleep(0.05)  # the tracker is another process: its stats are the only signal
                up = trio.Event()
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc = await trio.to_thread.run_sync(start_tracker, data, port)
                up.set()

        try:
            with trio.fail_after(180):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(killer)
                    for i in range(20):
                        nursery.start_soon(worker, i)
            lines = (await http.get(url + "/results")).text.splitlines()
            results = [json.loads(line) for line in lines]
            assert len(results) == jobs
            assert sorted(r["output"] for r in results) == list(range(jobs))
            stats = (await http.get(url + "/stats")).json()
            assert [s["done"] for s in stats["stages"]] == [jobs, jobs]
            board = (await http.get(url + "/leaderboard?limit=100")).json()
            assert sum(row["total"] for row in board["users"]) == 2 * jobs
        except BaseException:
            print("stats at failure:", (await http.get(url + "/stats")).text if proc.poll() is None else "tracker down")
            raise
        finally:
            stop(proc)
