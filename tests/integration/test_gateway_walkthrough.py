"""The README walkthrough, run as written (separate processes, the real CLI, the openai package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_readme_walkthrough_works():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "walkthrough.py"), "--free-ports"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "walkthrough OK" in result.stdout
