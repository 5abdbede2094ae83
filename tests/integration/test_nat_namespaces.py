"""Real NAT: a public relay and two ocf nodes behind separate NATs, in network namespaces (see natlab).

The nodes learn by AutoNAT that they are not reachable, reserve slots on the
relay by themselves, reach each other through it, upgrade to a direct
connection by hole punching (DCUtR: a TCP simultaneous open through both
NATs, or, in the ``quic`` run, a QUIC dial let in by UDP punch datagrams),
and an OpenAI request made on one node is answered by a model served behind
the other NAT.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .natlab import RELAY_IP, ROOT, Lab, LabUnavailable, nat_lab

pytestmark = pytest.mark.timeout(240)

TCP, HTTP, LLM = 43905, 8092, 8080


def wait_for(what: str, probe: Callable[[], Any], timeout: float, logs: Path) -> Any:
    """Poll ``probe`` (an HTTP query into a namespace: there is no event to wait on across processes)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*.log")))
    raise AssertionError(f"timed out waiting for {what}; last={last!r}\n{tails}")


def start_node(lab: Lab, role: str, tmp: Path, *extra: str) -> None:
    argv = [sys.executable, "-m", "ocf", "start", "--host", "0.0.0.0", "--tcpport", str(TCP), "--port", str(HTTP)]
    if lab.punch == "tcp":
        argv.append("--no-quic")
    argv += ["--data-dir", str(tmp / role), "--log-level", "debug", *extra]
    lab.spawn(role, argv, tmp / f"{role}.log")


@pytest.mark.parametrize("punch", ["tcp", "quic"])
def test_two_nodes_behind_nat_reach_each_other_then_punch_through(tmp_path, punch):
    """``tcp``: the nodes run without QUIC; ``quic``: the NATs pass TCP to the relay only."""
    try:
        with nat_lab(punch) as lab:
            run(lab, tmp_path)
    except LabUnavailable as exc:
        pytest.fail(f"the NAT lab could not be built: {exc}")


def run(lab: Lab, tmp: Path) -> None:
    gw = f"http://127.0.0.1:{HTTP}"
    start_node(lab, "R", tmp, "--mode", "standalone", "--relay", "--reachability", "public", "--public-addr", RELAY_IP)
    health = wait_for("the relay", lambda: _json(lab, "R", f"{gw}/v1/health"), 30, tmp)
    boot = f"/ip4/{RELAY_IP}/tcp/{TCP}/p2p/{health['peer_id']}"
    mock = [sys.executable, str(ROOT / "examples" / "mock_llm.py"), "--port", str(LLM), "--model", "natm"]
    lab.spawn("B", mock, tmp / "llm.log")
    start_node(lab, "A", tmp, "--mode", "node", "--bootstrap.addr", boot)
    start_node(
        lab, "B", tmp, "--mode", "node", "--bootstrap.addr", boot, "--service.name", "llm", "--service.port", str(LLM)
    )
    # AutoNAT: the relay's dial-back to each NAT's address is dropped, so both learn they are private,
    # reserve on the relay by themselves and publish /p2p-circuit addresses.
    ids = {}
    for role in ("A", "B"):

        def reserved(role: str = role) -> Any:
            status = _json(lab, role, f"{gw}/v1/dnt/peers_status")
            nat = status and status["nat"]
            return nat if nat and nat["reachability"] == "private" and nat["relay_addrs"] else None

        nat = wait_for(f"{role} to learn it is private and reserve", reserved, 60, tmp)
        assert all(f"/p2p/{health['peer_id']}/p2p-circuit" in a for a in nat["relay_addrs"])
        ids[role] = _json(lab, role, f"{gw}/v1/health")["peer_id"]
        assert _json(lab, role, f"{gw}/v1/health")["reachability"] == "private"

    # A reaches B through the relay. A dials the addresses of B's entry in its node table: wait for
    # the version that lists B's circuit address (an earlier one, from before B reserved, may come first)
    # through the relay's lab address: those through its loopback are listed too, and A does not dial them.
    def circuit_listed() -> bool:
        entry = (_json(lab, "A", f"{gw}/v1/dnt/table") or {}).get(f"/{ids['B']}") or {}
        return any(
            str(a).startswith(f"/ip4/{RELAY_IP}/") and "/p2p-circuit" in str(a) for a in entry.get("addrs") or []
        )

    wait_for("B's circuit address in A's node table", circuit_listed, 30, tmp)
    status, body = lab.http("A", "GET", f"{gw}/v1/p2p/{ids['B']}/v1/health")
    assert status == 200 and body["peer_id"] == ids["B"], body
    relay = _json(lab, "R", f"{gw}/v1/dnt/peers_status")["nat"]["relay"]
    assert relay["circuits_opened"] >= 1 and relay["reservations"] == 2

    # DCUtR: B (the relayed connection's inbound side) punches through both NATs; the relay is let go
    def direct() -> bool:
        peers = _json(lab, "A", f"{gw}/v1/dnt/peers") or {"peers": []}
        return any(p["ID"] == ids["B"] and not p["Relayed"] for p in peers["peers"])

    wait_for("a direct connection between A and B", direct, 60, tmp)
    punch = _json(lab, "B", f"{gw}/v1/dnt/peers_status")["nat"]["holepunch"]
    assert punch["succeeded"] >= 1, punch
    if lab.punch == "quic":
        assert punch["succeeded_quic"] >= 1, punch
    # An OpenAI request on A is served by the model behind B's NAT, over the direct connection: a prompt
    # of 20 KB each way would add over 40 KB to what the relay carried; node-table heartbeats on the
    # retiring relayed connection stay far below that.
    relayed_before = _json(lab, "R", f"{gw}/v1/dnt/peers_status")["nat"]["relay"]["bytes_relayed"]
    prompt = "through two NATs " + "x" * 20_000
    request = {"model": "natm", "messages": [{"role": "user", "content": prompt}]}
    status, body = lab.http("A", "POST", f"{gw}/v1/service/llm/v1/chat/completions", request)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == f"[natm] you said: {prompt}"
    relayed_after = _json(lab, "R", f"{gw}/v1/dnt/peers_status")["nat"]["relay"]["bytes_relayed"]
    assert relayed_after - relayed_before < 8_000, (relayed_before, relayed_after)


def _json(lab: Lab, role: str, url: str) -> Any:
    try:
        status, body = lab.http(role, "GET", url, timeout=5)
    except Exception:  # noqa: BLE001 - not up yet
        return None
    return body if status == 200 and isinstance(body, dict) else None
