"""Sans-IO HTTP/1.1 exchanges over any byte stream, on top of h11.

The gateway speaks HTTP/1.1 on two kinds of byte streams: encrypted
``/libp2p-http`` transport streams to other peers (as Open Compute Framework
does) and TCP connections to local backends. Both need the same things that
h11 alone does not decide for us:

* what a proxy must drop (hop-by-hop headers) and which framing a streamed
  body gets (``Content-Length`` when known, chunked otherwise), so bodies flow
  through without ever being buffered whole;
* translating parsed events into small typed values (and the server side
  into ASGI scopes), so the Trio drivers in :mod:`ocf.httpstream.client` and
  :mod:`ocf.httpstream.server` only move bytes;
* one exception type, :class:`ocf.errors.BridgeError`, for every malformed
  or truncated message, whoever sent it.

Nothing here does I/O: bytes go in, events and bytes come out, which is what
the byte-vector and hypothesis tests exercise.
"""

from __future__ import annotations

import email.utils
import http
import time
from typing import Iterable, Sequence, Union
from urllib.parse import unquote

import attrs
import h11

from ..errors import BridgeError

Headers = list[tuple[bytes, bytes]]

#: Largest request/status line plus headers we accept (and h11's buffer bound).
DEFAULT_MAX_HEADER_SIZE = 64 * 1024

#: Standard reason phrases ("200 OK"), for clients and people that read status lines.
_REASONS = {int(status): status.phrase.encode() for status in http.HTTPStatus}

_date_cache: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The current time as an HTTP ``Date`` value, computed once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True).encode())
    return _date_cache[1]


#: Headers that describe one connection, never the message (RFC 9110 7.6.1);
#: a proxy drops them and frames the body itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)


# --- events ---------------------------------------------------------------------------


@attrs.frozen
class RequestHead:
    method: bytes
    target: bytes
    headers: Headers
    http_version: bytes = b"1.1"

    def header(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)


@attrs.frozen
class ResponseHead:
    status: int
    headers: Headers
    reason: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return get_header(self.headers, name)


@attrs.frozen
class Data:
    data: bytes


@attrs.frozen
class EndOfMessage:
    pass


@attrs.frozen
class Closed:
    """The peer closed its side cleanly between messages."""


END = EndOfMessage()
CLOSED = Closed()

ClientEvent = Union[ResponseHead, Data, EndOfMessage]
ServerEvent = Union[RequestHead, Data, EndOfMessage, Closed]


# --- header helpers -------------------------------------------------------------------


def get_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case bytes), or None."""
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def forwardable(headers: Iterable[tuple[bytes, bytes]], *, drop: Iterable[bytes] = ()) -> Headers:
    """``headers`` without hop-by-hop ones (and those named in ``Connection``) or ``drop``.

    Names come out lower-case, as h11 and ASGI give them.
    """
    pairs = [(k.lower(), v) for k, v in headers]
    skip = set(HOP_BY_HOP) | {d.lower() for d in drop}
    for key, value in pairs:
        if key == b"connection":
            skip.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return [(k, v) for k, v in pairs if k not in skip]


def body_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """Declared ``Content-Length``, or None (chunked/unknown). Raises BridgeError if malformed."""
    value = get_header(headers, b"content-length")
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise BridgeError(f"malformed Content-Length {value!r}") from None
    if length < 0:
        raise BridgeError(f"malformed Content-Length {value!r}")
    return length


def _framed(headers: Headers, content_length: int | None) -> Headers:
    out = [(k, v) for k, v in headers if k != b"content-length"]
    if content_length is None:
        out.append((b"transfer-encoding", b"chunked"))
    else:
        out.append((b"content-length", str(content_length).encode()))
    return out


# --- client ---------------------------------------------------------------------------


class ClientBridge:
    """The client end of one HTTP/1.1 connection: sequential request/response cycles.

    Call :meth:`request`, then :meth:`data` per body chunk and :meth:`end`,
    sending the returned bytes; feed whatever arrives to :meth:`feed` and act
    on the events. The response may arrive while the request body is still
    being sent (servers that answer early, e.g. with 413); the connection is
    then not reusable.
    """

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_header_size)
        self._head_seen = False

    @property
    def response_started(self) -> bool:
        """True once any response byte was parsed into a head (the request then reached the server)."""
        return self._head_seen

    @property
    def response_complete(self) -> bool:
        return self._conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def request_complete(self) -> bool:
        return self._conn.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def reusable(self) -> bool:
        """Both messages finished and neither side asked to close: the connection may carry another."""
        return self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE

    def request(self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], *, content_length: int | None, host: bytes | None = None) -> bytes:
        """Bytes of the request head. ``content_length=None`` streams the body chunked.

        ``headers`` are forwarded minus hop-by-hop ones; ``host`` replaces the
        ``Host`` header (h11 requires one for HTTP/1.1).
        """
        out = forwardable(headers, drop=(b"host",) if host is not None else ())
        if host is not None:
            out.insert(0, (b"host", host))
        elif get_header(out, b"host") is None:
            out.insert(0, (b"host", b"localhost"))
        out = _framed(out, content_length)
        try:
            return self._conn.send(h11.Request(method=method, target=target, headers=out))
        except h11.LocalProtocolError as exc:
            raise BridgeError(f"cannot send request: {exc}") from None

    def data(self, chunk: bytes) -> bytes:
        if not chunk or self._conn.our_state is not h11.SEND_BODY:
            return b""
        try:
            return self._conn.send(h11.Data(data=chunk)) or b""
        except h11.LocalProtocolError as exc:
            raise BridgeError(f"request body does not match its framing: {exc}") from None

    def end(self) -> bytes:
        if self._conn.our_state is not h11.SEND_BODY:
            return b""
        try:
            return self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise BridgeError(f"request body does not match its framing: {exc}") from None

    def feed(self, data: bytes) -> list[ClientEvent]:
        """Parse received bytes (``b""`` means the server closed). Raises BridgeError on bad input."""
        try:
            self._conn.receive_data(data)
        except RuntimeError as exc:  # data after the connection closed
            raise BridgeError(f"data after close: {exc}") from None
        events: list[ClientEvent] = []
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._conn.their_state is h11.ERROR and not data:
                    raise BridgeError(f"connection closed before the response {'completed' if self._head_seen else 'started'}") from None
                raise BridgeError(f"malformed HTTP response: {exc}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return events
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends: nothing to relay
            if isinstance(event, h11.Response):
                self._head_seen = True
                events.append(ResponseHead(event.status_code, list(event.headers), bytes(event.reason)))
            elif isinstance(event, h11.Data):
                if event.data:
                    events.append(Data(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                events.append(END)
                return events
            elif isinstance(event, h11.ConnectionClosed):
                raise BridgeError("connection closed before the response" + (" completed" if self._head_seen else " started"))

    def next_cycle(self) -> None:
        """Prepare for the next request on a :attr:`reusable` connection."""
        self._conn.start_next_cycle()
        self._head_seen = False


# --- server ---------------------------------------------------------------------------


class ServerBridge:
    """The server end of one HTTP/1.1 connection (keep-alive, one request at a time).

    :meth:`feed` yields :class:`RequestHead`, :class:`Data`, ``END`` and,
    when the client closes between requests, ``CLOSED``. Respond with
    :meth:`respond`, :meth:`data`, :meth:`end`; then :meth:`next_cycle`
    tells whether the connection can take another request.
    """

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE, date_header: bool = False) -> None:
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_size)
        self._method = b""
        # Add ``Date`` to responses that have none, as an origin server should.
        self._date_header = date_header

    @property
    def request_complete(self) -> bool:
        return self._conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def response_started(self) -> bool:
        return self._conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE)

    @property
    def response_complete(self) -> bool:
        return self._conn.our_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED)

    @property
    def expects_continue(self) -> bool:
        """The client sent ``Expect: 100-continue`` and waits before sending the body."""
        return bool(self._conn.they_are_waiting_for_100_continue)

    def continue_(self) -> bytes:
        """The ``100 Continue`` interim response (empty if nobody is waiting for one)."""
        if not self._conn.they_are_waiting_for_100_continue:
            return b""
        return self._conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""

    def feed(self, data: bytes) -> list[ServerEvent]:
        """Parse received bytes (``b""`` means the client closed). Raises BridgeError on bad input.

        Bytes after the end of a request (pipelining) stay buffered until
        :meth:`next_cycle`; then :meth:`events` parses them.
        """
        try:
            self._conn.receive_data(data)
        except RuntimeError as exc:
            raise BridgeError(f"data after close: {exc}") from None
        return self.events()

    @property
    def buffered(self) -> int:
        """Bytes received but not parsed yet (e.g. a pipelined request)."""
        return len(self._conn.trailing_data[0])

    def events(self) -> list[ServerEvent]:
        """Events from bytes already received (after :meth:`next_cycle`, the next request's)."""
        events: list[ServerEvent] = []
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._conn.their_state is h11.ERROR and self._conn.trailing_data[1]:
                    raise BridgeError("client closed the connection in the middle of a request") from None
                raise BridgeError(f"malformed HTTP request: {exc}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return events
            if isinstance(event, h11.Request):
                self._method = bytes(event.method)
                events.append(RequestHead(bytes(event.method), bytes(event.target), list(event.headers), bytes(event.http_version)))
            elif isinstance(event, h11.Data):
                if event.data:
                    events.append(Data(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                events.append(END)
                return events  # the rest waits for next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                if self._conn.their_state is h11.CLOSED and self._conn.our_state in (h11.IDLE, h11.DONE, h11.MUST_CLOSE, h11.CLOSED):
                    events.append(CLOSED)
                    return events
                raise BridgeError("client closed the connection in the middle of a request")

    def respond(self, status: int, headers: Sequence[tuple[bytes, bytes]], *, reason: bytes = b"", close: bool = False) -> bytes:
        """Bytes of the response head. Without ``Content-Length`` the body goes chunked.

        ``close`` ends the connection after this response (hop-by-hop
        ``Connection`` headers from ``headers`` are dropped, as a proxy must).
        """
        out = forwardable(headers)
        if self._date_header and not any(k.lower() == b"date" for k, _ in out):
            out.append((b"date", http_date()))
        if close:
            out.append((b"connection", b"close"))
        try:
            return self._conn.send(h11.Response(status_code=status, headers=out, reason=reason or _REASONS.get(status, b""))) or b""
        except h11.LocalProtocolError as exc:
            raise BridgeError(f"cannot send response: {exc}") from None

    def data(self, chunk: bytes) -> bytes:
        if not chunk or self._conn.our_state is not h11.SEND_BODY:
            return b""
        try:
            return self._conn.send(h11.Data(data=chunk)) or b""
        except h11.LocalProtocolError as exc:
            raise BridgeError(f"response body does not match its framing: {exc}") from None

    def end(self) -> bytes:
        if self._conn.our_state is not h11.SEND_BODY:
            return b""
        try:
            return self._conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            raise BridgeError(f"response body does not match its framing: {exc}") from None

    def error_response(self, status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
        """A complete small response, for errors detected before the app answered ("" if too late)."""
        if self.response_started:
            return b""
        head = self.respond(status, [(b"content-type", content_type), (b"content-length", str(len(body)).encode())], close=True)
        return head + self.data(body) + self.end()

    def next_cycle(self) -> bool:
        """After a finished exchange: True if the connection may carry another request."""
        if self._conn.our_state is h11.DONE and self._conn.their_state is h11.DONE:
            self._conn.start_next_cycle()
            return True
        return False


# --- ASGI glue --------------------------------------------------------------------------


def asgi_scope(head: RequestHead, *, client: tuple[str, int] | None = None, server: tuple[str, int | None] | None = None, extensions: dict | None = None, scheme: str = "http") -> dict:
    """The ASGI HTTP scope for a request that arrived over a stream.

    ``path`` is percent-decoded as ASGI requires; ``raw_path`` keeps the
    bytes so a proxy can forward them unchanged.
    """
    target = head.target
    raw_path, _, query = target.partition(b"?")
    if not raw_path.startswith(b"/"):
        raise BridgeError(f"request target {target[:100]!r} is not an origin-form path")
    try:
        path = unquote(raw_path.decode("ascii"))
    except UnicodeDecodeError:
        raise BridgeError(f"request target {target[:100]!r} is not valid") from None
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": head.http_version.decode("ascii", "replace"),
        "method": head.method.decode("ascii", "replace").upper(),
        "scheme": scheme,
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(k.lower(), v) for k, v in head.headers],
        "client": client,
        "server": server,
        "extensions": dict(extensions or {}),
    }
