"""Sans-IO HTTP/1.1 exchanges over any byte stream, on top of :mod:`ocf.httpstream.h1`.

The gateway speaks HTTP/1.1 on two kinds of byte streams: encrypted
``/libp2p-http`` transport streams to other peers (as Open Compute Framework
does) and TCP connections to local backends. Both need the same things that
the codec alone does not decide for us:

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
from collections.abc import Iterable, Sequence
from urllib.parse import unquote

import attrs

from ..errors import BridgeError, MethodNotImplemented, VersionNotSupported
from . import h1

Headers = list[tuple[bytes, bytes]]

#: Largest request/status line plus headers we accept (also the bound on chunk-size and trailer lines).
DEFAULT_MAX_HEADER_SIZE = 64 * 1024

#: Methods a server bridge passes to its application; others get 501 before any app sees them.
#: Case-sensitive tokens (RFC 9110 9.1): ``get`` is not GET, and must not become it on the way
#: to a backend that reads methods case-insensitively. CONNECT and TRACE are left out on purpose.
DEFAULT_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"})

#: Standard reason phrases ("200 OK"), for clients and people that read status lines.
_REASONS = {int(status): status.phrase.encode() for status in http.HTTPStatus}


class HttpDate:
    """The current time as an HTTP ``Date`` value, formatted at most once per second.

    Each server connection keeps one (no module-level state), so a
    keep-alive connection answering many requests a second formats the
    date once.
    """

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second, self._value = now, email.utils.formatdate(now, usegmt=True).encode()
        return self._value


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
    """A parsed request head; header names are lower-case (the parser's)."""

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

ClientEvent = ResponseHead | Data | EndOfMessage
ServerEvent = RequestHead | Data | EndOfMessage | Closed


# --- header helpers -------------------------------------------------------------------


def get_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case bytes), or None.

    Names in ``headers`` must be lower-case already, as the parser, ASGI and
    :func:`forwardable` give them: this runs several times per request.
    """
    for key, value in headers:
        if key == name:
            return value
    return None


def forwardable(headers: Iterable[tuple[bytes, bytes]], *, drop: Iterable[bytes] = ()) -> Headers:
    """``headers`` without hop-by-hop ones (and those named in ``Connection``) or ``drop``.

    Names come out lower-case, as the parser and ASGI give them.
    """
    skip = HOP_BY_HOP.union(d.lower() for d in drop) if drop else HOP_BY_HOP
    out = []
    named: set[bytes] = set()
    for key, value in headers:
        key = key.lower()
        if key in skip:
            if key == b"connection":
                named.update(token.strip().lower() for token in value.split(b",") if token.strip())
            continue
        out.append((key, value))
    return [(k, v) for k, v in out if k not in named] if named else out


def body_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """Declared ``Content-Length``, or None (chunked/unknown). Raises BridgeError if malformed.

    The value is read by the codec's rule (digits only, or a list of equal ones).
    """
    value = get_header(headers, b"content-length")
    if value is None:
        return None
    if value.isdigit():  # the common case: ASCII digits only
        return int(value)
    try:
        return h1.Framing([(b"content-length", value)]).content_length
    except h1.ProtocolError as exc:
        raise BridgeError(str(exc)) from None


def _framed(headers: Headers, content_length: int | None) -> Headers:
    out = [(k, v) for k, v in headers if k != b"content-length"]
    if content_length is None:
        out.append((b"transfer-encoding", b"chunked"))
    else:
        out.append((b"content-length", str(content_length).encode()))
    return out


# --- connection states ---------------------------------------------------------------

# One side of a connection: waiting for (or about to send) a head, inside a body,
# done with this message, or broken (their side only: a protocol error).
_IDLE, _BODY, _DONE, _ERROR = range(4)
#: What :attr:`ServerBridge.receive_phase` says: waiting for (the rest of) a request head, inside its body.
PHASE_HEAD, PHASE_BODY = _IDLE, _BODY


class _Receiver:
    """The receiving half shared by both ends: buffer, body reader, sticky errors."""

    __slots__ = ("buf", "limit", "state", "reader", "error")

    def __init__(self, limit: int) -> None:
        self.buf = h1.Buffer()
        self.limit = limit
        self.state = _IDLE
        self.reader: h1.BodyReader | None = None
        self.error: BridgeError | None = None

    def feed(self, data: bytes | bytearray) -> None:
        if self.buf.closed:
            if data:
                raise BridgeError("data after close: the peer had already closed the connection")
            return
        self.buf.feed(data)

    def body(self, events: list) -> bool:
        """Append the body pieces available to ``events``; True once the body ended (``END`` appended)."""
        reader, buf, limit = self.reader, self.buf, self.limit
        while True:
            data, done = reader.read(buf, limit)  # type: ignore[union-attr]
            if data:
                events.append(Data(data))
            if done:
                events.append(END)
                self.state = _DONE
                return True
            if data is None:
                return False

    def fail(self, message: str, kind: type[BridgeError] = BridgeError) -> BridgeError:
        self.state = _ERROR
        self.error = kind(message)
        return self.error


class _Endpoint:
    """What both ends of a connection share: the receiving half, and framing the body they send."""

    #: What this end sends ("request" or "response"), for error messages.
    _sends = ""

    def __init__(self, max_header_size: int) -> None:
        self._in = _Receiver(max_header_size)
        self._our = _IDLE
        self._writer: h1.BodyWriter | None = None
        self._method = b""  # of the current request
        self._keep_alive = True

    def data(self, chunk: bytes) -> bytes:
        if not chunk or self._our != _BODY:
            return b""
        try:
            return self._writer.data(chunk)  # type: ignore[union-attr]
        except h1.ProtocolError as exc:
            raise BridgeError(f"{self._sends} body does not match its framing: {exc}") from None

    def end(self) -> bytes:
        if self._our != _BODY:
            return b""
        try:
            out = self._writer.end()  # type: ignore[union-attr]
        except h1.ProtocolError as exc:
            raise BridgeError(f"{self._sends} body does not match its framing: {exc}") from None
        self._our = _DONE
        return out

    def _start_cycle(self) -> None:
        """Both messages of an exchange are done: ready for the next one on the same connection."""
        self._our = self._in.state = _IDLE
        self._in.reader = self._writer = None


# --- client ---------------------------------------------------------------------------


class ClientBridge(_Endpoint):
    """The client end of one HTTP/1.1 connection: sequential request/response cycles.

    Call :meth:`request`, then :meth:`data` per body chunk and :meth:`end`,
    sending the returned bytes; feed whatever arrives to :meth:`feed` and act
    on the events. The response may arrive while the request body is still
    being sent (servers that answer early, e.g. with 413); the connection is
    then not reusable.
    """

    _sends = "request"

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        super().__init__(max_header_size)
        self._head_seen = False

    @property
    def response_started(self) -> bool:
        """True once any response byte was parsed into a head (the request then reached the server)."""
        return self._head_seen

    @property
    def response_complete(self) -> bool:
        return self._in.state == _DONE

    @property
    def request_complete(self) -> bool:
        return self._our == _DONE

    @property
    def reusable(self) -> bool:
        """Both messages finished and neither side asked to close: the connection may carry another.

        Not if the server sent anything after its response: that would be
        read as the next response's start, so the connection is broken.
        """
        rx = self._in
        return self._our == _DONE and rx.state == _DONE and self._keep_alive and not rx.buf.closed and len(rx.buf) == 0

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        *,
        content_length: int | None,
        host: bytes | None = None,
    ) -> bytes:
        """Bytes of the request head. ``content_length=None`` streams the body chunked.

        ``headers`` are forwarded minus hop-by-hop ones; ``host`` replaces the
        ``Host`` header (HTTP/1.1 requires one).
        """
        if self._our != _IDLE:
            raise BridgeError("cannot send request: the previous one is not finished")
        out = forwardable(headers, drop=(b"host",) if host is not None else ())
        if host is not None:
            out.insert(0, (b"host", host))
        elif get_header(out, b"host") is None:
            out.insert(0, (b"host", b"localhost"))
        out = _framed(out, content_length)
        if h1.valid_name(method) is None or h1.valid_target(target) is None:
            raise BridgeError(f"cannot send request: illegal method or target {method[:20]!r} {target[:100]!r}")
        try:
            head = h1.head_bytes(b"%b %b HTTP/1.1" % (method, target), out)
        except h1.ProtocolError as exc:
            raise BridgeError(f"cannot send request: {exc}") from None
        self._method = method
        self._writer = h1.BodyWriter(length=content_length, chunked=content_length is None)
        self._our = _BODY
        return head

    def feed(self, data: bytes | bytearray) -> list[ClientEvent]:
        """Parse received bytes (``b""`` means the server closed). Raises BridgeError on bad input."""
        rx = self._in
        if rx.error is not None:
            raise rx.error
        rx.feed(data)
        events: list[ClientEvent] = []
        try:
            while rx.state == _IDLE:
                head = rx.buf.head(rx.limit, skip_blank_lines=False)
                if head is None:
                    if rx.buf.closed:
                        raise rx.fail(
                            "connection closed before the response " + ("completed" if self._head_seen else "started")
                        )
                    return events
                version, status, reason = h1.parse_status_line(head[0])
                headers = h1.parse_headers(head[1])
                if status < 200:
                    if status == 101:
                        raise h1.ProtocolError("unexpected 101 Switching Protocols (no upgrade was asked for)")
                    continue  # 100 Continue and friends: nothing to relay
                framing = h1.Framing(headers)
                if framing.close or version == b"1.0":
                    self._keep_alive = False
                if status in (204, 304) or self._method == b"HEAD":
                    rx.reader = h1.LengthReader(0)
                else:
                    rx.reader = h1.body_reader(framing, response=True)
                    if isinstance(rx.reader, h1.UntilCloseReader):
                        self._keep_alive = False
                self._head_seen = True
                rx.state = _BODY
                events.append(ResponseHead(status, headers, reason))
            if rx.state == _BODY:
                rx.body(events)
        except h1.Truncated:
            raise rx.fail(
                f"connection closed before the response {'completed' if self._head_seen else 'started'}"
            ) from None
        except h1.ProtocolError as exc:
            raise rx.fail(f"malformed HTTP response: {exc}") from None
        return events

    def next_cycle(self) -> None:
        """Prepare for the next request on a :attr:`reusable` connection."""
        if not self.reusable:
            raise BridgeError("connection is not reusable")
        self._start_cycle()
        self._head_seen = False


# --- server ---------------------------------------------------------------------------


class ServerBridge(_Endpoint):
    """The server end of one HTTP/1.1 connection (keep-alive, one request at a time).

    :meth:`feed` yields :class:`RequestHead`, :class:`Data`, ``END`` and,
    when the client closes between requests, ``CLOSED``. Respond with
    :meth:`respond`, :meth:`data`, :meth:`end`; then :meth:`next_cycle`
    tells whether the connection can take another request.
    """

    _sends = "response"

    def __init__(
        self,
        *,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        date_header: bool = False,
        methods: frozenset[bytes] = DEFAULT_METHODS,
    ) -> None:
        super().__init__(max_header_size)
        self._methods = methods
        self._version = b""  # of the current request; b"" before one parsed
        self._waiting_100 = False
        #: The ``Content-Length`` the current response declared (None: none, the body is streamed).
        self.response_length: int | None = None
        # Add ``Date`` to responses that have none, as an origin server should.
        self._date = HttpDate() if date_header else None

    @property
    def request_complete(self) -> bool:
        return self._in.state == _DONE

    @property
    def response_started(self) -> bool:
        return self._our != _IDLE

    @property
    def response_complete(self) -> bool:
        return self._our == _DONE

    @property
    def receive_phase(self) -> int:
        """:data:`PHASE_HEAD`, :data:`PHASE_BODY`, or another value once the request is in (or broken)."""
        return self._in.state

    @property
    def expects_continue(self) -> bool:
        """The client sent ``Expect: 100-continue`` and waits before sending the body."""
        return self._waiting_100

    def continue_(self) -> bytes:
        """The ``100 Continue`` interim response (empty if nobody is waiting for one)."""
        if not self._waiting_100:
            return b""
        self._waiting_100 = False
        return b"HTTP/1.1 100 Continue\r\n\r\n"

    def feed(self, data: bytes | bytearray) -> list[ServerEvent]:
        """Parse received bytes (``b""`` means the client closed). Raises BridgeError on bad input.

        Bytes after the end of a request (pipelining) stay buffered until
        :meth:`next_cycle`; then :meth:`events` parses them.
        """
        self._in.feed(data)
        return self.events()

    @property
    def buffered(self) -> int:
        """Bytes received but not parsed yet (e.g. a pipelined request)."""
        return len(self._in.buf)

    def events(self) -> list[ServerEvent]:
        """Events from bytes already received (after :meth:`next_cycle`, the next request's)."""
        rx = self._in
        if rx.error is not None:
            raise rx.error
        events: list[ServerEvent] = []
        try:
            if rx.state == _IDLE:
                buf = rx.buf
                head = buf.head(rx.limit, skip_blank_lines=True)
                if head is None:
                    if buf.closed:
                        if len(buf):
                            raise rx.fail("client closed the connection in the middle of a request")
                        events.append(CLOSED)
                    return events
                method, target, version = h1.parse_request_line(head[0])
                if method not in self._methods:
                    raise rx.fail(
                        f"method {method[:20].decode()!r} is not implemented here (methods are case-sensitive)",
                        MethodNotImplemented,
                    )
                headers = h1.parse_headers(head[1])
                framing = h1.Framing(headers)
                if version != b"1.0" and framing.hosts != 1:
                    raise h1.ProtocolError("missing Host header" if not framing.hosts else "more than one Host header")
                self._method, self._version = method, version
                self._keep_alive = not framing.close and version != b"1.0"
                self._waiting_100 = framing.expect_continue and version != b"1.0"
                rx.reader = h1.body_reader(framing, response=False)
                rx.state = _BODY
                events.append(RequestHead(method, target, headers, version))
            if rx.state == _BODY:
                parsed = len(events)
                if rx.body(events) or len(events) > parsed:
                    self._waiting_100 = False  # the body is coming (or here) anyway
        except h1.Truncated:
            raise rx.fail("client closed the connection in the middle of a request") from None
        except h1.UnsupportedVersion as exc:
            raise rx.fail(str(exc), VersionNotSupported) from None
        except h1.ProtocolError as exc:
            raise rx.fail(f"malformed HTTP request: {exc}") from None
        return events

    def respond(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], *, reason: bytes = b"", close: bool = False
    ) -> bytes:
        """Bytes of the response head. Without ``Content-Length`` the body goes chunked.

        ``close`` ends the connection after this response (hop-by-hop
        ``Connection`` headers from ``headers`` are dropped, as a proxy must).
        """
        if self._our != _IDLE:
            raise BridgeError("cannot send response: one was already sent")
        if not 200 <= status <= 999:
            raise BridgeError(f"cannot send response: status {status} is not a final status")
        out = forwardable(headers)
        try:
            length = self.response_length = body_length(out)
        except BridgeError as exc:
            raise BridgeError(f"cannot send response: {exc}") from None
        version = self._version
        if length is None:
            if version == b"1.1":
                out.append((b"transfer-encoding", b"chunked"))
            elif self._method != b"HEAD":
                close = True  # an HTTP/1.0 client (or none yet): the body ends when the connection does
        if self._date is not None and get_header(out, b"date") is None:
            out.append((b"date", self._date()))
        if close or not self._keep_alive:
            self._keep_alive = False
            out.append((b"connection", b"close"))
        try:
            head = h1.head_bytes(b"HTTP/1.1 %d %b" % (status, reason or _REASONS.get(status, b"")), out)
        except h1.ProtocolError as exc:
            raise BridgeError(f"cannot send response: {exc}") from None
        if status in (204, 304) or self._method == b"HEAD":
            self._writer = h1.BodyWriter(length=0)
        else:
            self._writer = h1.BodyWriter(length=length, chunked=length is None and version == b"1.1")
        self._our = _BODY
        self._waiting_100 = False
        return head

    def error_response(self, status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
        """A complete small response, for errors detected before the app answered ("" if too late)."""
        if self.response_started:
            return b""
        head = self.respond(
            status, [(b"content-type", content_type), (b"content-length", str(len(body)).encode())], close=True
        )
        return head + self.data(body) + self.end()

    def next_cycle(self) -> bool:
        """After a finished exchange: True if the connection may carry another request."""
        if self._our == _DONE and self._in.state == _DONE and self._keep_alive:
            self._start_cycle()
            self._method = self._version = b""
            return True
        return False


# --- ASGI glue --------------------------------------------------------------------------


def asgi_scope(
    head: RequestHead,
    *,
    client: tuple[str, int] | None = None,
    server: tuple[str, int | None] | None = None,
    extensions: dict | None = None,
    scheme: str = "http",
) -> dict:
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
        "method": head.method.decode("ascii"),  # a token: ASCII, and case-sensitive
        "scheme": scheme,
        "path": path,
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": head.headers,  # already lower-case names (the parser's)
        "client": client,
        "server": server,
        "extensions": dict(extensions or {}),
    }
