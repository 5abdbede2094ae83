"""The sans-IO HTTP/1.1 bridge: byte vectors and hypothesis round trips, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.errors import BridgeError
from ocf.httpstream.bridge import (
    CLOSED,
    END,
    ClientBridge,
    Data,
    RequestHead,
    ResponseHead,
    ServerBridge,
    asgi_scope,
    body_length,
    forwardable,
)

# --- byte vectors ------------------------------------------------------------------------


def test_client_request_with_known_length_is_exact():
    c = ClientBridge()
    out = c.request(b"POST", b"/v1/chat", [(b"Host", b"gw"), (b"Content-Type", b"application/json")], content_length=5)
    out += c.data(b"hello") + c.end()
    assert (
        out == b"POST /v1/chat HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello"
    )
    assert c.request_complete


def test_client_request_streams_chunked_when_length_unknown():
    c = ClientBridge()
    out = c.request(b"POST", b"/x", [], content_length=None, host=b"peer")
    out += c.data(b"abc") + c.data(b"") + c.data(b"de") + c.end()
    assert (
        out == b"POST /x HTTP/1.1\r\nhost: peer\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )


def test_hop_by_hop_headers_are_dropped_including_those_named_in_connection():
    headers = [
        (b"Connection", b"keep-alive, X-Private"),
        (b"X-Private", b"secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"),
        (b"Upgrade", b"websocket"),
        (b"Authorization", b"Bearer k"),
        (b"X-Other", b"1"),
    ]
    assert forwardable(headers) == [(b"authorization", b"Bearer k"), (b"x-other", b"1")]
    assert forwardable(headers, drop=[b"Authorization"]) == [(b"x-other", b"1")]


def test_client_host_replaces_the_original_host():
    c = ClientBridge()
    out = c.request(b"GET", b"/", [(b"host", b"public.example")], content_length=0, host=b"127.0.0.1:8080")
    assert out.count(b"host:") == 1 and b"host: 127.0.0.1:8080\r\n" in out


def test_client_parses_chunked_response_and_skips_100_continue():
    c = ClientBridge()
    c.request(b"GET", b"/", [], content_length=0)
    c.end()
    events = c.feed(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: "
        b"chunked\r\n\r\n"
    )
    assert events == [
        ResponseHead(200, [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")], b"OK")
    ]
    assert c.response_started
    assert c.feed(b"6\r\ndata: \r\n") == [Data(b"data: ")]
    assert c.feed(b"2\r\nhi\r\n0\r\n\r\n") == [Data(b"hi"), END]
    assert c.response_complete and c.reusable
    c.next_cycle()
    assert not c.response_started


def test_a_bytearray_read_parses_to_bytes_that_outlive_the_buffer():
    """Trio streams may return a bytearray (memory streams do): what the bridge parsed must not alias it.

    Header names and values must be hashable bytes (ASGI apps put them in dicts and sets), and a
    reader that refills the same buffer must not rewrite the request or response already parsed.
    """
    wire = bytearray(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
    head, data, _ = ServerBridge().feed(wire)
    wire[:] = b"X" * len(wire)
    assert isinstance(head, RequestHead) and head.headers == [(b"host", b"t"), (b"content-length", b"2")]
    assert all(type(part) is bytes for pair in head.headers for part in pair) and {head.headers[0][0]} == {b"host"}
    assert isinstance(data, Data) and type(data.data) is bytes and data.data == b"hi"

    c = ClientBridge()
    c.request(b"GET", b"/", [(b"Host", b"t")], content_length=0)
    wire = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    head, data, _ = c.feed(wire)
    wire[:] = b"X" * len(wire)
    assert isinstance(head, ResponseHead) and head.headers == [(b"content-length", b"2")]
    assert type(head.headers[0][0]) is bytes
    assert isinstance(data, Data) and type(data.data) is bytes and data.data == b"ok"


def test_client_truncated_response_is_an_error():
    c = ClientBridge()
    c.request(b"GET", b"/", [], content_length=0)
    c.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    with pytest.raises(BridgeError, match="before the response completed"):
        c.feed(b"")


def test_client_eof_before_any_response_says_so():
    c = ClientBridge()
    c.request(b"GET", b"/", [], content_length=0)
    with pytest.raises(BridgeError, match="before the response started"):
        c.feed(b"")
    assert not c.response_started


def test_client_malformed_response_is_a_bridge_error():
    c = ClientBridge()
    c.request(b"GET", b"/", [], content_length=0)
    with pytest.raises(BridgeError, match="malformed"):
        c.feed(b"NOT HTTP AT ALL\r\n\r\n")


def test_client_body_longer_than_declared_is_refused():
    c = ClientBridge()
    c.request(b"POST", b"/", [], content_length=2)
    with pytest.raises(BridgeError):
        c.data(b"abc")


def test_http_date_is_formatted_once_per_second_and_follows_the_clock(monkeypatch):
    from ocf.httpstream import bridge

    now = [784111777.2]  # RFC 9110's example date
    formatted = []
    real = bridge.email.utils.formatdate
    monkeypatch.setattr(bridge.time, "time", lambda: now[0])
    monkeypatch.setattr(
        bridge.email.utils, "formatdate", lambda t, usegmt: formatted.append(t) or real(t, usegmt=usegmt)
    )
    date = bridge.HttpDate()
    assert date() == b"Sun, 06 Nov 1994 08:49:37 GMT"
    now[0] += 0.5
    assert date() == b"Sun, 06 Nov 1994 08:49:37 GMT" and len(formatted) == 1
    now[0] += 1
    assert date() == b"Sun, 06 Nov 1994 08:49:38 GMT" and len(formatted) == 2


def test_server_adds_date_only_when_asked_and_only_once():
    get = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    plain = ServerBridge()
    plain.feed(get)
    assert b"date:" not in plain.respond(200, [(b"content-length", b"0")]).lower()
    dated = ServerBridge(date_header=True)
    dated.feed(get)
    head = dated.respond(200, [(b"content-length", b"0")])
    assert head.lower().count(b"\r\ndate: ") == 1 and b"GMT\r\n" in head
    own = ServerBridge(date_header=True)
    own.feed(get)
    head = own.respond(200, [(b"date", b"Thu, 01 Jan 1970 00:00:00 GMT"), (b"content-length", b"0")])
    assert head.lower().count(b"\r\ndate: ") == 1 and b"1970" in head


def test_server_parses_pipelined_requests_one_cycle_at_a_time():
    s = ServerBridge()
    raw = b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
    events = s.feed(raw)
    assert events == [RequestHead(b"POST", b"/a?x=1", [(b"host", b"h"), (b"content-length", b"3")]), Data(b"abc"), END]
    assert s.buffered > 0
    out = s.respond(200, [(b"content-length", b"2")]) + s.data(b"ok") + s.end()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nok")
    assert s.next_cycle()
    assert s.events() == [RequestHead(b"GET", b"/b", [(b"host", b"h")]), END]


def test_server_response_without_length_is_chunked():
    s = ServerBridge()
    s.feed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    out = s.respond(200, [(b"content-type", b"text/plain"), (b"connection", b"keep-alive")]) + s.data(b"tok") + s.end()
    assert (
        out == b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n3\r\ntok\r\n0\r\n\r\n"
    )


def test_server_eof_between_requests_is_a_clean_close_and_mid_body_is_not():
    s = ServerBridge()
    assert s.feed(b"") == [CLOSED]
    s2 = ServerBridge()
    s2.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9\r\n\r\nabc")
    with pytest.raises(BridgeError, match="middle of a request"):
        s2.feed(b"")


def test_server_error_response_closes_the_connection():
    s = ServerBridge()
    with pytest.raises(BridgeError):
        s.feed(b"GARBAGE\r\n\r\n")
    out = s.error_response(400, b'{"error": {}}')
    assert out.startswith(b"HTTP/1.1 400 ") and b"connection: close\r\n" in out and out.endswith(b'{"error": {}}')
    assert not s.next_cycle()


def test_server_header_size_limit():
    s = ServerBridge(max_header_size=1024)
    with pytest.raises(BridgeError):
        s.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000)


def test_server_100_continue():
    s = ServerBridge()
    s.feed(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert s.expects_continue
    assert s.continue_() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert s.continue_() == b""
    assert s.feed(b"hi") == [Data(b"hi"), END]


def test_asgi_scope_decodes_path_and_keeps_raw_bytes():
    head = RequestHead(b"POST", b"/v1/p2p/%C3%A9t%C3%A9/x?q=%20", [(b"host", b"h")])
    scope = asgi_scope(head, client=("12D3KooW", 0), extensions={"ocf.remote_peer": "12D3KooW"})
    assert scope["method"] == "POST" and scope["path"] == "/v1/p2p/été/x"
    assert scope["raw_path"] == b"/v1/p2p/%C3%A9t%C3%A9/x" and scope["query_string"] == b"q=%20"
    assert scope["headers"] == [(b"host", b"h")] and scope["client"] == ("12D3KooW", 0)
    assert scope["extensions"]["ocf.remote_peer"] == "12D3KooW"
    with pytest.raises(BridgeError):
        asgi_scope(RequestHead(b"GET", b"http://absolute/form", []))


def test_body_length():
    assert body_length([(b"content-length", b" 12 ")]) == 12
    assert body_length([]) is None
    with pytest.raises(BridgeError):
        body_length([(b"content-length", b"-1")])
    with pytest.raises(BridgeError):
        body_length([(b"content-length", b"x")])


# --- hypothesis: round trips and fuzzing ---------------------------------------------------

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).filter(
    lambda t: t[0] != "-"
)
_value = st.binary(max_size=40).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E) or b"v")
_headers = st.lists(st.tuples(_token.map(lambda t: ("x-" + t).encode()), _value), max_size=6)
_chunks = st.lists(st.binary(min_size=0, max_size=3000), max_size=6)
_path = st.lists(st.text(alphabet="abcXYZ019-._~%", max_size=8), max_size=4).map(
    lambda parts: ("/" + "/".join(parts)).encode()
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, prev = [], 0
    for p in points:
        pieces.append(data[prev:p])
        prev = p
    pieces.append(data[prev:])
    return [p for p in pieces if p]  # b"" would mean EOF


@settings(max_examples=150, deadline=None)
@given(
    method=st.sampled_from([b"GET", b"POST", b"PUT", b"PATCH", b"DELETE"]),
    path=_path,
    headers=_headers,
    chunks=_chunks,
    known_length=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=8),
)
def test_request_round_trip_through_any_split(method, path, headers, chunks, known_length, cuts):
    body = b"".join(chunks)
    client = ClientBridge()
    wire = client.request(method, path, headers, content_length=len(body) if known_length else None, host=b"peer")
    for chunk in chunks:
        wire += client.data(chunk)
    wire += client.end()
    server = ServerBridge()
    events = []
    for piece in _split(wire, cuts):
        events.extend(server.feed(piece))
    head = events[0]
    assert isinstance(head, RequestHead) and head.method == method and head.target == path
    got_headers = [(k, v) for k, v in head.headers if k.startswith(b"x-")]
    assert got_headers == [(k.lower(), v) for k, v in headers]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == body
    assert events[-1] is END and events.count(END) == 1


@settings(max_examples=150, deadline=None)
@given(
    status=st.sampled_from([200, 201, 400, 404, 413, 500, 502, 503]),
    headers=_headers,
    chunks=_chunks,
    known_length=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=100_000), max_size=8),
)
def test_response_round_trip_through_any_split(status, headers, chunks, known_length, cuts):
    body = b"".join(chunks)
    client = ClientBridge()
    server = ServerBridge()
    server.feed(client.request(b"GET", b"/", [], content_length=0) + client.end())
    resp_headers = list(headers) + ([(b"content-length", str(len(body)).encode())] if known_length else [])
    wire = server.respond(status, resp_headers)
    for chunk in chunks:
        wire += server.data(chunk)
    wire += server.end()
    events = []
    for piece in _split(wire, cuts):
        events.extend(client.feed(piece))
    assert isinstance(events[0], ResponseHead) and events[0].status == status
    assert b"".join(e.data for e in events if isinstance(e, Data)) == body
    assert events[-1] is END
    assert client.reusable and server.next_cycle()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_server_fuzz_only_raises_bridge_errors(pieces):
    server = ServerBridge(max_header_size=4096)
    try:
        for piece in [*(p for p in pieces if p), b""]:
            server.feed(piece)
    except BridgeError:
        pass


_HTTPISH = st.lists(
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK\r\n",
            b"Content-Length: 3\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"\r\n",
            b"3\r\nabc\r\n",
            b"0\r\n\r\n",
            b"zz",
            b"HTTP/1.0 404 x\r\n",
            b"\x00\xff",
        ]
    ),
    max_size=10,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), _HTTPISH), st.lists(st.integers(0, 400), max_size=4))
def test_client_fuzz_only_raises_bridge_errors(data, cuts):
    client = ClientBridge(max_header_size=4096)
    client.request(b"GET", b"/", [], content_length=0)
    try:
        for piece in [*_split(data, cuts), b""]:
            client.feed(piece)
    except BridgeError:
        pass
