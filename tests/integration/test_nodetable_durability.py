"""Bounded document size under a compressed clock, and kill -9 durability."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import trio

from ocf import open_node
from ocf.transport import MemoryNetwork
from tests.conftest import free_port

FULL = os.environ.get("OCF_TEST_FULL") == "1"


@pytest.mark.slow
async def test_liveness_does_not_grow_documents(node_config, autojump_clock):
    """A simulated day (a week with OCF_TEST_FULL=1) of verification rounds leaves the saved table unchanged in size."""
    days = 7 if FULL else 1
    net = MemoryNetwork()
    # The heartbeat scheme (--no-membership) is the one that could write liveness into documents;
    # with membership, liveness never reaches the table's documents at all (tests/integration/
    # test_membership_nodes.py), and a simulated day of 0.5 s probes would only measure the simulator.
    async with (
        open_node(node_config(mode="standalone", verify_interval=300.0, membership=False), memory_network=net) as hub,
        trio.open_nursery() as nursery,  # the workers run beside the hub, stopped before it
    ):
        workers = []
        for _ in range(4):
            cfg = node_config(
                mode="node", bootstrap_addrs=(str(hub.listen_addrs[0]),), verify_interval=300.0, membership=False
            )
            workers.append(await nursery.start(_run_worker, cfg, net))
        while len(hub.table.records) < 5:
            await hub.table.wait_changed()
        before = hub.table.summary_stats()["doc_bytes"]
        await trio.sleep(days * 24 * 3600)
        stats = hub.table.summary_stats()
        assert stats["doc_bytes"] == before  # liveness never touched a document
        assert all(hub.table.entry(w)["connected"] for w in workers)
        assert hub.table.entry(workers[0])["last_seen"] >= days * 24 * 3600 - 600
        nursery.cancel_scope.cancel()


async def _run_worker(cfg, net, task_status=trio.TASK_STATUS_IGNORED):
    async with open_node(cfg, memory_network=net) as node:
        await node.bootstrap.wait_connected()
        task_status.started(node.peer_id)
        await trio.sleep_forever()


def test_kill_9_during_writes_leaves_a_loadable_table(tmp_path):
    """Kill a node with SIGKILL while it rewrites its entry in a loop; every restart loads cleanly."""
    data = tmp_path / "d"
    rounds = 5
    for i in range(rounds):
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ocf",
                "start",
                "--mode",
                "standalone",
                "--data-dir",
                str(data),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--tcpport",
                "0",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                while True:
                    assert proc.poll() is None, proc.stderr.read()
                    try:
                        entry = client.get("/v1/health").json()
                        break
                    except httpx.HTTPError:
                        assert time.monotonic() < deadline
                        time.sleep(0.05)  # polling a subprocess over HTTP: no event to wait on
                table = client.get("/v1/dnt/table").json()
                assert f"/{entry['peer_id']}" in table  # the previous kill left a loadable table
                if i:
                    assert table[f"/{entry['peer_id']}"]["owner"].startswith("round-")
                admin = {"X-OCF-Admin-Token": (data / "admin.token").read_text().strip()}  # written on the first start
                for j in range(30):
                    client.post("/v1/dnt/_node", json={"owner": f"round-{i}-{j}"}, headers=admin)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
