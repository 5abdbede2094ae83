"""The co-located tracker benchmark still runs (small sizes); its numbers are read by people, never asserted."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_colocated_benchmark_runs_and_prints_a_table():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "jobs_colocated.py"), "--quick", "--rate", "200"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("measurement") and set(lines[1]) == {"-"} and len(lines) > 4
    assert "/v1/health latency" in out.stdout and "token gap" in out.stdout
