"""Whole nodes talking over the transport: bootstrap over TCP, in-memory networks, ``ocf ping``."""

from __future__ import annotations

import logging
import os
import sys

import trio

from ocf.node import open_node
from ocf.transport import MemoryNetwork


async def test_two_nodes_bootstrap_over_tcp(node_config, caplog):
    caplog.set_level(logging.INFO, logger="ocf")
    async with open_node(node_config(mode="standalone")) as seed:
        tcp = [a for a in seed.listen_addrs if not a.has("ws")]
        assert tcp and tcp[0].peer_id == seed.peer_id and tcp[0].value_for("tcp") != "0"
        assert any(a.has("ws") for a in seed.listen_addrs)
        async with seed.host.subscribe() as events:
            async with open_node(node_config(mode="node", bootstrap_addrs=(str(tcp[0]),))) as worker:
                ev = await events.receive()
                assert (ev.kind, ev.peer) == ("connected", worker.peer_id)
                assert await worker.bootstrap.wait_connected() == seed.peer_id
                assert worker.host.is_connected(seed.peer_id)
                rtt = await worker.host.ping(seed.peer_id)
                assert rtt >= 0
            ev = await events.receive()
            assert (ev.kind, ev.peer) == ("disconnected", worker.peer_id)
    assert any(
        "connected to bootstrap peer" in r.getMessage() and seed.peer_id.short() in r.getMessage()
        for r in caplog.records
    )


async def test_star_of_nodes_on_memory_network(node_config):
    net = MemoryNetwork()
    async with open_node(node_config(mode="standalone"), memory_network=net) as seed:
        addr = str(seed.listen_addrs[0])
        assert addr.startswith("/memory/")
        async with trio.open_nursery() as nursery:
            workers = []

            async def run_worker(i: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
                async with open_node(node_config(mode="node", bootstrap_addrs=(addr,)), memory_network=net) as node:
                    workers.append(node)
                    task_status.started()
                    await trio.sleep_forever()

            async with seed.host.subscribe() as events:
                for i in range(4):
                    await nursery.start(run_worker, i)
                connected = set()
                while len(connected) < 4:
                    ev = await events.receive()
                    if ev.kind == "connected":
                        connected.add(ev.peer)
            assert connected == {w.peer_id for w in workers}
            # bootstrap connects workers to the seed only
            for w in workers:
                assert await w.bootstrap.wait_connected() == seed.peer_id
                assert w.host.connected_peers() == [seed.peer_id]
            # a worker can open a stream to another once it knows an address (e.g. from the node table)
            w0, w1 = workers[0], workers[1]
            w0.host.add_addrs(w1.peer_id, w1.listen_addrs)
            assert await w0.host.ping(w1.peer_id) >= 0
            nursery.cancel_scope.cancel()


def test_cli_ping_against_a_node(node_config, tmp_path):
    async def main() -> tuple[int, str, str]:
        async with open_node(node_config(mode="standalone")) as node:
            addr = next(a for a in node.listen_addrs if not a.has("ws"))
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            result = await trio.run_process(
                [sys.executable, "-m", "ocf", "ping", str(addr), "--count", "3", "--interval", "0.05"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
            bad = await trio.run_process(
                [sys.executable, "-m", "ocf", "ping", "/ip4/127.0.0.1/tcp/1", "--count", "1", "--timeout", "2"],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
            return result.returncode, result.stdout.decode(), bad.returncode, bad.stderr.decode()

    code, out, bad_code, bad_err = trio.run(main)
    assert code == 0, out
    assert out.count("bytes from") == 3
    assert "3 pings transmitted, 3 received, 0% loss" in out
    assert bad_code == 1
    assert bad_err.strip().splitlines()[-1].startswith("ocf ping: error:")
