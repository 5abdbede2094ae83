"""The node table sync protocol on ``/ocf/nodetable/2.1.0`` and ``2.0.0`` (messages in :mod:`wire`).

Each node keeps one outbound stream per connected peer: it sends a summary
(in pages under the message limit), then every record and heartbeat the
peer lacks, again whenever its table changes, and a fresh summary once per
verification round.

With membership, on ``/ocf/nodetable/2.1.0``, a record another node made is
*offered* (owner and seq), not pushed: a changed record reaches a node from
every neighbour that got it first, and pushed whole each node received it
about 5 times over during churn (N=300, 5.7 copies per record stored). The
node *wants* it from one offerer at a time; if that one has not delivered
within :data:`WANT_TIMEOUT`, it asks the next that offered it (up to
:data:`WANT_ALTERNATES`), so a silent or lying neighbour delays a record and
cannot withhold it. Our own record and what a peer asked for go whole.

The inbound side reads at most ``--nodetable.max-streams``
streams per peer, and every message that has started must finish within
``--nodetable.message-timeout`` (else the stream is reset), so a peer cannot
pin buffers; summary entries naming owners we hold no record for are
skipped, never kept. What the messages carry is admitted by :mod:`intake`.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from .. import log as logfmt
from ..errors import ProtocolError, TransportError, transport_errors_unwrapped
from ..identity import PeerId
from ..transport.streams import hand_over, receive_before
from . import wire
from .heartbeat import TokenBucket
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
#: A want not answered within this many seconds goes to the next neighbour that offered the record.
WANT_TIMEOUT = 2.0
#: Further offerers remembered per wanted record, to ask in turn.
WANT_ALTERNATES = 3
#: Wants one neighbour may have unanswered: a liar offering invented owners holds this many, no more.
WANTS_PER_PEER = 256


class Sync(Intake):
    def __init__(self, table: NodeTable) -> None:
        super().__init__(table)
        self._inbound: dict[PeerId, int] = {}
        # Per connected peer: our digest's hash when the peer's last digest equalled it.
        self._agreed: dict[PeerId, int] = {}
        # Offers and wants (2.1.0). Per neighbour: owner texts to ask it for, and owners it asked us for.
        self._wants: dict[PeerId, dict[str, None]] = {}
        self._asked: dict[PeerId, set[PeerId]] = {}
        # Records asked for and not yet held, by owner text: [ask next after, seq offered, asked, alternates],
        # and the same in the order they time out (all wait WANT_TIMEOUT), for retry_wants.
        self._wanted: dict[str, list[Any]] = {}
        self._want_order: collections.deque[tuple[float, str]] = collections.deque()
        self._unanswered: collections.Counter[PeerId] = collections.Counter()
        self._retry = trio.Event()
        self._lazy: set[PeerId] = set()  # peers our pusher speaks 2.1.0 to: only those can be sent a want
        # Per neighbour: records it may have us send on request (wants), at the rate we take new owners.
        self._send_buckets: dict[PeerId, TokenBucket] = {}

    async def push(self, peer: PeerId) -> None:
        """Keep ``peer`` up to date over one outbound stream until it or we go away."""
        t = self.t
        try:
            with transport_errors_unwrapped():  # a dial's nursery may group its failures
                stream = await t.host.new_stream(peer, wire.PROTOCOLS)
        except TransportError as exc:
            log.debug("no sync stream %s", logfmt.kv(peer=peer.short(), reason=exc))
            return
        known = t.peer_known.setdefault(peer, {})
        lazy = t.membership is not None and getattr(stream, "protocol", None) == wire.PROTOCOL
        if lazy:
            self._lazy.add(peer)
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
                    await self._send_wants(stream, peer)
                    await self._send_pages(stream, peer)
                    await self._send_missing(stream, peer, known, pending, lazy)
                    if pending or t.page_requests.get(peer) or self._wants.get(peer):
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
                self._lazy.discard(peer)

    def drop_peer(self, peer: PeerId) -> None:
        super().drop_peer(peer)
        self._agreed.pop(peer, None)
        self._wants.pop(peer, None)
        self._asked.pop(peer, None)
        self._lazy.discard(peer)
        self._send_buckets.pop(peer, None)

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

    async def _send_wants(self, stream: Any, peer: PeerId) -> None:
        wants = self._wants.pop(peer, None)
        if not wants:
            return
        texts = list(wants)
        step = max(1, self.t.config.max_message_size // 2 // wire.OFFER_ENTRY_SIZE)
        for i in range(0, len(texts), step):
            await stream.send_all(wire.encode({"t": "want", "o": texts[i : i + step]}))

    def _may_send(self, peer: PeerId) -> bool:
        """Spend one of ``peer``'s tokens for a record it asked for.

        A want costs the asker 60 bytes and us a record (about 1 KB), so a
        peer asking for our whole table over and over would make us a
        traffic amplifier. A joiner's whole table fits the burst
        (``--nodetable.new-owner-burst``, what a receiver takes at once from
        one peer); past it, records go at ``--nodetable.new-owner-rate``.
        """
        cfg = self.t.config
        return self._take(self._send_buckets, peer, cfg.nodetable_new_owner_rate, cfg.nodetable_new_owner_burst)

    async def _pace(self, peer: PeerId) -> None:
        """Wait until ``peer`` has a token again, and spend it."""
        self.t.stats["sends_paced"] += 1
        while not self._may_send(peer):
            bucket = self._send_buckets[peer]
            await trio.sleep(max(0.001, (1.0 - bucket.tokens) / bucket.rate))

    async def _send_offers(self, stream: Any, offers: dict[str, int]) -> None:
        await stream.send_all(wire.encode({"t": "offer", "o": offers}))
        self.t.stats["offers_sent"] += len(offers)

    async def _send_missing(
        self,
        stream: Any,
        peer: PeerId,
        known: dict[PeerId, tuple[int, int]],
        pending: dict[PeerId, None],
        lazy: bool = False,
    ) -> None:
        """Send what ``peer`` may lack among the pending owners: whole, or (``lazy``) as offers.

        Whole go our own record and those the peer asked for; the rest
        are offered.
        """
        t = self.t
        asked = self._asked.pop(peer, None) or ()
        offers: dict[str, int] = {}
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
                if lazy and owner != t.me and owner not in asked:
                    offers[str(owner)] = held
                    if len(offers) * wire.OFFER_ENTRY_SIZE > budget:
                        await self._send_offers(stream, offers)
                        offers = {}
                    continue
                if owner in asked and not self._may_send(peer):
                    if batch:
                        await self._send_records(stream, batch)
                        batch, size = [], 0
                    await self._pace(peer)
                    if owner not in t.records:
                        continue
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
        if offers:
            await self._send_offers(stream, offers)
        if beats:
            await stream.send_all(wire.encode({"t": "beats", "beats": beats}))
        if not known:
            # An emptied dict keeps the table its peak needed: a joiner's neighbours each filled this
            # to about N entries (37 KB at 1,000), for good. clear() gives it back.
            known.clear()

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
        reader = wire.Reader(t.config.max_message_size, wire.kinds_of(getattr(stream, "protocol", None)))
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
                self._resolve_wants(message)
            elif kind == "offer":
                self._on_offer(peer, message, known)
            elif kind == "want":
                self._on_want(peer, message, known)
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
            # Offered too, not sent whole: a joiner exchanges pages with every neighbour at once, and
            # sent whole its table came 1.25 times over (N=300), offered 1.03 (one want per offerer).
            for owner in lacking:
                pending[owner] = None
            if peer not in self._lazy:
                # A 2.0.0 peer gets them whole: its summary asks as a want does, and is paced the same
                # (an empty 50-byte page asked for the whole table, 20 of them for 6,020 records in 2.5 s).
                self._asked.setdefault(peer, set()).update(lacking)
            t.wake()

    # --- offers and wants (2.1.0) ---------------------------------------------------------

    def _on_offer(self, peer: PeerId, message: dict[str, Any], known: dict[PeerId, tuple[int, int]]) -> None:
        """Want what ``peer`` offers and we lack, unless another offerer was asked already (then it is next)."""
        t = self.t
        offers = wire.parse_offer(message)
        can_ask = peer in self._lazy  # a want travels on our own stream to the peer, which must speak 2.1.0
        now = trio.current_time()
        asked_any = False
        for text, seq in offers.items():
            owner = t.known_id(text)
            held = t.records.get(owner) if owner is not None else None
            if held is not None and held >= seq:
                assert owner is not None
                self._knows(peer, known, owner, seq, -1)  # so it is not offered back
                continue
            if not can_ask or owner == peer:
                continue
            entry = self._wanted.get(text)
            if entry is not None and entry[0] > now:
                alternates = entry[3]
                if entry[2] != peer and peer not in alternates and len(alternates) < WANT_ALTERNATES:
                    alternates.append(peer)
                continue
            if entry is not None:
                self._forget_want(text)
            if self._unanswered[peer] >= WANTS_PER_PEER or len(self._wanted) >= t.config.nodetable_max_entries:
                t.stats["wants_refused"] += 1
                t.refuse("wants_full")  # the digest rounds repair what is not asked for now
                continue
            self._ask(peer, text, seq, now, [])
            asked_any = True
        if asked_any:
            t.wake()

    def _ask(self, peer: PeerId, text: str, seq: int, now: float, alternates: list[PeerId]) -> None:
        until = now + WANT_TIMEOUT
        self._wanted[text] = [until, seq, peer, alternates]
        self._want_order.append((until, text))
        self._unanswered[peer] += 1
        self.t.stats["wants_sent"] += 1
        self._wants.setdefault(peer, {})[text] = None
        self._retry.set()

    def _forget_want(self, text: str) -> None:
        entry = self._wanted.pop(text, None)
        if not self._wanted:
            self._wanted.clear()  # give back the table a joiner's wants grew (see _send_missing)
        if entry is not None:
            asked = entry[2]
            left = self._unanswered[asked] - 1
            if left > 0:
                self._unanswered[asked] = left
            else:
                del self._unanswered[asked]

    def _resolve_wants(self, message: dict[str, Any]) -> None:
        """Records that came: a want is done once we hold the seq offered (a lower one leaves it to time out)."""
        if not self._wanted:
            return
        t = self.t
        for item in message["records"]:
            text = item.get("owner") if isinstance(item, dict) else None
            if not isinstance(text, str):
                continue
            entry = self._wanted.get(text)
            if entry is None:
                continue
            owner = t.by_text.get(text)
            if owner is not None and t.records.get(owner, -1) >= entry[1]:
                self._forget_want(text)

    def _on_want(self, peer: PeerId, message: dict[str, Any], known: dict[PeerId, tuple[int, int]]) -> None:
        """Send whole the records ``peer`` asks for (only owners we hold: bounded by the table)."""
        t = self.t
        texts = wire.parse_want(message)
        pending = t.pending.get(peer)
        if pending is None:
            return
        asked = self._asked.setdefault(peer, set())
        for text in texts:
            owner = t.by_text.get(text)
            if owner is not None and owner != peer:
                asked.add(owner)
                pending[owner] = None
                known.pop(owner, None)
        if texts:
            t.wake()

    async def retry_wants(self) -> None:
        """Ask the next offerer for each record whose want timed out; drop wants no one else offered."""
        order = self._want_order
        while True:
            await self._retry.wait()
            self._retry = trio.Event()
            while order:
                until, text = order[0]
                now = trio.current_time()
                if until > now:
                    await trio.sleep_until(until)
                    continue
                order.popleft()
                entry = self._wanted.get(text)
                if entry is None or entry[0] != until:
                    continue  # answered, or asked again since
                self._forget_want(text)
                alternates = [p for p in entry[3] if p in self._lazy]
                if alternates:
                    self.t.stats["wants_retried"] += 1
                    self._ask(alternates[0], text, entry[1], now, alternates[1:])
                    self.t.wake()
