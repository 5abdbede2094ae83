"""DCUtR against js-libp2p (@libp2p/dcutr), both ways, through an ocf relay.

js-libp2p punches only toward public addresses, so the three peers live on a
segment of public-looking addresses in a network namespace (tests/interop/netns.py):
the relay on 11.1.0.1, the js peer on 11.1.0.2, the ocf node on 11.1.0.3.
Whichever side dialed through the relay (DCUtR's A) refuses new inbound
connections, so the inbound side's (B's) "unilateral" direct dial fails and
the upgrade has to come from the DCUtR exchange:

- js initiates: ocf dials js through the relay; js (B) sends CONNECT, ocf (A)
  answers, js sends SYNC, ocf dials js's address from its punch port;
- ocf initiates: js dials ocf through the relay; ocf (B) sends CONNECT with
  its listen address, js (A) answers and, on SYNC, dials it.

Each ends with a direct (non-relayed) connection on both sides, and ocf's
counters show the exchange (not a unilateral dial) did it.

Each case runs in a child process inside the namespace (``python -m
tests.interop.test_dcutr_interop <case> <namespace>``), so that nothing of the
test process itself (Trio's worker threads) ends up in it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from ocf import open_node
from ocf.config import Config
from ocf.identity import Multiaddr, PeerId
from tests.interop.jspeer import JsPeer, open_js_peer
from tests.interop.netns import Segment, case_main, free_tcp_addr, run_in_segment
from tests.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

WAIT = 30.0


def run_case(case: str) -> None:
    run_in_segment(__name__, case)


def test_js_initiates_the_hole_punch() -> None:
    run_case("js_initiates")


def test_ocf_initiates_the_hole_punch() -> None:
    run_case("ocf_initiates")


def ocf_config(node_config, ip: str, **kw):
    # TCP only: a WebSocket or QUIC listener would let the unilateral dial through the firewall
    return node_config(host=ip, ws=False, quic=False, reachability="public", **kw)


def js_listen(ip: str) -> dict[str, list[str]]:
    """A free port on ``ip`` for the js peer, listened on and announced (js announces an unverified
    public address only after AutoNAT confirmed it, and there is no AutoNAT server here)."""
    addr = free_tcp_addr(ip)
    return {"listen": [addr], "announce": [addr]}


def tcp_addr(node) -> Multiaddr:
    return next(a for a in node.listen_addrs if a.has("tcp") and not a.has("p2p-circuit"))


async def wait_direct(node, peer: PeerId) -> None:
    """Until ``node`` has a direct connection to ``peer`` and counted the punch that made it."""
    punch = node.nat.holepunch
    with trio.move_on_after(WAIT):
        while not any(c.usable and not c.relayed for c in node.host.connections(peer)):
            await node.host.wait_changed()
        await wait_until(lambda: punch.stats["succeeded"] + punch.stats["unilateral"])
        return
    raise AssertionError(f"no direct connection to {peer}: dcutr {punch.stats}, refused {punch.refused}")


async def js_direct_to(js: JsPeer, peer: PeerId) -> list[dict]:
    conns = (await js.request("connections", peer=str(peer)))["connections"]
    return [c for c in conns if "/p2p-circuit" not in c["addr"]]


async def js_initiates(node_config: Callable[..., Config], segment: Segment) -> None:
    relay_ip, js_ip, our_ip = segment.ips
    async with open_node(ocf_config(node_config, relay_ip, relay=True)) as r:
        circuit = f"{tcp_addr(r)}/p2p-circuit"
        async with (
            open_js_peer(relay_listen=circuit, **js_listen(js_ip)) as js,
            open_node(ocf_config(node_config, our_ip)) as a,
        ):
            peer = PeerId.from_string(js.peer_id)
            with trio.fail_after(WAIT):
                while not r.nat.service.has_reservation(peer):
                    await r.host.wait_changed()
            segment.refuse_new(our_ip, int(tcp_addr(a).host_port()[1]))
            await a.host.connect(Multiaddr.parse(f"{circuit}/p2p/{js.peer_id}"))
            assert a.host.is_relayed(peer)
            await wait_direct(a, peer)
            assert a.nat.holepunch.stats["succeeded"] >= 1
            direct = await js_direct_to(js, a.peer_id)
            assert direct and all(not c["limited"] for c in direct)


async def ocf_initiates(node_config: Callable[..., Config], segment: Segment) -> None:
    relay_ip, js_ip, our_ip = segment.ips
    async with (
        open_node(ocf_config(node_config, relay_ip, relay=True)) as r,
        open_node(ocf_config(node_config, our_ip)) as b,
        open_js_peer(**js_listen(js_ip)) as js,
    ):
        peer = PeerId.from_string(js.peer_id)
        await b.host.connect(tcp_addr(r))
        held = await b.nat.client.reserve(r.peer_id)
        js_port = int(Multiaddr.parse(js.addr("tcp")).host_port()[1])
        segment.refuse_new(js_ip, js_port)
        await js.request("dial", addr=str(held.addrs[0]))
        await wait_direct(b, peer)
        assert b.nat.holepunch.stats["succeeded"] >= 1 and b.nat.holepunch.stats["unilateral"] == 0
        assert await js_direct_to(js, b.peer_id)


if __name__ == "__main__":
    case_main(globals())
