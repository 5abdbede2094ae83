"""What a peer pushes to us, admitted within that peer's budgets (records and heartbeats).

A record of a new owner costs the sending peer a token of its new-owner
bucket and a place in the table (or the place of an entry no longer fresh);
one relayed by a third peer must carry a heartbeat its owner signed within
``--stale-after``. Every signature check costs a token of the peer's verify
bucket and one of the node's (all peers together: identities are cheap), and
the event loop gets a turn every few checks. What is refused is
not remembered: the receiver's next summary shows the sender what it still
lacks, and it is sent again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from .. import log as logfmt
from ..errors import ProtocolError, ValidationError
from ..identity import PeerId
from .heartbeat import FUTURE_SKEW_MS, TOTAL_VERIFY_BURST, Heartbeat, TokenBucket, take_both
from .record import Record
import trio.lowlevel

if TYPE_CHECKING:
    from .table import NodeTable

log = logging.getLogger("ocf.nodetable")

#: Signature checks (a public-key operation each, the costliest step here) between two yields to
#: the event loop, so that a message full of them never stalls the node's other work for long.
VERIFY_SLICE = 32


class Intake:
    def __init__(self, table: NodeTable) -> None:
        self.t = table
        self._owner_buckets: dict[PeerId, TokenBucket] = {}
        self._verify_buckets: dict[PeerId, TokenBucket] = {}
        # All peers' checks together: identities cost an attacker one key each, and each had a budget of
        # its own, so six of them kept this node's one thread busy checking lies (12,000 in 1.8 s).
        self._verify_total: TokenBucket | None = None
        self._work = 0  # signature checks since the last yield

    def drop_peer(self, peer: PeerId) -> None:
        self._owner_buckets.pop(peer, None)
        self._verify_buckets.pop(peer, None)

    def _take(self, buckets: dict[PeerId, TokenBucket], peer: PeerId, rate: float, burst: float) -> bool:
        now = trio.current_time()
        return _bucket(buckets, peer, rate, burst, now).take(now)

    def _may_verify(self, peer: PeerId) -> bool:
        """Spend a signature check from ``peer``'s budget and from the node's (all peers together)."""
        rate = self.t.config.nodetable_verify_rate
        now = trio.current_time()
        bucket = _bucket(self._verify_buckets, peer, rate, 2 * rate, now)
        if self._verify_total is None:
            total = self.t.config.nodetable_verify_total
            self._verify_total = TokenBucket.full(total, TOTAL_VERIFY_BURST * total, now)
        if take_both(bucket, self._verify_total, now):
            self._work += 1
            return True
        self.t.stats["deferred_verify"] += 1
        self.t.refuse("verify_budget")
        return False

    async def _yield_if_busy(self) -> None:
        if self._work >= VERIFY_SLICE:
            self._work = 0
            await trio.lowlevel.checkpoint()

    def _knows(self, peer: PeerId, known: dict[PeerId, tuple[int, int]], owner: PeerId, seq: int, ms: int) -> None:
        """Note that ``peer`` holds ``owner``'s record ``seq`` (and heartbeat ``ms``), so it is not sent back.

        Without membership every owner's heartbeat is pushed on, and this is
        kept for every owner. With membership only records travel, and this
        saves a send only while that owner is pending for that peer: it is
        kept then only, and the pusher drops it as it takes the owner
        (:meth:`Sync._send_missing`). Kept for good, a node with D peers
        and N entries held D x N of these (0.3 KB per entry at N=150).
        """
        if self.t.membership is not None:
            pending = self.t.pending.get(peer)
            if pending is None or owner not in pending:
                return
        known[owner] = (seq, ms)

    def _may_add_owner(self, peer: PeerId) -> bool:
        cfg = self.t.config
        return self._take(self._owner_buckets, peer, cfg.nodetable_new_owner_rate, cfg.nodetable_new_owner_burst)

    # --- outbound -------------------------------------------------------------------------

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
        self._knows(peer, known, owner, k_seq, max(k_ms, beat.ms))
        held = t.beats.get(owner)
        if owner == t.me or (held is not None and held.ms >= beat.ms):
            return False
        now = t.clock()
        if beat.ms > now * 1000 + FUTURE_SKEW_MS:
            t.stats["heartbeats_rejected"] += 1
            t.refuse("future_heartbeat")
            return False
        if not self._may_verify(peer):
            return False
        if not beat.verify():
            t.stats["heartbeats_rejected"] += 1
            t.refuse("forged_heartbeat")
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
        beats_changed = False
        try:
            forged, beats_changed = await self._admit(peer, items, known, accepted)
        finally:
            # What is held is offered on at once, from memory, even when a cancel cut the batch short.
            if accepted or beats_changed:
                t._bump()
        stored = await t.wait_stored(accepted)  # the peer's next message waits until these are on disk
        if stored:
            t.stats["records_received"] += stored
            log.debug("node table updated %s", logfmt.kv(peer=peer.short(), records=stored))
        if forged is not None:
            raise forged

    async def _admit(
        self, peer: PeerId, items: list[Any], known: dict[PeerId, tuple[int, int]], accepted: list[Record]
    ) -> tuple[ProtocolError | None, bool]:
        """Verify and hold what ``items`` brings, appending each record held to ``accepted``.

        Returns the forgery that ends the batch, if any, and whether a heartbeat changed.
        """
        t = self.t
        pool: list[PeerId] | None = None  # eviction candidates for relayed newcomers, computed once
        forged: ProtocolError | None = None
        beats_changed = False
        for item in items:
            await self._yield_if_busy()
            now = t.clock()
            try:
                record = Record.from_wire(item, t.known_id)
                beat = (
                    Heartbeat.from_wire(record.owner, item["hb"]) if isinstance(item, dict) and "hb" in item else None
                )
            except ValidationError as exc:
                self._reject(peer, None, exc)
                continue
            owner = record.owner
            current = t.records.get(owner)
            if current is not None and current >= record.seq:
                self._knows(peer, known, owner, record.seq, known.get(owner, (-1, -1))[1])
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
                self._knows(peer, known, owner, record.seq, known.get(owner, (-1, -1))[1])
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
                # Membership vouches for a living owner by its signed alive; else its heartbeat must.
                vouched = not direct and t._member_alive(owner)
                if not direct:
                    if not vouched and (
                        beat is None
                        or beat.seconds < now - t.config.stale_after
                        or beat.seconds <= t.lost_at.get(owner, 0.0)  # signed before we lost it: no news of it since
                        or beat.ms > now * 1000 + FUTURE_SKEW_MS
                    ):
                        if beat is None and t.membership is not None and t.membership.status(owner) is None:
                            # An owner membership has not heard of yet: its record outran its "alive" (a
                            # neighbour holds it directly, so sends no heartbeat). Early, not stale: put off,
                            # quietly; membership's news of it makes us compare digests, and it comes again.
                            t.stats["deferred_unknown_owner"] += 1
                            continue
                        self._refuse(peer, "stale")
                        continue
                    if not self._may_add_owner(peer):
                        self._refuse(peer, "rate")
                        continue
                    if not self._may_verify(peer):
                        continue
                    if not vouched and beat is not None and not beat.verify():
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
                self._knows(peer, known, owner, record.seq, -1)
                t.saw(owner, now if direct or vouched else min(beat.seconds, now) if beat is not None else 0.0)
                if beat is not None and not direct and not vouched:
                    t.set_beat(beat)
            if beat is not None and owner in t.records and owner != t.me and (t.membership is None or owner == peer):
                try:
                    beats_changed |= self._take_beat(peer, beat, known)
                except ProtocolError as exc:
                    forged = exc
                    break
        return forged, beats_changed

    def _verified(self, peer: PeerId, record: Record) -> Any:
        try:
            return self.t.verify_record(record)
        except ValidationError as exc:
            self._reject(peer, record.owner, exc)
            return None

    def _refuse(self, peer: PeerId, reason: str) -> None:
        self.t.stats["refused_" + reason] += 1
        self.t.refuse(reason)

    def _reject(self, peer: PeerId, owner: PeerId | None, exc: Exception) -> None:
        self.t.stats["records_rejected"] += 1
        self.t.refuse("bad_record")
        log.debug(
            "rejected node table record %s",
            logfmt.kv(from_peer=peer.short(), owner=owner.short() if owner else "?", reason=exc),
        )


def _bucket(buckets: dict[PeerId, TokenBucket], peer: PeerId, rate: float, burst: float, now: float) -> TokenBucket:
    """``peer``'s bucket in ``buckets``, made full on first use."""
    bucket = buckets.get(peer)
    if bucket is None:
        bucket = buckets[peer] = TokenBucket.full(rate, burst, now)
    return bucket
