"""The node table sync protocol on ``/ocf/nodetable/1.0.0`` (messages in :mod:`wire`).

Each node keeps one outbound stream per connected peer: it sends a summary
(in pages under the message limit), then every record and heartbeat the
peer lacks, again whenever its table changes, and a fresh summary once per
verification round. The inbound side applies what a peer pushes, within the
peer's budgets:

- at most ``--nodetable.max-streams`` inbound streams per peer, and every
  message that has started must finish within ``--nodetable.message-timeout``
  (else the stream is reset), so a peer cannot pin buffers;
- new owners cost a token of the peer's new-owner bucket and a place in the
  table (or an evictable stale one); signature checks cost a token of its
  verify bucket. What is refused is not remembered: the next summary shows
  the peer we still lack it, and it sends it again.
- summary entries naming owners we hold no record for are skipped, never kept.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import trio

from .. import log as logfmt
from ..errors import ProtocolError, TransportError, ValidationError
from ..identity import PeerId
from . import wire
from .heartbeat import FUTURE_SKEW_MS, Heartbeat, TokenBucket
from .record import Record

if TYPE_CHECKING:
    from .table import NodeTable

log = logging.getLogger("ocf.nodetable")

RECEIVE = 65536
#: Bytes a heartbeat costs in a beats message (owner text, time, signature hex, separators).
BEAT_SIZE = 220
#: Signature checks (60-300 µs each) between two yields to the event loop, so that a message
#: full of them never stalls the node's other work for long.
VERIFY_SLICE = 32


class Sync:
    def __init__(self, table: "NodeTable") -> None:
        self.t = table
        self._inbound: dict[PeerId, int] = {}
        self._owner_buckets: dict[PeerId, TokenBucket] = {}
        self._verify_buckets: dict[PeerId, TokenBucket] = {}
        self._work = 0  # signature checks since the last yield

    def drop_peer(self, peer: PeerId) -> None:
        self._owner_buckets.pop(peer, None)
        self._verify_buckets.pop(peer, None)

    def _take(self, buckets: dict[PeerId, TokenBucket], peer: PeerId, rate: float, burst: float) -> bool:
        now = trio.current_time()
        bucket = buckets.get(peer)
        if bucket is None:
            bucket = buckets[peer] = TokenBucket.full(rate, burst, now)
        return bucket.take(now)

    def _may_verify(self, peer: PeerId) -> bool:
        rate = self.t.config.nodetable_verify_rate
        if self._take(self._verify_buckets, peer, rate, 2 * rate):
            self._work += 1
            return True
        self.t.stats["deferred_verify"] += 1
        self.t.refusals.note("verify_budget")
        return False

    async def _yield_if_busy(self) -> None:
        if self._work >= VERIFY_SLICE:
            self._work = 0
            await trio.sleep(0)

    def _may_add_owner(self, peer: PeerId) -> bool:
        cfg = self.t.config
        return self._take(self._owner_buckets, peer, cfg.nodetable_new_owner_rate, cfg.nodetable_new_owner_burst)

    # --- outbound -------------------------------------------------------------------------

    async def push(self, peer: PeerId) -> None:
        """Keep ``peer`` up to date over one outbound stream until it or we go away."""
        t = self.t
        try:
            stream = await t.host.new_stream(peer, wire.PROTOCOL)
        except TransportError as exc:
            log.debug("no sync stream %s", logfmt.kv(peer=peer.short(), reason=exc))
            return
        known = t.peer_known.setdefault(peer, {})
        pending = t.pending[peer] = dict.fromkeys(t.records)
        try:
            async with stream:
                await self._send_summary(stream)
                last_summary = trio.current_time()
                while True:
                    version = t.version
                    await self._send_missing(stream, peer, known, pending)
                    if pending:
                        continue  # more changed while we were sending (its wake-up is already spent)
                    t.flushed(peer, version)
                    with trio.move_on_at(last_summary + t.config.verify_interval):
                        await t.wait_changed()
                        continue
                    await self._send_summary(stream)  # liveness and repair, once per interval
                    last_summary = trio.current_time()
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("sync stream ended %s", logfmt.kv(peer=peer.short(), reason=exc or type(exc).__name__))
        finally:
            if t.pending.get(peer) is pending:
                del t.pending[peer]

    async def _send_summary(self, stream: Any) -> None:
        t = self.t
        items = []
        for text in t.sorted_texts():
            owner = t.by_text[text]
            beat = t.beats.get(owner)
            items.append((text, t.records[owner].seq, beat.ms if beat is not None else -1))
        for page in wire.summary_pages(items, t.config.max_message_size // 2):
            await stream.send_all(wire.encode(page))

    async def _send_missing(self, stream: Any, peer: PeerId, known: dict[PeerId, tuple[int, int]], pending: dict[PeerId, None]) -> None:
        t = self.t
        budget = t.config.max_message_size // 2
        horizon = t.clock() - t.config.stale_after
        batch: list[dict[str, Any]] = []
        size = 0
        beats: dict[str, Any] = {}
        owners = list(pending)
        pending.clear()
        for owner in owners:
            record = t.records.get(owner)
            if owner == peer or record is None:
                continue
            k_seq, k_ms = known.get(owner, (-1, -1))
            beat = t.beats.get(owner)
            ms = beat.ms if beat is not None else -1
            if record.seq > k_seq:
                if owner != t.me and t.seen_at(owner) < horizon and not t.host.is_connected(owner):
                    continue  # stale: the peer would refuse it, and it will be pruned here too
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
                known[owner] = (record.seq, ms)
            elif ms > k_ms:
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
            t.refusals.note("extra_stream")
            stream.reset()
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        reader = wire.Reader(t.config.max_message_size)
        known = t.peer_known.setdefault(peer, {})
        deadline = math.inf
        try:
            while True:
                data = None
                with trio.move_on_at(deadline):
                    data = await stream.receive_some(RECEIVE)
                if data is None:
                    t.stats["streams_timed_out"] += 1
                    t.refusals.note("message_timeout")
                    stream.reset()
                    return
                if not data:
                    return
                messages = reader.feed(data)
                for message in messages:
                    t.stats["sync_rounds"] += 1
                    kind = message["t"]
                    if kind == "summary":
                        self._on_summary(peer, message, known)
                    elif kind == "records":
                        await self._on_records(peer, message, known)
                    else:
                        await self._on_beats(peer, message, known)
                if not reader.partial:
                    deadline = math.inf
                elif messages or deadline == math.inf:
                    deadline = trio.current_time() + t.config.nodetable_message_timeout
        except ProtocolError as exc:
            t.refusals.note("bad_message")
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

    def _on_summary(self, peer: PeerId, message: dict[str, Any], known: dict[PeerId, tuple[int, int]]) -> None:
        t = self.t
        lo, hi = wire.page_range(message)
        have = message["have"]
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
            known[owner] = (seq, ms)
            beat = t.beats.get(owner)
            if t.records[owner].seq > seq or (beat is not None and beat.ms > ms):
                lacking.append(owner)
        for text in wire.in_range(t.sorted_texts(), lo, hi):
            if text not in have:
                owner = t.by_text[text]
                if owner != peer:
                    known.pop(owner, None)
                    lacking.append(owner)
        pending = t.pending.get(peer)
        if lacking and pending is not None:
            for owner in lacking:
                pending[owner] = None
            t.wake()

    async def _on_beats(self, peer: PeerId, message: dict[str, Any], known: dict[PeerId, tuple[int, int]]) -> None:
        beats = message.get("beats")
        if not isinstance(beats, dict):
            raise ProtocolError("nodetable: beats message without a map")
        t = self.t
        changed = False
        for text, obj in beats.items():
            owner = t.by_text.get(text)
            if owner is None:
                continue
            try:
                beat = Heartbeat.from_wire(owner, obj)
            except ValidationError:
                raise ProtocolError("nodetable: malformed heartbeat") from None
            changed |= self._take_beat(peer, beat, known)
            await self._yield_if_busy()
        if changed:
            t._bump()

    def _take_beat(self, peer: PeerId, beat: Heartbeat, known: dict[PeerId, tuple[int, int]]) -> bool:
        """Accept a heartbeat if it is newer than ours, not from the future, within budget and signed."""
        t = self.t
        owner = beat.owner
        k_seq, k_ms = known.get(owner, (-1, -1))
        known[owner] = (k_seq, max(k_ms, beat.ms))
        held = t.beats.get(owner)
        if owner == t.me or (held is not None and held.ms >= beat.ms):
            return False
        now = t.clock()
        if beat.ms > now * 1000 + FUTURE_SKEW_MS:
            t.stats["heartbeats_rejected"] += 1
            t.refusals.note("future_heartbeat")
            return False
        if not self._may_verify(peer):
            return False
        if not beat.verify():
            t.stats["heartbeats_rejected"] += 1
            t.refusals.note("forged_heartbeat")
            # An honest relay passes on only heartbeats it verified: this peer is lying.
            raise ProtocolError(f"nodetable: heartbeat of {owner.short()} is not signed by it")
        t.set_beat(beat)
        t.saw(owner, min(beat.seconds, now))
        t.stats["heartbeats_accepted"] += 1
        return True

    async def _on_records(self, peer: PeerId, message: dict[str, Any], known: dict[PeerId, tuple[int, int]]) -> None:
        items = message.get("records")
        if not isinstance(items, list):
            raise ProtocolError("nodetable: records message without a list")
        t = self.t
        accepted: list[Record] = []
        pool: list[PeerId] | None = None  # eviction candidates for relayed newcomers, computed once
        forged: ProtocolError | None = None
        beats_changed = False
        for item in items:
            await self._yield_if_busy()
            now = t.clock()
            try:
                record = Record.from_wire(item)
                beat = Heartbeat.from_wire(record.owner, item["hb"]) if isinstance(item, dict) and "hb" in item else None
            except ValidationError as exc:
                self._reject(peer, None, exc)
                continue
            owner = record.owner
            current = t.records.get(owner)
            if current is not None and current.seq >= record.seq:
                known[owner] = (record.seq, known.get(owner, (-1, -1))[1])
            elif owner == t.me:
                # An older incarnation of us (e.g. before --cleanslate) published newer
                # versions: continue their numbering and republish what is true now.
                if self._may_verify(peer) and self._verified(peer, record) is not None:
                    t.republish_own(record.seq + 1)
                continue
            elif current is not None:
                if not self._may_verify(peer):
                    continue
                doc = self._verified(peer, record)
                if doc is None:
                    continue
                t.insert(record, doc)
                accepted.append(record)
                known[owner] = (record.seq, known.get(owner, (-1, -1))[1])
            else:
                direct = owner == peer or t.host.is_connected(owner)
                victim: PeerId | None = None
                if t.is_full():
                    if direct:
                        candidates = t.evictable(now, direct=True)
                    else:
                        if pool is None:
                            pool = t.evictable(now, direct=False)
                        candidates = pool
                    while candidates and candidates[-1] not in t.records:
                        candidates.pop()
                    if not candidates:
                        if not direct:  # direct peers always have room, even past the maximum
                            self._refuse(peer, "full")
                            continue
                    else:
                        victim = candidates[-1]
                if not direct:
                    if beat is None or beat.seconds < now - t.config.stale_after or beat.ms > now * 1000 + FUTURE_SKEW_MS:
                        self._refuse(peer, "stale")
                        continue
                    if not self._may_add_owner(peer):
                        self._refuse(peer, "rate")
                        continue
                    if not self._may_verify(peer):
                        continue
                    if not beat.verify():
                        t.stats["heartbeats_rejected"] += 1
                        forged = ProtocolError(f"nodetable: heartbeat of {owner.short()} is not signed by it")
                        break
                elif not self._may_verify(peer):
                    continue
                doc = self._verified(peer, record)
                if doc is None:
                    continue
                if victim is not None and victim in t.records:
                    if pool is not None and pool and pool[-1] == victim:
                        pool.pop()
                    t.evict(victim)
                t.insert(record, doc)
                accepted.append(record)
                known[owner] = (record.seq, -1)
                t.saw(owner, now if direct else min(beat.seconds, now) if beat is not None else 0.0)
                if beat is not None and not direct:
                    t.set_beat(beat)
                self._learn_addrs(owner, doc)
            if beat is not None and owner in t.records and owner != t.me:
                try:
                    beats_changed |= self._take_beat(peer, beat, known)
                except ProtocolError as exc:
                    forged = exc
                    break
        # What was forgotten (pruned, evicted) while we yielded must not reach the disk.
        accepted = [record for record in accepted if t.records.get(record.owner) is record]
        if accepted:
            t.store_records(accepted)
            t.stats["records_received"] += len(accepted)
            log.debug("node table updated %s", logfmt.kv(peer=peer.short(), records=len(accepted)))
        if accepted or beats_changed:
            t._bump()
        if forged is not None:
            raise forged

    def _verified(self, peer: PeerId, record: Record) -> Any:
        try:
            return self.t.verify_record(record)
        except ValidationError as exc:
            self._reject(peer, record.owner, exc)
            return None

    def _learn_addrs(self, owner: PeerId, doc: Any) -> None:
        add_addrs = getattr(self.t.host, "add_addrs", None)
        if add_addrs is None:
            return
        from ..identity import Multiaddr

        texts = doc.to_dict().get("addrs")
        if not isinstance(texts, list):
            return
        addrs = []
        for text in texts[:16]:
            try:
                addrs.append(Multiaddr.parse(text).without_p2p())
            except Exception:  # noqa: BLE001 - a peer's bad address is its problem
                continue
        add_addrs(owner, addrs)

    def _refuse(self, peer: PeerId, reason: str) -> None:
        self.t.stats["refused_" + reason] += 1
        self.t.refusals.note(reason)

    def _reject(self, peer: PeerId, owner: PeerId | None, exc: Exception) -> None:
        self.t.stats["records_rejected"] += 1
        self.t.refusals.note("bad_record")
        log.debug(
            "rejected node table record %s",
            logfmt.kv(from_peer=peer.short(), owner=owner.short() if owner else "?", reason=exc),
        )
