"""Identify message codec, framing limits, and the exchange between two hosts."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.config import Config
from ocf.errors import ProtocolError
from ocf.identity import Identity, Multiaddr, varint
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.identify import (
    PROTOCOL,
    PROTOCOL_VERSION,
    IdentifyMessage,
    read_message,
    write_message,
)
from ocf.version import AGENT

IDENT = Identity.from_seed("identify")


def test_encode_field_order_and_bytes():
    msg = IdentifyMessage(
        protocol_version="ipfs/0.1.0",
        agent_version="ocf/1",
        public_key=b"\x08\x01\x12\x20" + b"k" * 32,
        listen_addrs=(Multiaddr.parse("/ip4/1.2.3.4/tcp/5").to_bytes(),),
        observed_addr=Multiaddr.parse("/ip4/9.9.9.9/tcp/7").to_bytes(),
        protocols=("/ipfs/ping/1.0.0",),
    )
    data = msg.encode()
    # field 1 (publicKey): tag 0x0a, length 36
    assert data[:2] == b"\x0a\x24"
    # protocolVersion is field 5: tag 0x2a
    assert b"\x2a\x0aipfs/0.1.0" in data
    assert IdentifyMessage.decode(data) == msg


def test_decode_skips_unknown_fields_and_signed_record():
    data = IdentifyMessage(agent_version="x").encode()
    data += b"\x42\x03abc"  # field 8 (signedPeerRecord), length-delimited
    data += b"\x50\x96\x01"  # field 10, varint 150
    data += b"\x59" + b"\x00" * 8  # field 11, fixed64
    assert IdentifyMessage.decode(data).agent_version == "x"


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05abc",  # truncated length-delimited
        b"\x0a",  # missing length
        b"\x0b",  # wire type 3 (groups)
        b"\x00\x00",  # field 0
        b"\x32\x02\xff\xfe",  # agentVersion not UTF-8
        b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # over-long varint
    ],
)
def test_decode_rejects_malformed(data):
    with pytest.raises(ProtocolError):
        IdentifyMessage.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_garbage_raises_only_protocol_error(data):
    with contextlib.suppress(ProtocolError):
        IdentifyMessage.decode(data)


async def test_read_message_limits():
    a, b = trio.testing.memory_stream_pair()
    await write_message(a, b"x" * 100)
    assert await read_message(b, 100) == b"x" * 100
    await a.send_all(varint.encode(1 << 20))
    with pytest.raises(ProtocolError, match="exceeds"):
        await read_message(b, 4096)
    c, d = trio.testing.memory_stream_pair()
    await c.send_all(varint.encode(10) + b"short")
    await c.send_eof()
    with pytest.raises(ProtocolError, match="ended"):
        await read_message(d, 4096)


async def test_identify_exchange_records_peer_info():
    net = MemoryNetwork()
    other = Identity.from_seed("identify-other")

    async def ignore(stream: object) -> None:
        await trio.lowlevel.checkpoint()

    async with open_host(IDENT, Config(), net) as a, open_host(other, Config(), net) as b:
        b.set_stream_handler("/custom/1.0.0", ignore)
        await a.connect(b.listen_addrs[0])
        # ask explicitly over a fresh stream: the raw answer is the length-prefixed message
        stream = await a.new_stream(b.peer_id, PROTOCOL)
        async with stream:
            msg = IdentifyMessage.decode(await read_message(stream, 65536))
        assert msg.protocol_version == PROTOCOL_VERSION
        assert msg.agent_version == AGENT
        assert b.peer_id.matches_key_proto(msg.public_key)
        assert [Multiaddr.from_bytes(x) for x in msg.listen_addrs] == [x.without_p2p() for x in b.listen_addrs]
        assert set(msg.protocols) >= {PROTOCOL, "/ipfs/ping/1.0.0", "/custom/1.0.0"}
        # observed address: how b sees a's connection (memory: a's listen address)
        assert Multiaddr.from_bytes(msg.observed_addr) == a.listen_addrs[0].without_p2p()
        # the automatic exchange after connecting filled the peer info on both sides
        while a.peer_info(b.peer_id) is None or b.peer_info(a.peer_id) is None:
            await trio.testing.wait_all_tasks_blocked()
        assert b.peer_info(a.peer_id).agent_version == AGENT
        assert a.peer_addrs(b.peer_id) == [b.listen_addrs[0].without_p2p()]
