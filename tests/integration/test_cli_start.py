"""`python -m ocf start` as a real subprocess: healthy, then SIGTERM exits 0 within 5 s."""

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import free_port


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            return httpx.get(url, timeout=1).json()
        except httpx.HTTPError:
            time.sleep(0.05)  # polling a subprocess over HTTP: there is no event to wait on
    raise AssertionError("node did not become healthy")


def _start(tmp_path, *extra):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "ocf",
        "start",
        "--mode",
        "standalone",
        "--data-dir",
        str(tmp_path / "d"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tcpport",
        "0",
        *extra,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


def test_start_health_sigterm(tmp_path):
    proc, base = _start(tmp_path)
    try:
        health = _wait_healthy(base + "/v1/health", proc)
        assert health["status"] == "ok" and health["peer_id"].startswith("12D3KooW")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        err = proc.stderr.read()
        assert "node started" in err and health["peer_id"] in err
        assert "shutdown requested signal=SIGTERM" in err and "node stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_and_same_identity_on_restart(tmp_path):
    proc, base = _start(tmp_path)
    try:
        first = _wait_healthy(base + "/v1/health", proc)["peer_id"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    proc, base = _start(tmp_path)
    try:
        assert _wait_healthy(base + "/v1/health", proc)["peer_id"] == first
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_second_node_on_same_data_dir_fails_clearly(tmp_path):
    proc, base = _start(tmp_path)
    try:
        _wait_healthy(base + "/v1/health", proc)
        other, _ = _start(tmp_path)
        out, err = other.communicate(timeout=30)
        assert other.returncode == 1
        assert "in use by another ocf node" in err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
