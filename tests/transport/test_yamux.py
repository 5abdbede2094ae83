"""yamux sans-IO: byte vectors, flow control, limits, fuzzing."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.errors import ProtocolError
from ocf.transport import yamux
from ocf.transport.yamux import (
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    INITIAL_WINDOW,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    DataReceived,
    GoAwayReceived,
    PongReceived,
    StreamAccepted,
    StreamEnded,
    StreamLimitReached,
    StreamOpened,
    StreamResetByPeer,
    WindowUpdated,
    YamuxSession,
)


def frame(type_: int, flags: int, sid: int, length: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BBHII", 0, type_, flags, sid, length) + payload


def pump(a: YamuxSession, b: YamuxSession) -> list:
    """Deliver everything a queued to b; returns b's events."""
    return b.receive_data(a.data_to_send())


def send_window_read_at(a: YamuxSession, b: YamuxSession, sid: int, now: float) -> None:
    """``a`` fills its whole send window on ``sid``; ``b`` reads it all at ``now`` (what its window tuning sees)."""
    window = a.send_window(sid)
    a.send_data(sid, b"x" * window)
    pump(a, b)
    b.consume(sid, window, now)
    pump(b, a)


# --- byte vectors ----------------------------------------------------------------------


def test_header_layout_matches_spec():
    # version 0, type 1 (window update), flags SYN, stream 1, delta 0
    c = YamuxSession(is_client=True)
    assert c.open_stream() == 1
    assert c.data_to_send() == bytes.fromhex("00 01 0001 00000001 00000000")


def test_client_odd_server_even_ids():
    c, s = YamuxSession(True), YamuxSession(False)
    assert [c.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [s.open_stream() for _ in range(3)] == [2, 4, 6]


def test_open_ack_data_fin_roundtrip():
    c, s = YamuxSession(True), YamuxSession(False)
    sid = c.open_stream()
    c.send_data(sid, b"hello", fin=True)
    wire = c.data_to_send()
    assert wire == frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0) + frame(TYPE_DATA, FLAG_FIN, 1, 5, b"hello")
    events = s.receive_data(wire)
    assert events == [StreamOpened(1), DataReceived(1, b"hello"), StreamEnded(1)]
    s.send_data(1, b"bye", fin=True)
    wire = s.data_to_send()
    # the server acknowledged the stream at once, before its data
    assert wire.startswith(frame(TYPE_WINDOW_UPDATE, FLAG_ACK, 1, 0))
    events = c.receive_data(wire)
    assert events == [StreamAccepted(1), DataReceived(1, b"bye"), StreamEnded(1)]
    # both sides closed: the stream is gone on both
    assert not c.has_stream(1) and not s.has_stream(1)


def test_byte_by_byte_delivery():
    c, s = YamuxSession(True), YamuxSession(False)
    sid = c.open_stream()
    c.send_data(sid, b"abcdef")
    wire = c.data_to_send()
    events = []
    for i in range(len(wire)):
        events += s.receive_data(wire[i : i + 1])
    assert events[0] == StreamOpened(1)
    assert b"".join(e.data for e in events if isinstance(e, DataReceived)) == b"abcdef"


def test_ping_is_answered_with_same_opaque():
    s = YamuxSession(False)
    assert s.receive_data(frame(TYPE_PING, FLAG_SYN, 0, 0xDEADBEEF)) == []
    assert s.data_to_send() == frame(TYPE_PING, FLAG_ACK, 0, 0xDEADBEEF)
    assert s.receive_data(frame(TYPE_PING, FLAG_ACK, 0, 7)) == [PongReceived(7)]


def test_go_away_blocks_new_streams_both_ways():
    c, s = YamuxSession(True), YamuxSession(False)
    c.go_away()
    assert c.data_to_send() == frame(TYPE_GO_AWAY, 0, 0, 0)
    with pytest.raises(StreamLimitReached):
        c.open_stream()
    assert s.receive_data(frame(TYPE_GO_AWAY, 0, 0, 0)) == [GoAwayReceived(0)]
    with pytest.raises(StreamLimitReached):
        s.open_stream()
    # inbound SYN after we sent GoAway is refused with RST
    assert c.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0)) == []
    assert c.data_to_send() == frame(TYPE_WINDOW_UPDATE, FLAG_RST, 2, 0)


def test_reset_both_ways():
    c, s = YamuxSession(True), YamuxSession(False)
    sid = c.open_stream()
    pump(c, s)
    s.data_to_send()
    c.reset_stream(sid)
    assert c.data_to_send() == frame(TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0)
    assert s.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_RST, 1, 0)) == [StreamResetByPeer(1)]
    assert not s.has_stream(1)


def test_frames_for_unknown_streams_are_ignored():
    s = YamuxSession(False)
    wire = (
        frame(TYPE_DATA, 0, 9, 4, b"lost")
        + frame(TYPE_WINDOW_UPDATE, 0, 9, 100)
        + frame(TYPE_WINDOW_UPDATE, FLAG_RST, 11, 0)
        + frame(TYPE_DATA, FLAG_FIN, 13, 0)
    )
    assert s.receive_data(wire) == []
    assert s.data_to_send() == b""


def test_data_after_remote_fin_resets_stream():
    c, s = YamuxSession(True), YamuxSession(False)
    sid = c.open_stream()
    c.close_stream(sid)
    pump(c, s)
    s.data_to_send()
    events = s.receive_data(frame(TYPE_DATA, 0, sid, 3, b"bad"))
    assert events == [StreamResetByPeer(sid)]
    assert s.data_to_send() == frame(TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)


# --- protocol errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "wire, reason",
    [
        (b"\x01" + b"\x00" * 11, "version"),
        (frame(7, 0, 0, 0), "type"),
        (frame(TYPE_DATA, 0, 0, 0), "stream 0"),
        (frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0), "parity"),  # the server must open even IDs
    ],
)
def test_protocol_errors_on_client(wire, reason):
    c = YamuxSession(True)
    with pytest.raises(ProtocolError):
        c.receive_data(wire)
    # a GoAway(protocol error) is queued and the session stays dead
    assert c.data_to_send() == frame(TYPE_GO_AWAY, 0, 0, yamux.GO_AWAY_PROTOCOL_ERROR)
    with pytest.raises(ProtocolError):
        c.receive_data(b"")
    with pytest.raises(ProtocolError):
        c.open_stream()


def test_duplicate_syn_is_protocol_error():
    s = YamuxSession(False)
    s.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    with pytest.raises(ProtocolError, match="opened twice"):
        s.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))


def test_window_violation_is_protocol_error():
    s = YamuxSession(False)
    s.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    # exactly the window is fine...
    s.receive_data(frame(TYPE_DATA, 0, 1, INITIAL_WINDOW) + b"x" * INITIAL_WINDOW)
    # ...one more byte without a window update is not
    with pytest.raises(ProtocolError, match="window exceeded"):
        s.receive_data(frame(TYPE_DATA, 0, 1, 1))


def test_oversize_frame_header_rejected_before_payload():
    s = YamuxSession(False)
    s.receive_data(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0))
    # only the header arrives: the violation is detected without buffering 1 GiB
    with pytest.raises(ProtocolError):
        s.receive_data(frame(TYPE_DATA, 0, 1, 1 << 30))


def test_send_window_overflow_is_protocol_error():
    c = YamuxSession(True)
    c.open_stream()
    with pytest.raises(ProtocolError, match="overflow"):
        c.receive_data(frame(TYPE_WINDOW_UPDATE, 0, 1, 0xFFFFFFFF))


# --- flow control ----------------------------------------------------------------------------


def test_sender_cannot_exceed_window():
    c = YamuxSession(True)
    sid = c.open_stream()
    assert c.send_window(sid) == INITIAL_WINDOW
    c.send_data(sid, b"x" * INITIAL_WINDOW)
    assert c.send_window(sid) == 0
    with pytest.raises(ValueError):
        c.send_data(sid, b"x")


def test_large_send_is_split_into_frames():
    c, s = YamuxSession(True), YamuxSession(False)
    sid = c.open_stream()
    payload = bytes(range(256)) * 1000  # 256000 bytes
    c.send_data(sid, payload)
    wire = c.data_to_send()
    events = s.receive_data(wire)
    data = [e.data for e in events if isinstance(e, DataReceived)]
    assert b"".join(data) == payload
    assert all(len(d) <= yamux.MAX_FRAME for d in data)


def test_window_update_only_after_consume():
    c, s = YamuxSession(True), YamuxSession(False)
    sid = c.open_stream()
    c.send_data(sid, b"x" * INITIAL_WINDOW)
    pump(c, s)
    s.data_to_send()  # the ACK
    # nothing consumed yet: no credit, sender stays blocked
    assert s.data_to_send() == b""
    s.consume(sid, 1000)
    assert s.data_to_send() == b""  # below half the window: not worth a frame
    s.consume(sid, INITIAL_WINDOW // 2)
    update = s.data_to_send()
    assert update == frame(TYPE_WINDOW_UPDATE, 0, sid, 1000 + INITIAL_WINDOW // 2)
    assert c.receive_data(update) == [WindowUpdated(sid)]
    assert c.send_window(sid) == 1000 + INITIAL_WINDOW // 2


def test_window_autotuning_grows_for_fast_reader_only():
    c, s = YamuxSession(True), YamuxSession(False)
    s.rtt = 0.001
    sid = c.open_stream()
    pump(c, s)
    s.data_to_send()
    now = 0.0
    for _ in range(12):
        window = c.send_window(sid)
        c.send_data(sid, b"x" * window)
        pump(c, s)
        now += 0.0001  # reader consumes everything quickly
        s.consume(sid, window, now)
        pump(s, c)
    assert s.recv_window(sid) == yamux.MAX_WINDOW
    # a slow reader (consumes long after each grant) keeps the initial window
    c2, s2 = YamuxSession(True), YamuxSession(False)
    s2.rtt = 0.001
    sid = c2.open_stream()
    pump(c2, s2)
    now = 0.0
    for _ in range(12):
        now += 1.0
        send_window_read_at(c2, s2, sid, now)
    assert s2.recv_window(sid) == INITIAL_WINDOW


def test_max_streams_refuses_with_rst():
    s = YamuxSession(False, max_streams=2)
    events = s.receive_data(b"".join(frame(TYPE_WINDOW_UPDATE, FLAG_SYN, i, 0) for i in (1, 3, 5)))
    assert events == [StreamOpened(1), StreamOpened(3)]
    out = s.data_to_send()
    assert out.endswith(frame(TYPE_WINDOW_UPDATE, FLAG_RST, 5, 0))
    # data for the refused stream is skipped quietly
    assert s.receive_data(frame(TYPE_DATA, 0, 5, 3, b"abc")) == []
    with pytest.raises(StreamLimitReached):
        s.open_stream()


# --- fuzzing -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_raises_only_protocol_error(data):
    for is_client in (True, False):
        s = YamuxSession(is_client, max_streams=8)
        with contextlib.suppress(ProtocolError):
            s.receive_data(data)


_frames = st.builds(
    lambda t, f, sid, ln, body: frame(t, f, sid, ln if t != TYPE_DATA else len(body), body if t == TYPE_DATA else b""),
    st.integers(0, 3),
    st.integers(0, 15),
    st.integers(0, 12),
    st.integers(0, 1 << 20),
    st.binary(max_size=64),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_frames, max_size=30), st.integers(1, 50))
def test_well_formed_frames_any_order_keep_invariants(frames, split):
    """Random valid-looking frame sequences: only ProtocolError, and flow-control bookkeeping stays sane."""
    s = YamuxSession(False, max_streams=4)
    wire = b"".join(frames)
    try:
        for i in range(0, len(wire), split):
            for ev in s.receive_data(wire[i : i + split]):
                if isinstance(ev, DataReceived):
                    s.consume(ev.stream_id, len(ev.data), 0.0)
    except ProtocolError:
        return
    assert s.num_streams <= 4
    assert s._growth == sum(s.recv_window(sid) - INITIAL_WINDOW for sid in s.stream_ids())
    for sid in s.stream_ids():
        state = s._streams[sid]
        assert state.recv_buffered >= 0
        assert state.recv_buffered + state.recv_credit <= state.recv_target


def test_window_growth_is_capped_per_session():
    c, s = YamuxSession(True), YamuxSession(False)
    s.rtt = 0.001
    s.growth_budget = 3 * INITIAL_WINDOW  # room for a single doubling, then another
    sids = [c.open_stream() for _ in range(3)]
    pump(c, s)
    s.data_to_send()
    now = 0.0
    for _ in range(8):
        for sid in sids:
            now += 0.0001
            send_window_read_at(c, s, sid, now)
    grown = sum(s.recv_window(sid) - INITIAL_WINDOW for sid in sids)
    assert 0 < grown <= 3 * INITIAL_WINDOW
    # closing streams returns their growth to the budget
    for sid in sids:
        s.reset_stream(sid)
    assert s._growth == 0


def test_data_to_send_limit_keeps_frames_whole():
    c, s = YamuxSession(True), YamuxSession(False)
    sids = [c.open_stream() for _ in range(3)]
    for sid in sids:
        c.send_data(sid, bytes([sid]) * 12)  # a 12-byte payload looks like a header: must not confuse the cut
        c.send_data(sid, b"y" * 100_000)
    total = c.pending_output
    pieces = []
    while c.pending_output:
        before = c.pending_output
        piece = c.data_to_send(1000)
        assert len(piece) == before - c.pending_output
        pieces.append(piece)
    wire = b"".join(pieces)
    assert len(wire) == total and len(pieces) > 3
    events = s.receive_data(wire)
    for sid in sids:
        got = b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)
        assert got == bytes([sid]) * 12 + b"y" * 100_000
