"""A lean HTTP/1.1 codec: parse message heads and bodies, frame bodies for sending.

Sans-IO, like h11 (whose behaviour this follows where RFC 9112 leaves a
choice), but built for the gateway's one hot path: a whole small message in
one read. h11 spends most of its time on generality we do not need (event
objects validated field by field, a state machine consulted per event); here
a head is two ``find`` calls for its end, one match that validates the whole
header block and a split, and a body is a slice. One request and response
cost both ends a fraction of h11's CPU, and CPU is most of the latency a
gateway hop adds (``benchmarks/hops.py`` measures it).

Strictness matters more than speed, because the gateway is a proxy: a
message that two parsers could read differently is how requests get
smuggled. So this codec refuses, rather than guesses:

* a ``Transfer-Encoding`` other than a single ``chunked``, and a message
  carrying both ``Transfer-Encoding`` and ``Content-Length``;
* conflicting ``Content-Length`` values, or ones that are not digits;
* obsolete line folding, control characters in names or values, a request
  target with spaces or control bytes, HTTP versions other than 1.0 and 1.1;
* a bare LF anywhere in chunked framing (after a chunk size, after chunk
  data, in trailers): a peer that ends those lines differently from us is
  how chunk boundaries get smuggled (h11 0.16 refuses them too);
* heads (and chunk-size or trailer lines) longer than the configured bound.

Head lines may end in CRLF or a bare LF (RFC 9112 2.2 allows recipients to
accept both, and h11 does); empty lines before a request line are skipped
(section 2.2 again).

:class:`ocf.httpstream.bridge` turns this into connection states and events.
"""

from __future__ import annotations

import re

Headers = list[tuple[bytes, bytes]]

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = rb"[^\x00-\x08\x0a-\x1f\x7f]*"  # field-vchar, SP, HTAB, obs-text: no CTLs but HTAB
_TARGET = rb"[\x21-\x7e]+"  # visible ASCII: no spaces, tabs or control bytes
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (" + _TARGET + rb") HTTP/(?P<version>[0-9]\.[0-9])")
_VERSIONS = (b"1.1", b"1.0")
_STATUS_LINE = re.compile(rb"HTTP/(?P<version>[0-9]\.[0-9]) ([0-9]{3})(?: (" + _VALUE + rb"))?")
_FIELD_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":" + _VALUE + rb"\r?\n)*")
_NAME_LIST = re.compile(_TOKEN + rb"(?: " + _TOKEN + rb")*")
_SEND_BLOCK = re.compile(rb"(?:" + _TOKEN + rb": " + _VALUE + rb"\r\n)*\r\n")
# No whitespace between the size and ";" (h11 refuses it; the RFC's BWS there is for senders we do not need).
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;" + _VALUE + rb")?[ \t]*")
_DIGITS = re.compile(rb"[0-9]{1,18}")

#: For validating what we send: a name (or method), a value without CR, LF or other CTLs, a request target.
valid_name = re.compile(_TOKEN).fullmatch
valid_value = re.compile(_VALUE).fullmatch
valid_target = re.compile(_TARGET).fullmatch


class ProtocolError(Exception):
    """A message that is malformed, or framed in a way this codec refuses."""


class Truncated(ProtocolError):
    """The connection closed before the message it was carrying ended."""


class UnsupportedVersion(ProtocolError):
    """A well-formed start line with an HTTP version other than 1.0 or 1.1 (a server answers 505)."""


# --- the receive buffer ---------------------------------------------------------------------


class Buffer:
    """Received bytes not consumed yet, and whether the sender has closed.

    Consuming advances an offset instead of copying what is left, so a read
    full of small pipelined messages costs linear, not quadratic, time.
    """

    __slots__ = ("data", "pos", "closed", "_scanned")

    def __init__(self) -> None:
        self.data = b""
        self.pos = 0
        self.closed = False
        self._scanned = 0  # bytes after pos already known to hold no end of head

    def feed(self, data: bytes | bytearray) -> None:
        if not data:
            self.closed = True
        elif self.pos >= len(self.data):
            # Kept, not copied: a bytearray the caller may reuse becomes bytes first.
            self.data, self.pos = (data if type(data) is bytes else bytes(data)), 0
        else:
            self.data = self.data[self.pos :] + data
            self.pos = 0

    def __len__(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes from the front."""
        data, pos = self.data, self.pos
        if pos == 0 and n >= len(data):
            self.data = b""
            self._scanned = 0
            return data
        out = data[pos : pos + n]
        self.pos = pos + len(out)
        self._scanned = 0
        return out

    def crlf_line(self, limit: int) -> bytes | None:
        """The next line without its CRLF, or None if it has not all arrived; a bare LF is an error."""
        data, pos = self.data, self.pos
        end = data.find(b"\n", pos)
        if end < 0:
            if len(data) - pos > limit:
                raise ProtocolError(f"line longer than {limit} bytes")
            return None
        if end - pos > limit:
            raise ProtocolError(f"line longer than {limit} bytes")
        if end == pos or data[end - 1] != 13:
            raise ProtocolError("a line in chunked framing ends in a bare LF (CRLF is required)")
        self.pos = end + 1
        self._scanned = 0
        return data[pos : end - 1]

    def head(self, limit: int, *, skip_blank_lines: bool) -> tuple[bytes, bytes] | None:
        """(start line, header lines each ending in a line break) of a complete head, or None before its end."""
        data, pos = self.data, self.pos
        if skip_blank_lines:
            while data.startswith(b"\r\n", pos) or data.startswith(b"\n", pos):
                pos = self.pos = pos + (1 if data[pos] == 10 else 2)
                self._scanned = 0
        start = pos + self._scanned
        start = start - 3 if start - 3 > pos else pos
        # The blank line ending a head is "\n\r\n" or "\n\n": two plain finds beat one regex search tenfold.
        end = data.find(b"\n\r\n", start)
        bare = data.find(b"\n\n", start, end + 2 if end >= 0 else len(data))
        if bare >= 0:
            end, after = bare, bare + 2
        elif end >= 0:
            after = end + 3
        else:
            if len(data) - pos > limit:
                raise ProtocolError(f"message head larger than {limit} bytes")
            self._scanned = len(data) - pos
            return None
        if end - pos > limit:
            raise ProtocolError(f"message head larger than {limit} bytes")
        self.pos = after
        self._scanned = 0
        start_line, _, fields = data[pos:end].partition(b"\n")
        if start_line.endswith(b"\r"):
            start_line = start_line[:-1]
        return start_line, fields + b"\n" if fields else b""


# --- heads ----------------------------------------------------------------------------------


def parse_headers(fields: bytes) -> Headers:
    """Header lines, each ending in CRLF or LF, into (lower-case name, value) pairs.

    One match validates the whole block (its pattern cannot backtrack: a
    value cannot contain a line break), then plain splitting takes it apart;
    heads are parsed on every request of every hop.
    """
    if _FIELD_BLOCK.fullmatch(fields) is None:
        for line in fields.split(b"\n")[:-1]:
            if line[:1] in (b" ", b"\t"):
                raise ProtocolError("obsolete line folding in a header is not accepted")
            if _FIELD_BLOCK.fullmatch(line + b"\n") is None:
                raise ProtocolError(f"malformed header line {line[:60]!r}")
        raise ProtocolError("malformed header block")  # pragma: no cover - a line above fails first
    headers = []
    for line in fields.split(b"\n")[:-1]:
        name, _, value = line.partition(b":")
        headers.append((name.lower(), value.strip(b" \t\r")))
    return headers


def _start_line(pattern: re.Pattern[bytes], line: bytes, what: str) -> tuple[bytes | None, ...]:
    m = pattern.fullmatch(line)
    if m is None:
        raise ProtocolError(f"malformed {what} line {line[:100]!r}")
    if m.group("version") not in _VERSIONS:
        raise UnsupportedVersion(f"unsupported HTTP version {m.group('version').decode()}")
    return m.groups()


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """(method, target, version) of a request line."""
    method, target, version = _start_line(_REQUEST_LINE, line, "request")
    assert method is not None and target is not None and version is not None  # not optional in the pattern
    return method, target, version


def parse_status_line(line: bytes) -> tuple[bytes, int, bytes]:
    """(version, status, reason) of a status line."""
    version, status, reason = _start_line(_STATUS_LINE, line, "status")
    assert version is not None and status is not None  # not optional in the pattern
    return version, int(status), reason or b""


class Framing:
    """What one pass over a head's headers tells about its message and connection."""

    __slots__ = ("content_length", "chunked", "close", "expect_continue", "hosts")

    def __init__(self, headers: Headers) -> None:
        self.content_length: int | None = None
        self.chunked = False
        self.close = False
        self.expect_continue = False
        self.hosts = 0
        seen_te = False
        for name, value in headers:
            if name == b"content-length":
                for item in value.split(b","):
                    item = item.strip(b" \t")
                    if _DIGITS.fullmatch(item) is None:
                        raise ProtocolError(f"malformed Content-Length {value[:40]!r}")
                    length = int(item)
                    if self.content_length is not None and self.content_length != length:
                        raise ProtocolError("conflicting Content-Length values")
                    self.content_length = length
            elif name == b"transfer-encoding":
                if seen_te or value.strip(b" \t").lower() != b"chunked":
                    raise ProtocolError(f"unsupported Transfer-Encoding {value[:40]!r} (only a single 'chunked' is)")
                seen_te = self.chunked = True
            elif name == b"connection":
                if any(token.strip(b" \t") == b"close" for token in value.lower().split(b",")):
                    self.close = True
            elif name == b"expect":
                self.expect_continue = value.strip(b" \t").lower() == b"100-continue"
            elif name == b"host":
                self.hosts += 1
        if self.chunked and self.content_length is not None:
            raise ProtocolError("both Content-Length and Transfer-Encoding: a message may carry only one")


# --- bodies: reading ---------------------------------------------------------------------------


class LengthReader:
    """A body of known length (``Content-Length``; 0 for none)."""

    __slots__ = ("remaining",)

    def __init__(self, length: int) -> None:
        self.remaining = length

    def read(self, buf: Buffer, limit: int) -> tuple[bytes | None, bool]:
        """(a piece of the body or None, whether the body has ended)."""
        remaining = self.remaining
        if remaining == 0:
            return None, True
        if len(buf) == 0:
            if buf.closed:
                raise Truncated(f"closed with {remaining} body bytes still to come")
            return None, False
        data = buf.take(remaining)
        self.remaining = remaining = remaining - len(data)
        return data, remaining == 0


class ChunkedReader:
    """A ``Transfer-Encoding: chunked`` body; pieces come out as they arrive, not chunk by chunk."""

    __slots__ = ("remaining", "state", "trailer_size")

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    def __init__(self) -> None:
        self.remaining = 0
        self.state = self._SIZE
        self.trailer_size = 0

    def read(self, buf: Buffer, limit: int) -> tuple[bytes | None, bool]:
        while True:
            state = self.state
            if state == self._DATA:
                if len(buf) == 0:
                    break
                data = buf.take(self.remaining)
                self.remaining -= len(data)
                if self.remaining == 0:
                    self.state = self._DATA_END
                return data, False
            if state == self._DATA_END:
                # Exactly CRLF follows the data: refused at its first wrong byte, not once a line
                # ends (a byte that cannot start CRLF is as wrong now as after any wait; h11 agrees).
                end = buf.data[buf.pos : buf.pos + 2]
                if end != b"\r\n"[: len(end)]:
                    raise ProtocolError(
                        "a line in chunked framing ends in a bare LF (CRLF is required)"
                        if end[:1] == b"\n"
                        else "a chunk is longer than its size line said"
                    )
                if len(end) < 2:
                    break
                buf.take(2)
                self.state = self._SIZE
                continue
            line = buf.crlf_line(limit)
            if line is None:
                break
            if state == self._SIZE:
                m = _CHUNK_SIZE.fullmatch(line)
                if m is None:
                    raise ProtocolError(f"malformed chunk size line {line[:40]!r}")
                self.remaining = int(m.group(1), 16)
                self.state = self._DATA if self.remaining else self._TRAILER
            else:  # trailer fields: checked, counted against the head limit, dropped
                if not line:
                    return None, True
                parse_headers(line + b"\n")
                self.trailer_size += len(line)
                if self.trailer_size > limit:
                    raise ProtocolError(f"trailer larger than {limit} bytes")
        if buf.closed:
            raise Truncated("closed in the middle of a chunked body")
        return None, False


class UntilCloseReader:
    """A response body without framing: it ends when the server closes (HTTP/1.0 style)."""

    __slots__ = ()

    def read(self, buf: Buffer, limit: int) -> tuple[bytes | None, bool]:
        if len(buf):
            return buf.take(len(buf)), False
        return None, buf.closed


BodyReader = LengthReader | ChunkedReader | UntilCloseReader


def body_reader(framing: Framing, *, response: bool) -> BodyReader:
    if framing.chunked:
        return ChunkedReader()
    if framing.content_length is not None:
        return LengthReader(framing.content_length)
    return UntilCloseReader() if response else LengthReader(0)


# --- bodies: writing ---------------------------------------------------------------------------


class BodyWriter:
    """Frames body pieces for sending: ``Content-Length`` (checked), chunked, or raw until close."""

    __slots__ = ("remaining", "chunked")

    def __init__(self, *, length: int | None, chunked: bool = False) -> None:
        self.remaining = length  # None: no declared length
        self.chunked = chunked

    def data(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""  # an empty chunk would end a chunked body
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        if self.remaining is not None:
            if len(chunk) > self.remaining:
                raise ProtocolError("too much data for the declared Content-Length")
            self.remaining -= len(chunk)
        return chunk

    def end(self) -> bytes:
        if self.chunked:
            return b"0\r\n\r\n"
        if self.remaining:
            raise ProtocolError(f"too little data for the declared Content-Length ({self.remaining} bytes missing)")
        return b""


def head_bytes(start_line: bytes, headers: Headers) -> bytes:
    """A serialized head; raises ProtocolError for a name or value that cannot be sent as is.

    Checked after joining rather than header by header: the names in one
    match, the values by counting line breaks (a value carrying one, which
    could smuggle in a header of its own, adds one) and one match for the
    rest of what a value must not contain.
    """
    fields = b"".join([b"%b: %b\r\n" % pair for pair in headers]) + b"\r\n"
    if (
        fields.count(b"\n") != len(headers) + 1
        or _SEND_BLOCK.fullmatch(fields) is None
        or (headers and _NAME_LIST.fullmatch(b" ".join([name for name, _ in headers])) is None)
    ):
        for name, value in headers:
            if valid_name(name) is None:
                raise ProtocolError(f"illegal header name {name[:40]!r}")
            if valid_value(value) is None:
                raise ProtocolError(f"illegal header value {value[:40]!r} for {name[:40]!r}")
        raise ProtocolError("illegal header block")  # pragma: no cover - a pair above fails first
    return start_line + b"\r\n" + fields
