"""AutoNAT v2: byte vectors, real dial-backs on loopback, the dial-data toll and its cap, the nonce check."""

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
from ocf.transport import open_host
from ocf.transport.identify import read_message, write_message
from ocf.transport.relay import autonat2
from ocf.transport.relay.autonat import open_autonat
from ocf.transport.relay.autonat2 import (
    DIAL_BACK,
    DIAL_REQUEST,
    DialDataRequest,
    DialDataResponse,
    DialRequest,
    DialResponse,
    DialStatus,
    ResponseStatus,
    decode,
    decode_dial_back,
    encode,
    encode_dial_back,
)


def cfg(host: str = "127.0.0.1") -> Config:
    return Config(host=host, tcpport=0, handshake_timeout=5.0, dial_timeout=5.0, ws=False, quic=False)


def test_byte_vectors():
    # Message{dialRequest{addrs: [0x04], nonce: 1}}
    request = encode(DialRequest((b"\x04",), 1))
    assert request == b"\x0a\x0c\x0a\x01\x04\x11" + (1).to_bytes(8, "little")
    assert decode(request) == DialRequest((b"\x04",), 1)
    assert encode(DialResponse(200, 0, 200)) == b"\x12\x08\x08\xc8\x01\x10\x00\x18\xc8\x01"
    assert decode(b"\x1a\x06\x08\x00\x10\xb0\xea\x01") == DialDataRequest(0, 30000)
    assert decode(encode(DialDataResponse(b"xy"))) == DialDataResponse(b"xy")
    assert encode_dial_back(2**64 - 1) == b"\x09" + b"\xff" * 8
    assert decode_dial_back(encode_dial_back(12345)) == 12345
    with pytest.raises(ProtocolError):
        decode(b"\x08\x01")  # no message body


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        decode(data)
    with contextlib.suppress(ProtocolError):
        decode_dial_back(data)


@contextlib.asynccontextmanager
async def pair(client_host: str = "127.0.0.1"):
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(open_host(Identity.from_seed(f"a2-s-{os.getpid()}"), cfg()))
        server_nat = await stack.enter_async_context(open_autonat(server))
        client = await stack.enter_async_context(open_host(Identity.from_seed(f"a2-c-{os.getpid()}"), cfg(client_host)))
        client_nat = await stack.enter_async_context(open_autonat(client))
        await client.connect(server.listen_addrs[0])
        assert server_nat.v2 is not None and client_nat.v2 is not None
        yield server, server_nat.v2, client, client_nat.v2


def port_of(host) -> int:
    return int(host.listen_addrs[0].value_for("tcp"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_dial_back_at_the_observed_ip_needs_no_toll():
    async with pair() as (server, v2s, client, v2c):
        addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port_of(client)}")
        assert await v2c.ask(server.peer_id, [addr]) == (addr, "public")
        assert v2s.stats["dial_back_ok"] == 1 and v2s.stats["dial_data_asked"] == 0
        assert v2c.addr_results == {str(addr): "public"}
        # the dial-back came on its own connection: ours to the server is untouched
        assert len(client.connections(server.peer_id)) == 1
        closed = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{closed_port()}")
        assert await v2c.ask(server.peer_id, [closed]) == (closed, "private")


async def test_another_ip_costs_dial_data():
    # the client listens on every loopback address; the server sees it at 127.0.0.1 and is asked for 127.0.0.2
    async with pair("0.0.0.0") as (server, v2s, client, v2c):
        addr = Multiaddr.parse(f"/ip4/127.0.0.2/tcp/{port_of(client)}")
        assert await v2c.ask(server.peer_id, [addr]) == (addr, "public")
        assert v2s.stats["dial_data_asked"] == 1 and v2c.stats["dial_data_paid"] == 1


async def test_the_client_refuses_a_toll_above_its_cap(monkeypatch):
    monkeypatch.setattr(autonat2, "DIAL_DATA_MIN", autonat2.MAX_DIAL_DATA + 1)
    monkeypatch.setattr(autonat2, "DIAL_DATA_MAX", autonat2.MAX_DIAL_DATA + 1)
    async with pair("0.0.0.0") as (server, v2s, client, v2c):
        addr = Multiaddr.parse(f"/ip4/127.0.0.2/tcp/{port_of(client)}")
        assert await v2c.ask(server.peer_id, [addr]) is None
        assert v2c.stats["dial_data_paid"] == 0 and v2s.stats["dial_backs"] == 0


async def test_an_ok_without_our_nonce_proves_nothing():
    async with pair() as (server, _, client, v2c):

        async def liar(stream) -> None:
            await read_message(stream, 8192)
            await write_message(stream, encode(DialResponse(ResponseStatus.OK, 0, DialStatus.OK)))

        server.set_stream_handler(DIAL_REQUEST, liar)
        addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port_of(client)}")
        assert await v2c.ask(server.peer_id, [addr]) is None
        assert v2c.addr_results == {}


async def test_a_dial_back_with_an_unknown_nonce_gets_no_answer():
    async with pair() as (server, _, client, v2c):
        addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port_of(client)}")
        async with server.probe_stream(addr, DIAL_BACK, 5.0) as stream:
            await write_message(stream, encode_dial_back(42))
            with pytest.raises((ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError)):
                await read_message(stream, 8192)
        assert v2c.v1.refused.get("v2_bad_dial_back") == 1
