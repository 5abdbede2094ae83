"""Node table sync messages: varint-length-prefixed JSON, bounded in size.

These kinds travel on a ``/ocf/nodetable/2.1.0`` stream, each way independently:

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
- ``{"t": "digest", "d": [64 hex]}`` (when liveness is membership's): per
  bucket of owners, the XOR of a hash of each held ``(owner, seq)``. The
  receiver answers each bucket that differs with a page of that bucket only
  (``{"t": "summary", "b": bucket, "have": ...}``), so in a quiet network a
  round costs one fixed-size message per neighbour, whatever N.
- ``{"t": "offer", "o": {owner: seq}}`` (2.1.0, with membership) announces
  record versions the sender holds, instead of pushing them: a record that
  changed reaches a node from each neighbour that got it first, and pushed
  whole, each node received it about 5 times over during churn (N=300).
- ``{"t": "want", "o": [owner, ...]}`` asks the receiver for those records
  (a node asks one offerer at a time, see :mod:`.sync`).

A ``/ocf/nodetable/2.0.0`` stream (an older node) carries the first four
kinds only, and records are pushed whole on it.
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
#: 2.1.0: offers and wants (changed records announced, then fetched from one neighbour).
PROTOCOL = "/ocf/nodetable/2.1.0"
PROTOCOL_2_0 = "/ocf/nodetable/2.0.0"
#: What a pusher proposes, newest first; a handler serves both.
PROTOCOLS = (PROTOCOL, PROTOCOL_2_0)
KINDS_2_0 = ("summary", "records", "beats", "digest")
KINDS = (*KINDS_2_0, "offer", "want")
#: Longest owner text taken in an offer or a want (a peer ID's text is about 52 characters).
MAX_OWNER_TEXT = 128
#: Bytes an offer entry costs (owner text, seq, quotes and separators), for cutting offers under the limit.
OFFER_ENTRY_SIZE = 90
#: Buckets of the digest: owners are spread by a hash of their text, a page covers one bucket.
BUCKETS = 64
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


def digest_message(digest: list[int]) -> dict[str, Any]:
    return {"t": "digest", "d": [format(h, "x") for h in digest]}


def parse_digest(message: dict[str, Any]) -> list[int]:
    hashes = message.get("d")
    if not isinstance(hashes, list) or len(hashes) != BUCKETS:
        raise ProtocolError("nodetable: digest must have one hash per bucket")
    try:
        out = [int(h, 16) for h in hashes if isinstance(h, str) and len(h) <= 16]
    except ValueError:
        raise ProtocolError("nodetable: digest hash is not hex") from None
    if len(out) != BUCKETS:
        raise ProtocolError("nodetable: digest hash malformed")
    return out


def kinds_of(protocol: str | None) -> tuple[str, ...]:
    """The message kinds a stream of ``protocol`` may carry."""
    return KINDS if protocol == PROTOCOL else KINDS_2_0


def parse_offer(message: dict[str, Any]) -> dict[str, int]:
    """An offer's ``{owner text: seq}``; raises ProtocolError unless every entry is well formed."""
    items = message.get("o")
    if not isinstance(items, dict):
        raise ProtocolError("nodetable: offer without a map")
    for text, seq in items.items():
        if len(text) > MAX_OWNER_TEXT or not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 1 << 64:
            raise ProtocolError("nodetable: malformed offer")
    return items


def parse_want(message: dict[str, Any]) -> list[str]:
    """A want's owner texts; raises ProtocolError unless it is a list of short strings."""
    items = message.get("o")
    if not isinstance(items, list) or not all(isinstance(t, str) and len(t) <= MAX_OWNER_TEXT for t in items):
        raise ProtocolError("nodetable: malformed want")
    return items


def page_bucket(message: dict[str, Any]) -> int | None:
    """The bucket a summary page covers (None: a ``[lo, hi)`` page)."""
    if "b" not in message:
        return None
    bucket = message["b"]
    if not isinstance(bucket, int) or isinstance(bucket, bool) or not 0 <= bucket < BUCKETS:
        raise ProtocolError("nodetable: malformed summary page")
    if not isinstance(message.get("have"), dict):
        raise ProtocolError("nodetable: malformed summary page")
    return bucket


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

    def __init__(self, limit: int, kinds: tuple[str, ...] = KINDS, name: str = "nodetable") -> None:
        self.limit = limit
        self.kinds = kinds
        self.name = name
        self._buf = bytearray()

    @property
    def partial(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while True:
            try:
                parsed = varint.decode(self._buf)
            except varint.VarintError as exc:
                raise ProtocolError(f"{self.name}: bad length prefix: {exc}") from None
            if parsed is None:
                break
            length, offset = parsed
            if length > self.limit:
                raise ProtocolError(f"{self.name}: message of {length} bytes exceeds {self.limit}")
            if len(self._buf) < offset + length:
                break
            body = bytes(self._buf[offset : offset + length])
            del self._buf[: offset + length]
            try:
                message = json.loads(body)
            except ValueError:
                raise ProtocolError(f"{self.name}: message is not JSON") from None
            except RecursionError:  # [[[[...]]]] thousands deep: no ValueError, and it reset the stream as a crash
                raise ProtocolError(f"{self.name}: message nests too deep") from None
            if not isinstance(message, dict) or message.get("t") not in self.kinds:
                raise ProtocolError(f"{self.name}: unknown message")
            out.append(message)
        if not self._buf:
            self._buf = bytearray()  # give back the capacity a large message grew
        return out
