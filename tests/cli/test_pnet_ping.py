"""``ocf ping --network-key``: reaches a private node with the key, names the cause without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from ocf.config import Config
from ocf.identity import Identity
from ocf.transport import open_host, pnet

SRC = str(Path(__file__).resolve().parents[2] / "src")


async def ping_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("OCF_NETWORK_KEY", None)
    return await trio.run_process(
        [sys.executable, "-m", "ocf", "ping", *args], capture_stdout=True, capture_stderr=True, check=False, env=env
    )


async def test_ping_private_node_with_right_wrong_and_bad_key(tmp_path):
    good, other, bad = tmp_path / "swarm.key", tmp_path / "other.key", tmp_path / "bad.key"
    good.write_bytes(pnet.format_swarm_key(bytes(range(32))))
    other.write_bytes(pnet.format_swarm_key(bytes(32)))
    bad.write_text("/key/swarm/psk/1.0.0/\n/base16/\nzz\n")
    config = Config(host="127.0.0.1", tcpport=0, ws=False, network_key=pnet.load_network_key(good))
    async with open_host(Identity.generate(), config) as host:
        addr = str(host.listen_addrs[0])
        with trio.fail_after(60):
            ok = await ping_cli(addr, "-c", "1", "--timeout", "10", "--network-key", str(good))
            wrong = await ping_cli(addr, "-c", "1", "--timeout", "10", "--network-key", str(other))
            unusable = await ping_cli(addr, "-c", "1", "--network-key", str(bad))
        assert ok.returncode == 0, ok.stderr
        assert b"1 received" in ok.stdout
        assert wrong.returncode == 1
        assert b"network key mismatch or peer is not in this private network" in wrong.stderr
        assert unusable.returncode == 2
        assert unusable.stderr.decode().strip().startswith("ocf ping: error: --network-key:")
        assert host.upgrader.protector.stats["refused"] >= 1
