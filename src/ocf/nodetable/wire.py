"""Node table sync messages: varint-length-prefixed JSON, bounded in size.

Two kinds travel on a ``/ocf/nodetable/1.0.0`` stream, each way independently:
``{"t": "summary", "have": {peer: [seq, last_seen]}}`` says which record
versions the sender holds (and when it last heard of each peer, which is how
liveness crosses hops without touching any document), and
``{"t": "records", "records": [...]}`` carries signed records the receiver lacks.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ProtocolError
from ..identity import varint


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return varint.encode(len(body)) + body


class Reader:
    """Sans-IO splitter: feed bytes, get decoded messages; oversize or bad JSON is a ProtocolError."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while True:
            try:
                parsed = varint.decode(self._buf)
            except varint.VarintError as exc:
                raise ProtocolError(f"nodetable: bad length prefix: {exc}") from None
            if parsed is None:
                return out
            length, offset = parsed
            if length > self.limit:
                raise ProtocolError(f"nodetable: message of {length} bytes exceeds {self.limit}")
            if len(self._buf) < offset + length:
                return out
            body = bytes(self._buf[offset : offset + length])
            del self._buf[: offset + length]
            try:
                message = json.loads(body)
            except ValueError:
                raise ProtocolError("nodetable: message is not JSON") from None
            if not isinstance(message, dict) or message.get("t") not in ("summary", "records"):
                raise ProtocolError("nodetable: unknown message")
            out.append(message)
