"""The node table sync protocol on ``/ocf/nodetable/2.0.0`` (messages in :mod:`wire`).

Each node keeps one outbound stream per connected peer: it sends a summary
(in pages under the message limit), then every record and heartbeat the
peer lacks, again whenever its table changes, and a fresh summary once per
verification round. The inbound side reads at most ``--nodetable.max-streams``
streams per peer, and every message that has started must finish within
``--nodetable.message-timeout`` (else the stream is reset), so a peer cannot
pin buffers; summary entries naming owners we hold no record for are
skipped, never kept. What the messages carry is admitted by :mod:`intake`.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from .. import log as logfmt
from ..errors import ProtocolError, TransportError, transport_errors_unwrapped
from ..identity import PeerId
from ..transport.streams import hand_over, receive_before
from . import wire
from .intake import Intake

if TYPE_CHECKING:
    from .table import NodeTable

log = logging.getLogger("ocf.nodetable")

RECEIVE = 65536
#: Soonest a pusher sends an early digest after membership named someone we hold no record of.
DIGEST_MIN_INTERVAL = 1.0
#: Bytes a heartbeat costs in a beats message (owner text, time, signature hex, separators).
BEAT_SIZE = 220
#: With membership, a round's digest is skipped while both sides already agree (see Sync.push), but
#: one goes at least every this many rounds anyway.
DIGEST_EVERY_ROUNDS = 10


class Sync(Intake):
    def __init__(self, table: NodeTable) -> None:
        super().__init__(table)
        self._inbound: dict[PeerId, int] = {}
        # Per connected peer: our digest's hash when the peer's last digest equalled it.
        self._agreed: dict[PeerId, int] = {}

    async def push(self, peer: PeerId) -> None:
        """Keep ``peer`` up to date over one outbound stream until it or we go away."""
        t = self.t
        try:
            with transport_errors_unwrapped():  # a dial's nursery may group its failures
                stream = await t.host.new_stream(peer, wire.PROTOCOL)
        except TransportError as exc:
            log.debug("no sync stream %s", logfmt.kv(peer=peer.short(), reason=exc))
            return
        known = t.peer_known.setdefault(peer, {})
        # With membership the peer's digest says what it lacks; without, everything may be news.
        pending = t.pending[peer] = dict.fromkeys(t.records) if t.membership is None else {}
        sent: int | None = None  # the digest last sent to this peer (its hash), with membership
        skipped = 0
        try:
            async with stream:
                sent = await self._send_summary(stream)
                last_summary = trio.current_time()
                while True:
                    version = t.version
                    await self._send_pages(stream, peer)
                    await self._send_missing(stream, peer, known, pending)
                    if pending or t.page_requests.get(peer):
                        continue  # more changed while we were sending (its wake-up is already spent)
                    if t.departing:  # our "left" is sent: wait until the peer has read it, then end
                        await hand_over(stream)
                        return
                    t.flushed(peer, version)
                    due = last_summary + t.config.verify_interval
                    if t._digest_due and t.membership is not None:
                        due = min(due, last_summary + DIGEST_MIN_INTERVAL)
                    if trio.current_time() < due:  # a busy table must not starve the periodic round
                        with trio.move_on_at(due):
                            await t.wait_changed()
                            continue
                    # Repair, once per interval. With membership, not while both sides agree: we sent
                    # this very digest and the peer's last one equalled it. Either side's next change
                    # changes its digest, and it sends that: at rest this was 60% of a node's bytes.
                    early = t._digest_due
                    if (
                        t.membership is not None
                        and not early
                        and sent == self._digest_key()
                        and self._agreed.get(peer) == sent
                        and skipped < DIGEST_EVERY_ROUNDS - 1
                    ):
                        skipped += 1
                        t.stats["digests_skipped"] += 1
                    else:
                        skipped = 0
                        sent = await self._send_summary(stream)
                    last_summary = trio.current_time()
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("sync stream ended %s", logfmt.kv(peer=peer.short(), reason=exc or type(exc).__name__))
        finally:
            if t.pending.get(peer) is pending:
                del t.pending[peer]

    def drop_peer(self, peer: PeerId) -> None:
        super().drop_peer(peer)
        self._agreed.pop(peer, None)

    def _digest_key(self) -> int:
        return hash(tuple(self.t.digest))

    async def _send_summary(self, stream: Any) -> int | None:
        """Send our digest (with membership; returns its hash) or our whole summary in pages (None)."""
        t = self.t
        if t.membership is not None:
            t._digest_due = False
            key = self._digest_key()
            await stream.send_all(wire.encode(wire.digest_message(t.digest)))
            return key
        items = []
        for text in t.sorted_texts():
            owner = t.by_text[text]
            beat = t.beats.get(owner)
            items.append((text, t.records[owner], beat.ms if beat is not None else -1))
        for page in wire.summary_pages(items, t.config.max_message_size // 2):
            await stream.send_all(wire.encode(page))
        return None

    async def _send_pages(self, stream: Any, peer: PeerId) -> None:
        """Answer a peer's digest: one summary page per bucket it disagreed on."""
        t = self.t
        requested = t.page_requests.pop(peer, None)
        for bucket, reply in sorted((requested or {}).items()):
            have = {}
            for text in t.buckets[bucket]:
                owner = t.by_text[text]
                have[text] = [t.records[owner], -1]
            # "r": the receiver answers with its own page, so each side learns what the other lacks.
            await stream.send_all(wire.encode({"t": "summary", "b": bucket, "r": reply, "have": have}))

    async def _send_missing(
        self, stream: Any, peer: PeerId, known: dict[PeerId, tuple[int, int]], pending: dict[PeerId, None]
    ) -> None:
        t = self.t
        budget = t.config.max_message_size // 2
        horizon = t.clock() - t.config.stale_after
        batch: list[dict[str, Any]] = []
        size = 0
        beats: dict[str, Any] = {}
        owners = sorted(pending, key=t.shelf_of)  # records are read back a shelf at a time
        pending.clear()
        lasting = t.membership is None  # see Intake._knows: with membership, kept only while pending
        for owner in owners:
            k_seq, k_ms = known.get(owner, (-1, -1)) if lasting else known.pop(owner, (-1, -1))
            held = t.records.get(owner)  # its seq
            if owner == peer or held is None:
                continue
            beat = t.beats.get(owner)
            ms = beat.ms if beat is not None else -1
            if held > k_seq:
                if (
                    owner != t.me
                    and t.seen_at(owner) < horizon
                    and not t.host.is_connected(owner)
                    and not t._member_alive(owner)
                ):
                    continue  # stale: the peer would refuse it, and it will be pruned here too
                record = t.record(owner)
                if record is None:
                    continue  # its body is gone from the store (damaged?): the owner will resend it
                item = record.to_wire()
                if beat is not None:
                    item["hb"] = beat.to_wire()
                item_size = len(item["doc"]) + 500
                if item_size > t.config.max_message_size - 64:
                    continue  # cannot travel at this message limit
                if batch and size + item_size > budget:
                    await self._send_records(stream, batch)
                    batch, size = [], 0
                    if owner not in t.records:
                        continue
                batch.append(item)
                size += item_size
                if lasting:
                    known[owner] = (record.seq, ms)
            elif ms > k_ms and t.membership is None:
                assert beat is not None
                if len(beats) * BEAT_SIZE > budget:
                    await stream.send_all(wire.encode({"t": "beats", "beats": beats}))
                    beats = {}
                    if owner not in t.records:
                        continue
                beats[str(owner)] = beat.to_wire()
                known[owner] = (k_seq, ms)
        if batch:
            await self._send_records(stream, batch)
        if beats:
            await stream.send_all(wire.encode({"t": "beats", "beats": beats}))

    async def _send_records(self, stream: Any, batch: list[dict[str, Any]]) -> None:
        await stream.send_all(wire.encode({"t": "records", "records": batch}))
        self.t.stats["records_sent"] += len(batch)

    # --- inbound --------------------------------------------------------------------------

    async def handle(self, stream: Any) -> None:
        """Apply what a peer pushes to us. A protocol violation or a budget overrun ends only this stream."""
        t = self.t
        peer = stream.remote_peer
        if self._inbound.get(peer, 0) >= t.config.nodetable_max_streams:
            t.stats["streams_refused"] += 1
            t.refuse("extra_stream")
            stream.reset()
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        reader = wire.Reader(t.config.max_message_size)
        known = t.peer_known.setdefault(peer, {})
        deadline = math.inf
        try:
            while True:
                data = await receive_before(stream, deadline, RECEIVE)
                if data is None:
                    t.stats["streams_timed_out"] += 1
                    t.refuse("message_timeout")
                    stream.reset()
                    return
                if not data:
                    return
                got = await self._apply(peer, reader.feed(data), known)
                if not reader.partial:
                    deadline = math.inf
                elif got or deadline == math.inf:
                    deadline = trio.current_time() + t.config.nodetable_message_timeout
        except ProtocolError as exc:
            t.refuse("bad_message")
            log.debug("bad node table message %s", logfmt.kv(peer=peer.short(), reason=exc))
            stream.reset()
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            left = self._inbound.get(peer, 1) - 1
            if left:
                self._inbound[peer] = left
            else:
                self._inbound.pop(peer, None)
                if not t.host.is_connected(peer):
                    t.drop_peer(peer)

    async def _apply(self, peer: PeerId, messages: list[dict[str, Any]], known: dict[PeerId, tuple[int, int]]) -> int:
        """Apply decoded messages; returns how many. In a frame of its own: none is kept while the stream waits
        (a digest is 64 strings, 4 KB, per stream)."""
        t = self.t
        for message in messages:
            t.stats["sync_rounds"] += 1
            kind = message["t"]
            if kind == "summary":
                self._on_summary(peer, message, known)
            elif kind == "digest":
                self._on_digest(peer, message)
            elif kind == "records":
                await self._on_records(peer, message, known)
            else:
                await self._on_beats(peer, message, known)
        return len(messages)

    def _on_digest(self, peer: PeerId, message: dict[str, Any]) -> None:
        t = self.t
        theirs = wire.parse_digest(message)
        t.saw(peer, t.clock())
        differ = [b for b in range(wire.BUCKETS) if theirs[b] != t.digest[b]]
        if differ:
            self._agreed.pop(peer, None)
        else:
            self._agreed[peer] = self._digest_key()
        if differ and peer in t.pending:  # only a connected peer's pusher can answer
            requests = t.page_requests.setdefault(peer, {})
            for b in differ:
                requests[b] = True
            t.wake()

    def _on_summary(self, peer: PeerId, message: dict[str, Any], known: dict[PeerId, tuple[int, int]]) -> None:
        t = self.t
        bucket = wire.page_bucket(message)
        lo, hi = ("", None) if bucket is not None else wire.page_range(message)
        have = message["have"]
        by_liveness = t.membership is None
        t.saw(peer, t.clock())
        lacking: list[PeerId] = []
        for text, pair in have.items():
            owner = t.by_text.get(text)
            if owner is None:
                continue  # never retained: if the peer holds a record we lack, it pushes it
            try:
                seq, ms = int(pair[0]), int(pair[1])
            except (TypeError, ValueError, IndexError, KeyError):
                raise ProtocolError("nodetable: malformed summary") from None
            self._knows(peer, known, owner, seq, ms)
            beat = t.beats.get(owner)
            if t.records[owner] > seq or (by_liveness and beat is not None and beat.ms > ms):
                lacking.append(owner)
        texts = t.buckets[bucket] if bucket is not None else wire.in_range(t.sorted_texts(), lo, hi)
        for text in texts:
            if text not in have:
                owner = t.by_text[text]
                if owner != peer:
                    known.pop(owner, None)
                    lacking.append(owner)
        pending = t.pending.get(peer)
        if bucket is not None and message.get("r") is True and pending is not None:
            t.page_requests.setdefault(peer, {}).setdefault(bucket, False)
            t.wake()
        if lacking and pending is not None:
            for owner in lacking:
                pending[owner] = None
            t.wake()
