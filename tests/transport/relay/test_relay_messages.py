"""Circuit relay v2 messages: byte vectors, round trips, hostile bytes, vouchers."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings, strategies as st

from ocf.errors import ProtocolError
from ocf.identity import Identity
from ocf.transport.relay.messages import (
    MAX_ADDRS,
    MAX_MESSAGE,
    HopMessage,
    HopType,
    Limit,
    Peer,
    Reservation,
    Status,
    StopMessage,
    StopType,
    make_voucher,
    open_voucher,
    status_name,
)

ID = bytes.fromhex("0024080112200102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20")


def test_byte_vectors():
    # proto2 required type is written even when 0 (RESERVE)
    assert HopMessage(HopType.RESERVE).encode() == b"\x08\x00"
    assert HopMessage(HopType.STATUS, status=Status.OK).encode() == b"\x08\x02\x28\x64"
    assert Limit(120, 1 << 17).encode() == b"\x08\x78\x10\x80\x80\x08"
    connect = HopMessage(HopType.CONNECT, peer=Peer(ID))
    assert connect.encode() == b"\x08\x01\x12" + bytes([len(ID) + 2]) + b"\x0a" + bytes([len(ID)]) + ID
    ok = HopMessage(HopType.STATUS, reservation=Reservation(1700000000), limit=Limit(120, 1 << 17), status=100)
    assert (
        ok.encode()
        == bytes.fromhex("0802")
        + b"\x1a\x06\x08\x80\xe2\xcf\xaa\x06"
        + (b"\x22\x06\x08\x78\x10\x80\x80\x08")
        + b"\x28\x64"
    )
    assert StopMessage(StopType.STATUS, status=Status.PERMISSION_DENIED).encode() == b"\x08\x01\x20\xca\x01"


def test_decode_vectors():
    msg = HopMessage.decode(bytes.fromhex("0802") + b"\x22\x06\x08\x78\x10\x80\x80\x08" + b"\x28\xc9\x01")
    assert msg == HopMessage(HopType.STATUS, limit=Limit(120, 131072), status=201)
    assert status_name(msg.status) == "RESOURCE_LIMIT_EXCEEDED"
    assert status_name(999) == "STATUS_999"  # a newer peer's code is kept, not refused
    # unknown fields are skipped
    assert HopMessage.decode(b"\x08\x00\x50\x01\x5a\x01x") == HopMessage(HopType.RESERVE)


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "unknown type"),  # required type missing
        (b"\x08\x07", "unknown type"),
        (b"\x08\x01\x12\x00", "without an id"),
        (b"\x08\x01\x12\x05\x0a\x10", "truncated"),
        (b"\x0a\x01\x00", "must be a varint"),  # type sent length-delimited
        (b"\x08\x02\x1a\x00", "without expire"),
    ],
)
def test_malformed_is_protocol_error(data, why):
    with pytest.raises(ProtocolError, match=why):
        HopMessage.decode(data)


def test_size_bound_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds 4096"):
        HopMessage.decode(b"\x08\x00" + b"\x5a\x01x" * 2000)
    with pytest.raises(ProtocolError, match="exceeds 4096"):
        StopMessage.decode(bytes(MAX_MESSAGE + 1))


def test_repeated_addrs_are_capped():
    peer = Peer(ID, tuple(b"\x04\x7f\x00\x00\x01" for _ in range(MAX_ADDRS + 50)))
    assert len(Peer.decode(peer.encode()).addrs) == MAX_ADDRS


@given(
    kind=st.sampled_from(list(HopType)),
    ident=st.binary(min_size=1, max_size=64),
    addrs=st.lists(st.binary(max_size=40), max_size=5),
    expire=st.integers(0, 2**63 - 1),
    duration=st.integers(0, 2**32 - 1),
    data=st.integers(0, 2**63 - 1),
    status=st.one_of(st.none(), st.integers(0, 2**31)),
)
def test_hop_round_trip(kind, ident, addrs, expire, duration, data, status):
    msg = HopMessage(
        kind, Peer(ident, tuple(addrs)), Reservation(expire, tuple(addrs), b"v"), Limit(duration, data), status
    )
    assert HopMessage.decode(msg.encode()) == msg


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_error(data):
    for cls in (HopMessage, StopMessage):
        with contextlib.suppress(ProtocolError):
            cls.decode(data)


def test_voucher_signed_by_the_relay():
    relay, peer = Identity.from_seed("v-relay"), Identity.from_seed("v-peer")
    voucher = open_voucher(make_voucher(relay, peer.peer_id, 1234))
    assert (voucher.relay, voucher.peer, voucher.expiration) == (relay.peer_id, peer.peer_id, 1234)
    forged = bytearray(make_voucher(relay, peer.peer_id, 1234))
    forged[-1] ^= 1
    with pytest.raises(ProtocolError, match="signature"):
        open_voucher(bytes(forged))
