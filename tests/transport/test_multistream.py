"""multistream-select 1.0: byte vectors from the spec, negotiation paths, fuzzing."""

import contextlib

import pytest
from hypothesis import given, strategies as st

from ocf.errors import ProtocolError, ProtocolNotSupported
from ocf.transport.multistream import Agreed, Dialer, Listener, encode

HEADER = b"\x13/multistream/1.0.0\n"


def test_wire_encoding_matches_spec():
    assert encode("/multistream/1.0.0") == HEADER
    assert encode("na") == b"\x03na\n"
    assert encode("/noise") == b"\x07/noise\n"


def pump(dialer: Dialer, listener: Listener, first: bytes, chunk: int = 10_000):
    """Move bytes both ways in chunks of ``chunk`` until neither side has anything to say."""
    to_listener, to_dialer = first, listener.data_to_send()
    d_res = l_res = None
    while to_listener or to_dialer:
        if to_listener:
            part, to_listener = to_listener[:chunk], to_listener[chunk:]
            l_res = listener.receive_data(part) or l_res
            to_dialer += listener.data_to_send()
        if to_dialer:
            part, to_dialer = to_dialer[:chunk], to_dialer[chunk:]
            d_res = dialer.receive_data(part) or d_res
            to_listener += dialer.data_to_send()
    return d_res, l_res


def test_first_proposal_accepted_in_one_round_trip():
    d, lis = Dialer(["/noise"]), Listener({"/noise"})
    first = d.initiate()
    assert first == HEADER + b"\x07/noise\n"
    d_res, l_res = pump(d, lis, first)
    assert d_res == Agreed("/noise") and l_res == Agreed("/noise")


def test_na_then_fallback():
    d, lis = Dialer(["/tls/1.0.0", "/noise"]), Listener({"/noise"})
    d_res, l_res = pump(d, lis, d.initiate())
    assert d_res.protocol == l_res.protocol == "/noise"


def test_none_supported_raises():
    d, lis = Dialer(["/a", "/b"]), Listener({"/c"})
    with pytest.raises(ProtocolNotSupported):
        pump(d, lis, d.initiate())


def test_leftover_bytes_are_kept():
    d = Dialer(["/p"])
    d.initiate()
    assert d.receive_data(HEADER + b"\x03/p\nEXTRA") == Agreed("/p", b"EXTRA")


def test_listener_answers_ls():
    lis = Listener({"/a", "/b"})
    assert lis.data_to_send() == b""  # the listener waits for the dialer's header before greeting
    assert lis.receive_data(HEADER + b"\x03ls\n") is None
    body = encode("/a") + encode("/b")
    assert lis.data_to_send() == HEADER + bytes([len(body)]) + body


def test_bytes_wanted_never_overreads():
    d = Dialer(["/p"])
    d.initiate()
    stream = HEADER + b"\x03/p\n" + b"NEXT-PROTOCOL"
    pos = 0
    result = None
    while result is None:
        n = d.bytes_wanted()
        result = d.receive_data(stream[pos : pos + n])
        pos += n
    assert stream[pos:] == b"NEXT-PROTOCOL" and result.leftover == b""


@pytest.mark.parametrize(
    "data",
    [
        b"\x05hello",  # no newline
        b"\x13/multistream/2.0.0\n",  # wrong header
        b"\xff\xff\xff\x7f",  # oversize length
        b"\x80\x80\x80",  # over-long varint prefix
        HEADER + b"\x04/xx\n",  # answer to a proposal nobody made
        b"\x02\xff\n",  # not UTF-8
    ],
)
def test_malformed_input_is_protocol_error(data):
    d = Dialer(["/p"])
    d.initiate()
    with pytest.raises(ProtocolError):
        d.receive_data(data)
        d.receive_data(b"\n" * 4)


@given(st.binary(max_size=200))
def test_fuzz_listener_only_raises_protocol_errors(data):
    lis = Listener({"/p"})
    with contextlib.suppress(ProtocolError):
        lis.receive_data(data)


@given(st.binary(max_size=200))
def test_fuzz_dialer_only_raises_protocol_errors(data):
    d = Dialer(["/p", "/q"])
    d.initiate()
    with contextlib.suppress(ProtocolError, ProtocolNotSupported):
        d.receive_data(data)


@given(st.integers(min_value=1, max_value=40))
def test_any_chunking_gives_same_result(chunk):
    d, lis = Dialer(["/x", "/noise"]), Listener({"/noise"})
    d_res, l_res = pump(d, lis, d.initiate(), chunk=chunk)
    assert d_res.protocol == l_res.protocol == "/noise"
