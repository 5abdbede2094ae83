import subprocess
import sys

import pytest

from ocf.cli import main
from ocf.config import SETTINGS
from ocf.version import __version__


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ocf", *args], capture_output=True, text=True, timeout=60, env=env)


def test_help_lists_every_flag():
    out = run_cli("start", "--help")
    assert out.returncode == 0
    for s in SETTINGS:
        assert f"--{s.flag}" in out.stdout
    assert "--config" in out.stdout
    assert "QUIC is not implemented yet" in out.stdout.replace("\n", " ").replace("  ", " ") or "QUIC" in out.stdout


def test_top_level_help_and_version(capsys):
    assert main(["version"]) == 0
    assert __version__ in capsys.readouterr().out
    out = run_cli("--help")
    assert out.returncode == 0 and "start" in out.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["start", "--tcpport", "abc"], "--tcpport"),
        (["start", "--mode", "wrong"], "--mode"),
        (["start", "--bogus"], "--bogus"),
        (["start", "--service.name", "llm"], "--service.name"),
    ],
)
def test_bad_values_exit_2_with_one_line(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]


def test_no_command_is_usage_error():
    out = run_cli()
    assert out.returncode == 2
