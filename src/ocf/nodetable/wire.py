"""Node table sync messages: varint-length-prefixed JSON, bounded in size.

Three kinds travel on a ``/ocf/nodetable/2.0.0`` stream, each way independently:

- ``{"t": "summary", "lo": A, "hi": B, "have": {owner: [seq, heartbeat_ms]}}``
  says which record versions (and which heartbeat) the sender holds for the
  owners whose text form sorts in ``[A, B)`` (``B`` null: to the end). A full
  summary is a run of such pages, each under the message limit, so no
  message grows with the table; a receiver learns from each page on its own
  which of its records in that range the sender lacks.
- ``{"t": "records", "records": [...]}`` carries signed records the receiver
  lacks, each with the owner's latest signed heartbeat (``"hb"``).
- ``{"t": "beats", "beats": {owner: [ms, sig]}}`` carries newer owner-signed
  heartbeats for records the receiver already holds.
"""

from __future__ import annotations

import bisect
import json
from typing import Any
from collections.abc import Iterable, Iterator

from ..errors import ProtocolError
from ..identity import varint

#: 2.0.0: records signed over their document bytes, paged summaries, owner-signed heartbeats.
#: A 1.x node does not negotiate it, so the two never exchange records each would refuse.
PROTOCOL = "/ocf/nodetable/2.0.0"
KINDS = ("summary", "records", "beats")
#: Bytes a summary entry costs beyond its owner text (quotes, seq, heartbeat time, separators).
ENTRY_OVERHEAD = 40


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return varint.encode(len(body)) + body


def summary_pages(items: Iterable[tuple[str, int, int]], budget: int) -> Iterator[dict[str, Any]]:
    """Split ``(owner text, seq, heartbeat ms)`` items, sorted by text, into pages of about ``budget`` bytes."""
    have: dict[str, list[int]] = {}
    lo, size = "", 0
    for text, seq, ms in items:
        cost = len(text) + ENTRY_OVERHEAD
        if have and size + cost > budget:
            yield {"t": "summary", "lo": lo, "hi": text, "have": have}
            have, lo, size = {}, text, 0
        have[text] = [seq, ms]
        size += cost
    yield {"t": "summary", "lo": lo, "hi": None, "have": have}


def page_range(message: dict[str, Any]) -> tuple[str, str | None]:
    lo, hi = message.get("lo", ""), message.get("hi")
    if not isinstance(lo, str) or not (hi is None or isinstance(hi, str)) or not isinstance(message.get("have"), dict):
        raise ProtocolError("nodetable: malformed summary page")
    return lo, hi


def in_range(sorted_texts: list[str], lo: str, hi: str | None) -> list[str]:
    """The texts of ``sorted_texts`` in ``[lo, hi)``."""
    start = bisect.bisect_left(sorted_texts, lo)
    end = len(sorted_texts) if hi is None else bisect.bisect_left(sorted_texts, hi)
    return sorted_texts[start:end]


class Reader:
    """Sans-IO splitter: feed bytes, get decoded messages; oversize or bad JSON is a ProtocolError.

    The buffer holds only bytes actually received (never a declared length),
    and is released whenever it empties, so an idle stream pins nothing.
    ``partial`` tells the driver a message has started and not finished,
    which is what its per-message deadline watches.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while True:
            try:
                parsed = varint.decode(self._buf)
            except varint.VarintError as exc:
                raise ProtocolError(f"nodetable: bad length prefix: {exc}") from None
            if parsed is None:
                break
            length, offset = parsed
            if length > self.limit:
                raise ProtocolError(f"nodetable: message of {length} bytes exceeds {self.limit}")
            if len(self._buf) < offset + length:
                break
            body = bytes(self._buf[offset : offset + length])
            del self._buf[: offset + length]
            try:
                message = json.loads(body)
            except ValueError:
                raise ProtocolError("nodetable: message is not JSON") from None
            if not isinstance(message, dict) or message.get("t") not in KINDS:
                raise ProtocolError("nodetable: unknown message")
            out.append(message)
        if not self._buf:
            self._buf = bytearray()  # give back the capacity a large message grew
        return out
