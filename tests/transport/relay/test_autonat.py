"""AutoNAT v1: byte vectors, who we dial back (the requester's IP only), rate limits, real dial-backs on loopback."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import trio
from hypothesis import given, settings, strategies as st

from ocf.config import Config
from ocf.errors import ProtocolError
from ocf.identity import Identity, Multiaddr
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.identify import read_message, write_message
from ocf.transport.relay.autonat import (
    MAX_DIAL_ADDRS,
    PEER_PER_MINUTE,
    PROTOCOL,
    DialRequest,
    DialResponse,
    RespStatus,
    decode,
    dial_back_addrs,
    open_autonat,
)


def cfg(**kw) -> Config:
    return Config(host="127.0.0.1", tcpport=0, handshake_timeout=5.0, dial_timeout=5.0, ws=False, **kw)


def test_byte_vectors():
    assert (
        DialRequest(b"\x01\x02", (b"\x04",)).encode()
        == bytes.fromhex("0800") + b"\x12\x09\x0a\x07\x0a\x02\x01\x02\x12\x01\x04"
    )
    assert DialResponse(RespStatus.OK, "", b"\x04").encode() == b"\x08\x01\x1a\x05\x08\x00\x1a\x01\x04"
    assert decode(b"\x08\x01\x1a\x04\x08\x64\x12\x00") == DialResponse(100, "", b"")
    with pytest.raises(ProtocolError, match="neither"):
        decode(b"\x08\x00")  # a DIAL without its dial field


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        decode(data)


def test_dial_back_only_to_the_observed_ip():
    observed = Multiaddr.parse("/ip4/1.2.3.4/tcp/50000")
    requested = [
        Multiaddr.parse(a).to_bytes()
        for a in (
            "/ip4/5.6.7.8/tcp/4001",  # another IP: only its port is used, at the observed IP
            "/ip4/1.2.3.4/tcp/4002",
            "/ip4/9.9.9.9/tcp/4003/ws",  # not plain TCP
            "/ip6/::1/tcp/4004",  # another family
            "/ip4/7.7.7.7/tcp/1/p2p/12D3KooWJwkFuKWVLtiAyZeMDUUzgYHf6CLfdt9o2U43yuzLMAZW/p2p-circuit",
        )
    ] + [b"\xff\xff"]
    got = dial_back_addrs(observed, requested)
    assert [str(a) for a in got] == ["/ip4/1.2.3.4/tcp/4001", "/ip4/1.2.3.4/tcp/4002"]
    many = [Multiaddr.parse(f"/ip4/1.2.3.4/tcp/{p}").to_bytes() for p in range(1000, 1100)]
    assert len(dial_back_addrs(observed, many)) == MAX_DIAL_ADDRS
    assert dial_back_addrs(None, requested) == []


@contextlib.asynccontextmanager
async def pair(network: MemoryNetwork | None = None):
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(open_host(Identity.from_seed(f"an-s-{os.getpid()}"), cfg(), network))
        autonat = await stack.enter_async_context(open_autonat(server))
        client = await stack.enter_async_context(open_host(Identity.from_seed(f"an-c-{os.getpid()}"), cfg(), network))
        client_nat = await stack.enter_async_context(open_autonat(client))
        await client.connect(server.listen_addrs[0])
        yield server, autonat, client, client_nat


async def ask_raw(client, server, addrs: list[str], peer: bytes | None = None) -> DialResponse:
    stream = await client.new_stream(server.peer_id, PROTOCOL)
    async with stream:
        request = DialRequest(
            client.peer_id.raw if peer is None else peer, tuple(Multiaddr.parse(a).to_bytes() for a in addrs)
        )
        await write_message(stream, request.encode())
        answer = decode(await read_message(stream, 4096))
    assert isinstance(answer, DialResponse)
    return answer


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_dial_back_over_tcp_public_and_private():
    async with pair() as (server, autonat, client, client_nat):
        assert await client_nat.ask(server.peer_id) == "public"
        assert autonat.stats == {"dial_backs": 1, "dial_back_ok": 1}
        # the dial-back came from a throwaway identity: our connection to the server is untouched
        assert client.is_connected(server.peer_id) and len(client.connections(server.peer_id)) == 1
        answer = await ask_raw(client, server, [f"/ip4/127.0.0.1/tcp/{closed_port()}"])
        assert answer.status == RespStatus.E_DIAL_ERROR
        assert client_nat.verdict(1) == "public"  # one success outweighs


async def test_requests_are_rate_limited_per_peer(autojump_clock):
    net = MemoryNetwork()
    async with pair(net) as (server, autonat, client, _):
        own = str(client.listen_addrs[0].without_p2p())
        for _ in range(PEER_PER_MINUTE):
            assert (await ask_raw(client, server, [own])).status == RespStatus.OK
        answer = await ask_raw(client, server, [own])
        assert answer.status == RespStatus.E_DIAL_REFUSED and autonat.refused == {"peer_rate": 1}
        await trio.sleep(61)
        assert (await ask_raw(client, server, [own])).status == RespStatus.OK


async def test_refusals_with_a_figure():
    net = MemoryNetwork()
    async with pair(net) as (server, autonat, client, _):
        # another peer's ID in the request
        answer = await ask_raw(client, server, [str(client.listen_addrs[0].without_p2p())], peer=server.peer_id.raw)
        assert answer.status == RespStatus.E_BAD_REQUEST
        # an address that is not where we see the requester
        answer = await ask_raw(client, server, ["/memory/elsewhere"])
        assert answer.status == RespStatus.E_DIAL_REFUSED
        assert autonat.refused == {"bad_request": 1, "no_addrs": 1}
        assert autonat.stats["dial_backs"] == 0
