"""Dial policy: addresses a peer publishes are dialed only where it makes sense; the operator's always.

The figure throughout is the number of connections a target port received:
a refused learned address costs the target 0 connections.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os

import httpx
import pytest
import trio
import trio.testing

from ocf.config import Config, load
from ocf.errors import ConfigError, PeerUnreachable, TransportError
from ocf.identity import Identity, Multiaddr
from ocf.node import open_node
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.bootstrap import Bootstrapper
from ocf.transport.dialpolicy import DialPolicy, classify, parse_cidrs

from ._dial_hostile import STRANGER, closed_port, hostile_target


def cfg(**kw) -> Config:
    base = dict(host="127.0.0.1", tcpport=0, handshake_timeout=3.0, dial_timeout=3.0)
    base.update(kw)
    return Config(**base)


def ident(name: str) -> Identity:
    return Identity.from_seed(f"dialpolicy-{name}-{os.getpid()}")


# --- the pure decision ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip, category",
    [
        ("8.8.8.8", "public"),
        ("2606:4700::1", "public"),
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "reserved"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("2001:db8::1", "reserved"),
        # IPv4 inside IPv6 is judged by where it leads
        ("::ffff:127.0.0.1", "loopback"),
        ("64:ff9b::7f00:1", "loopback"),
        ("2002:7f00:1::1", "loopback"),
        ("2002:a00:1::1", "private"),
        ("64:ff9b::808:808", "public"),
    ],
)
def test_classify(ip, category):
    assert classify(ipaddress.ip_address(ip))[0] == category


def test_home_networks_and_allowlist():
    policy = DialPolicy()
    refused = ["127.0.0.1", "10.1.2.3", "192.168.1.5", "169.254.169.254", "224.0.0.1", "0.0.0.0", "::ffff:10.0.0.1"]
    assert all(policy.refusal_ip(ipaddress.ip_address(ip)) for ip in refused)
    assert policy.refusal_ip(ipaddress.ip_address("8.8.8.8")) is None
    policy.note_home("10.9.9.9")  # this node runs in 10/8: its peers there are dialed, other private blocks not
    assert policy.refusal_ip(ipaddress.ip_address("10.1.2.3")) is None
    assert policy.refusal_ip(ipaddress.ip_address("::ffff:10.1.2.3")) is None
    assert policy.refusal_ip(ipaddress.ip_address("192.168.1.5")) is not None
    assert policy.refusal_ip(ipaddress.ip_address("127.0.0.1")) is not None
    policy.note_home("224.0.0.1")  # never a home network
    assert policy.refusal_ip(ipaddress.ip_address("224.0.0.1")) is not None
    allowed = DialPolicy(allow=parse_cidrs(["192.168.1.0/24", "224.0.0.0/4"]))
    assert allowed.refusal_ip(ipaddress.ip_address("192.168.1.5")) is None
    assert allowed.refusal_ip(ipaddress.ip_address("192.168.2.5")) is not None
    assert allowed.refusal_ip(ipaddress.ip_address("224.0.0.1")) is None
    assert DialPolicy().refusal(Multiaddr.parse("/memory/x")) is None


def test_dial_allow_setting():
    assert load(env={"OCF_DIAL_ALLOW": "10.0.0.0/8, fd00::/8,192.168.1.7"}).dial_allow == (
        "10.0.0.0/8",
        "fd00::/8",
        "192.168.1.7/32",
    )
    assert load(flags={"max-addrs-per-peer": "3"}, env={}).max_addrs_per_peer == 3
    with pytest.raises(ConfigError, match="--dial-allow"):
        load(flags={"dial-allow": "10.0.0.0/33"}, env={})
    assert Config().dial_allow == () and Config().max_addrs_per_peer == 8


# --- a host with no loopback or private network of its own --------------------------------


async def test_learned_addresses_outside_the_nodes_networks_are_never_dialed():
    """A host on an in-memory network only: loopback, private, metadata, multicast peer addresses cost 0 connections."""
    async with (
        hostile_target(b"\x13/multistream/1.0.0\n") as target,
        open_host(ident("a"), cfg(), MemoryNetwork()) as host,
    ):
        learned = [
            target.addr(),
            target.addr(ws=True),
            Multiaddr.parse(f"/ip6/::ffff:127.0.0.1/tcp/{target.port}"),
            Multiaddr.parse(f"/ip4/0.0.0.0/tcp/{target.port}"),
            Multiaddr.parse("/ip4/10.0.0.1/tcp/22"),
            Multiaddr.parse("/ip4/169.254.169.254/tcp/80"),
            Multiaddr.parse("/ip4/224.0.0.1/tcp/43905"),
            Multiaddr.parse("/ip6/fe80::1/tcp/43905"),
        ]
        host.add_addrs(STRANGER, learned)
        assert host.peer_addrs(STRANGER) == []  # none kept
        with pytest.raises(PeerUnreachable):
            await host.new_stream(STRANGER, "/x/1.0.0")
        # a name is judged by what it resolves to, and the dial goes to the judged address
        host.add_addrs(STRANGER, [Multiaddr.parse(f"/dns4/localhost/tcp/{target.port}")])
        with pytest.raises(PeerUnreachable) as info:
            await host.new_stream(STRANGER, "/x/1.0.0")
        assert target.connections == 0
        assert "unreachable" in str(info.value)


async def test_operator_addresses_are_always_dialed():
    """``connect`` is the operator's (bootstrap, ``ocf ping``): loopback is dialed even by a host without loopback."""
    async with hostile_target("close") as target, open_host(ident("b"), cfg(), MemoryNetwork()) as host:
        with pytest.raises(TransportError):
            await host.connect(target.addr().with_p2p(STRANGER))
        assert target.connections == 1
        # remembered as the operator's: a redial by peer ID may use it
        with pytest.raises(TransportError):
            await host.new_stream(STRANGER, "/x/1.0.0")
        assert target.connections == 2


async def test_dial_allow_opens_a_network():
    async with (
        hostile_target("close") as target,
        open_host(ident("c"), cfg(dial_allow=("127.0.0.0/8",)), MemoryNetwork()) as host,
    ):
        host.add_addrs(STRANGER, [target.addr()])
        with pytest.raises(PeerUnreachable):
            await host.new_stream(STRANGER, "/x/1.0.0")
        assert target.connections == 1


# --- the "same network" rule ------------------------------------------------------------


async def test_a_node_listening_on_loopback_dials_loopback_peers():
    """The loopback test networks work because their nodes listen on loopback, not through a switch."""
    async with open_host(ident("d"), cfg()) as a, open_host(ident("e"), cfg()) as b:
        b.set_stream_handler("/echo/1.0.0", lambda s: s.send_all(b"hi"))
        a.add_addrs(b.peer_id, b.listen_addrs)
        assert a.peer_addrs(b.peer_id)
        stream = await a.new_stream(b.peer_id, "/echo/1.0.0")
        async with stream:
            assert await stream.receive_some() == b"hi"


async def test_a_wildcard_listener_is_not_in_the_loopback_network():
    """0.0.0.0 answers on loopback too; that must not let peers point an internet-facing node at its own ports."""
    async with hostile_target("close") as target, open_host(ident("f"), cfg(host="0.0.0.0")) as host:
        assert any(a.parts[0][1] == "127.0.0.1" for a in host.listen_addrs)  # it does listen there
        host.add_addrs(STRANGER, [target.addr(), target.addr(ws=True)])
        with pytest.raises(PeerUnreachable):
            await host.new_stream(STRANGER, "/x/1.0.0")
        assert target.connections == 0


async def test_bootstrap_peers_put_the_node_in_their_network():
    config = cfg(bootstrap_addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{STRANGER}",), dial_allow=())
    async with hostile_target("close") as target, open_host(ident("g"), config, MemoryNetwork()) as host:
        host.add_addrs(STRANGER, [target.addr()])
        with pytest.raises(PeerUnreachable):
            await host.new_stream(STRANGER, "/x/1.0.0")
        assert target.connections == 1


# --- bounds -----------------------------------------------------------------------------


async def test_learned_addresses_kept_and_tried_are_bounded():
    """A peer publishing 40 addresses gets the newest ``max_addrs_per_peer`` kept, and one dial each per attempt."""
    limit = 3
    async with contextlib.AsyncExitStack() as stack:
        targets = [await stack.enter_async_context(hostile_target("close")) for _ in range(6)]
        dead = [await stack.enter_async_context(closed_port()) for _ in range(34)]
        host = await stack.enter_async_context(open_host(ident("h"), cfg(max_addrs_per_peer=limit)))
        learned = [Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{p}") for p in dead] + [t.addr() for t in targets]
        host.add_addrs(STRANGER, learned)
        assert host.peer_addrs(STRANGER) == learned[-limit:]
        with pytest.raises(PeerUnreachable):
            await host.new_stream(STRANGER, "/x/1.0.0")
        assert [t.connections for t in targets] == [0, 0, 0, 1, 1, 1]


async def test_addresses_from_a_fetched_bootstrap_list_are_learned():
    """A bootstrap URL serves what peers published: its loopback entries are not dialed by a node outside loopback."""
    async with hostile_target("close") as target, open_host(ident("i"), cfg(), MemoryNetwork()) as host:
        boot = Bootstrapper(host, Config(mode="node"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(boot._keeper, target.addr().with_p2p(STRANGER), True)  # what _resolve_url starts
            await trio.testing.wait_all_tasks_blocked()  # the keeper tried once and sleeps before retrying
            assert boot.attempts == 1 and not boot.connected
            nursery.cancel_scope.cancel()
        assert target.connections == 0


async def test_refusals_are_counted_on_metrics(node_config):
    async with open_node(node_config()) as node:
        node.host.add_addrs(STRANGER, ["/ip4/10.0.0.1/tcp/22", "/ip4/169.254.169.254/tcp/80", "/ip4/10.0.0.2/tcp/22"])
        async with httpx.AsyncClient(base_url=node.gateway_url) as http:
            text = (await http.get("/metrics")).text
    assert 'ocf_dial_refused_total{category="private"} 2.0' in text
    assert 'ocf_dial_refused_total{category="link-local"} 1.0' in text
