"""The dispatcher keeps its ``/libp2p-http`` streams to a worker between requests, and survives one dying idle."""

from __future__ import annotations

import pytest
import trio

from ..gateway.util import running_mock_llm
from .test_gateway_p2p import pair


async def test_idle_peer_stream_is_reused_and_a_dead_one_costs_one_fresh_stream(
    node_config, monkeypatch: pytest.MonkeyPatch
):
    async with running_mock_llm(["m1"]) as mock, pair(node_config, mock) as (dispatcher, worker, client):
        fwd = dispatcher.gateway.app.extensions["ocf.forwarder"]
        key = str(worker.peer_id)
        opened = []
        open_stream = fwd.providers.open_stream

        async def counting(peer: str):  # type: ignore[no-untyped-def]
            opened.append(peer)
            return await open_stream(peer)

        monkeypatch.setattr(fwd.providers, "open_stream", counting)
        for _ in range(3):
            r = await client.get(f"/v1/p2p/{key}/v1/health")
            assert r.status_code == 200
        assert len(opened) == 1  # one stream carried all three requests
        assert fwd.peer_streams.idle(key) == 1

        # The idle stream dies in a way the pool cannot see before using it: the request still
        # succeeds, on exactly one fresh stream.
        conn = fwd.peer_streams.take(key)
        conn.stream.reset()
        monkeypatch.setattr(fwd.peer_streams, "_fits", lambda c: True)
        fwd.peer_streams.put(key, conn)
        r = await client.get(f"/v1/p2p/{key}/v1/health")
        assert r.status_code == 200 and r.json()["peer_id"] == key
        assert len(opened) == 2
        assert fwd.peer_streams.idle(key) == 1


async def test_the_routing_snapshot_keeps_only_what_routing_reads(node_config):
    """Every node's gateway keeps a table snapshot: routing fields only (a whole entry is ~2.5 KB a peer)."""
    from ocf.gateway.providers import ROUTING_FIELDS

    async with running_mock_llm(["m1"]) as mock, pair(node_config, mock) as (dispatcher, worker, _):
        fwd = dispatcher.gateway.app.extensions["ocf.forwarder"]
        with trio.fail_after(30):  # the worker's service reaches the dispatcher's table
            while not (dispatcher.table.entry(worker.peer_id) or {}).get("service"):
                await dispatcher.table.wait_changed()
        snapshot = fwd.providers.entries()  # the table changed: a fresh snapshot
        assert snapshot[str(worker.peer_id)]["service"][0]["name"] == "llm"
        assert all(set(entry) <= set(ROUTING_FIELDS) for entry in snapshot.values())
        assert "hardware" in dispatcher.table.entry(worker.peer_id)  # the whole entry is still served
