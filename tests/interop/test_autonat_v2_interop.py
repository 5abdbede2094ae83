"""AutoNAT v2 against js-libp2p (@libp2p/autonat-v2), both ways.

Both sides test only public addresses, so the peers live on the segment of
public-looking addresses of tests/interop/netns.py (js on 11.1.0.1, ocf on
11.1.0.2). On that segment a connection's source is the address it was made
to, so each server sees the client at its own IP, not at the address to test:
every request costs the dial-data toll, which is what is exercised here.

- ocf asks js: ocf (``--reachability auto``) picks v2 because js lists it, pays
  the toll, answers js's dial-back nonce, and calls its address public; it shows
  in the node's status as v1's verdict does;
- js asks ocf: js tests its unconfirmed listen address with our server, pays
  our toll, we dial back with its nonce, and js then announces the address.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from ocf import open_node
from ocf.config import Config
from ocf.identity import PeerId
from tests.interop.jspeer import open_js_peer
from tests.interop.netns import Segment, case_main, free_tcp_addr, run_in_segment
from tests.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

WAIT = 30.0


def test_ocf_asks_a_js_server() -> None:
    run_in_segment(__name__, "ocf_asks_js", hosts=2)


def test_js_asks_an_ocf_server() -> None:
    run_in_segment(__name__, "js_asks_ocf", hosts=2)


def ocf_config(node_config: Callable[..., Config], ip: str, **kw: object) -> Config:
    return node_config(host=ip, ws=False, quic=False, **kw)


async def ocf_asks_js(node_config: Callable[..., Config], segment: Segment) -> None:
    js_ip, our_ip = segment.ips
    js_addr = free_tcp_addr(js_ip)
    async with (
        open_js_peer(listen=[js_addr], autonat_v2=True) as js,
        open_node(ocf_config(node_config, our_ip, reachability="auto")) as a,
    ):
        assert a.nat.autonat is not None and a.nat.autonat.v2 is not None
        v2 = a.nat.autonat.v2
        await a.host.connect(f"{js_addr}/p2p/{js.peer_id}")
        with trio.fail_after(WAIT):
            await wait_until(lambda: a.nat.reachability == "public")
        ours = str(next(x for x in a.nat.autonat.v2_addrs() if our_ip in str(x)))
        assert v2.addr_results == {ours: "public"}
        assert v2.stats["dial_data_paid"] >= 1
        status = a.nat.status()
        assert status["reachability"] == "public"
        assert status["autonat"]["v2"]["addrs"] == {ours: "public"}  # type: ignore[index]
        assert PeerId.from_string(js.peer_id) in a.nat.autonat.results


async def js_asks_ocf(node_config: Callable[..., Config], segment: Segment) -> None:
    js_ip, our_ip = segment.ips
    async with (
        open_node(ocf_config(node_config, our_ip, reachability="public")) as a,
        open_js_peer(listen=[f"/ip4/{js_ip}/tcp/0"], autonat_v2=True) as js,
    ):
        assert a.nat.autonat is not None and a.nat.autonat.v2 is not None
        v2 = a.nat.autonat.v2
        before = [x for x in (await js.request("addrs"))["addrs"] if js_ip in x]
        assert before == []  # js does not announce an unconfirmed public address
        tcp = next(str(x) for x in a.host.listen_addrs if x.has("tcp"))
        await js.request("dial", addr=tcp)
        with trio.fail_after(WAIT):
            await wait_until(lambda: v2.stats["dial_back_ok"])
        assert v2.stats["dial_data_asked"] >= 1
        with trio.fail_after(WAIT):  # js confirms once it read our answer (another process: poll it)
            while not [x for x in (await js.request("addrs"))["addrs"] if js_ip in x]:  # noqa: ASYNC110
                await trio.sleep(0.1)  # state in another process: no event to wait on


if __name__ == "__main__":
    case_main(globals())
