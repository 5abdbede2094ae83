"""The node table service: owns the records, persists them, admits and expires entries.

Thin Trio code around the pure pieces in :mod:`record`, :mod:`entry`,
:mod:`heartbeat` and :mod:`wire`; the sync protocol itself lives in
:mod:`sync`. Every accepted record is held in memory and offered to every
other peer at once — that is how a change crosses any number of hops — and
written to LMDB by one task, in a worker thread, a bounded number to a
transaction (see :meth:`NodeTable._write_loop`).

Every peer may be hostile, so the table is bounded: at most
``--nodetable.max-entries`` owners (our own and directly connected peers'
entries always have room, by evicting the longest-unseen other entry), and
an owner not seen for ``--stale-after`` — no heartbeat it signed, no direct
contact — is forgotten everywhere, in memory and on disk. Nothing is ever
kept about an owner we hold no record for.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any
from collections.abc import AsyncIterator, Sequence

import trio

from .. import log as logfmt
from ..errors import IdentityError, StoreError, TransportError, ValidationError
from ..identity import PeerId
from .docguard import DocLimits
from .entry import detect_hardware, validate_update
from .heartbeat import Heartbeat
from . import shelf
from .record import OwnerDoc, Record
from .rows import LastSeen, Seqs
from .sync import Sync
from .wire import BUCKETS, PROTOCOL, PROTOCOLS
from ..membership.update import Status, bucket_add, bucket_discard, bucket_of, state_hash
import trio.lowlevel

if TYPE_CHECKING:
    from ..config import Config
    from ..membership.driver import Membership
    from ..identity import Identity
    from ..store import Store
    from ..transport.host import Host

log = logging.getLogger("ocf.nodetable")

DB = "nodetable"
COMPACT_AFTER = 64  # own document changes before it is rewritten with a one-change history
GONE = ("left", "offline")
#: Owners the sweep forgets per step (it yields to the event loop between steps; LMDB writes them
#: shelf.SHELVES_PER_TXN shelves to a transaction).
PRUNE_BATCH = 512
DEPARTURE_BUDGET = 1.0  # seconds a leaving node waits for its peers to confirm its "left" record
#: Refusals are summed and logged at most this often.
SWEEP_EVERY = 10.0  # seconds between prune sweeps at most
#: With membership, how long a peer's heartbeat (signed once, at its start) is kept to go with its
#: record: while the record is news, to peers whose membership has not heard of the peer yet (they
#: take a relayed record only from an owner that something it signed says is alive). By then every
#: membership has; a joiner learns the members from its first neighbour's pages before the records,
#: and an owner it meets later makes it compare table digests again. Kept past that, beats were
#: 0.2 KB a peer for nothing.
BEAT_RELAY_FOR = 60.0
#: Keys of an older build's layout (one per record) deleted per transaction, once moved to shelves.
LEGACY_PER_TXN = 64

__all__ = ["PROTOCOL", "NodeTable", "open_nodetable"]

COUNTERS = (
    "sync_rounds",
    "records_received",
    "records_rejected",
    "records_sent",
    "refused_rate",
    "refused_full",
    "refused_stale",
    "deferred_verify",
    "deferred_unknown_owner",
    "evicted",
    "pruned",
    "heartbeats_accepted",
    "heartbeats_rejected",
    "streams_refused",
    "streams_timed_out",
    "digests_skipped",
    "offers_sent",
    "wants_sent",
    "wants_refused",
    "wants_retried",
    "sends_paced",
)


class NodeTable:
    def __init__(
        self,
        host: Host,
        config: Config,
        identity: Identity,
        store: Store,
        version: str,
        membership: Membership | None = None,
    ) -> None:
        self.host = host
        self.config = config
        self._limits = DocLimits.from_config(config)
        self.identity = identity
        self.me = identity.peer_id
        self.store = store
        self.software_version = version  # published in our own entry
        # One row per owner held: its OwnerDoc, which also carries the seq of the record held and
        # when the owner was last seen. ``records`` and ``last_seen`` read and write those as dicts
        # (rows.py). Record bodies are in LMDB, or in _unstored until stored (see record()).
        self.docs: dict[PeerId, OwnerDoc] = {}
        self.records = Seqs(self.docs)
        self.last_seen = LastSeen(self.docs)  # only owners held have one: unknown IDs cost nothing
        self._unstored: dict[PeerId, Record] = {}
        # When we lost our own connection to a peer: a heartbeat it signed before then
        # (relayed by others) proves nothing new and must not revive it, nor bring it
        # back once pruned. Kept past pruning, for --stale-after; only direct peers get one.
        self.lost_at: dict[PeerId, float] = {}
        self.beats: dict[PeerId, Heartbeat] = {}
        self.by_text: dict[str, PeerId] = {}
        # What each connected peer holds, as (seq, heartbeat ms), for owners we hold.
        self.peer_known: dict[PeerId, dict[PeerId, tuple[int, int]]] = {}
        # Per pusher, the owners whose record or heartbeat may need sending (an ordered set):
        # a pusher looks only at what changed, not at the whole table, on every change.
        self.pending: dict[PeerId, dict[PeerId, None]] = {}
        self.stats = dict.fromkeys(COUNTERS, 0)
        # Liveness by SWIM membership when the node runs it (heartbeats and summaries of the whole
        # table then stay home: digests per bucket, see wire.py).
        self.membership = membership
        self.digest = [0] * BUCKETS
        self.buckets: list[list[str]] = [[] for _ in range(BUCKETS)]  # sorted (update.bucket_add)
        # Buckets each peer's digest disagreed on: its pusher answers with those pages only.
        self.page_requests: dict[PeerId, dict[int, bool]] = {}  # bucket -> ask for their page back
        self._refusal_log = logfmt.RateLimitedLog(log, self.config.refusal_log_interval)
        self.sync = Sync(self)
        self._sorted: list[str] | None = None
        self._loaded_at = 0.0
        self._version = 0
        self._changed = trio.Event()
        self._pushers: dict[PeerId, trio.CancelScope] = {}
        self._flushed: dict[PeerId, int] = {}  # table version each pusher has fully sent
        self.departing = False  # our "left" is written: pushers end once the peer confirms it read all
        self._flush_event = trio.Event()
        # LMDB writes waiting for _write_loop, by shelf and key: a record to store, or None to delete.
        self._writes: dict[int, dict[bytes, Record | None]] = {}
        self._legacy: list[bytes] = []  # keys of an older build's layout, to delete (see _load)
        self._writing = 0  # keys in the transaction being committed
        self._write_wanted = trio.Event()
        self._wrote = trio.Event()  # set (and replaced) after every commit
        self._write_loop_stopped = False  # _drain_writes then commits what is queued itself
        self._write_failures = logfmt.RateLimitedLog(log, 60.0)
        self._store_failing = False  # the last commit failed: nobody waits for the disk meanwhile
        self._digest_due = False
        self._nursery: trio.Nursery | None = None
        self.clock = time.time
        self._db = store.db(DB)
        self._salt = self._shelf_salt()
        # The last shelf read back (its stored bytes and entries): sending records sorted by shelf
        # inflates each shelf once. Compared by its bytes, so a commit since is never missed.
        self._shelf_read: tuple[bytes, shelf.Entries] | None = None

    # --- public API (docs/internals.md) ------------------------------------------------

    def entries(self, include_all: bool = False) -> dict[str, dict[str, Any]]:
        now = self.clock()
        out = {}
        for owner in self.docs:
            entry = self._view(owner, now)
            if include_all or entry["connected"]:
                out[str(owner)] = entry
        return out

    def entry(self, peer: PeerId | str) -> dict[str, Any] | None:
        if isinstance(peer, str):
            try:
                peer = PeerId.from_string(peer)
            except IdentityError:
                return None
        return self._view(peer, self.clock()) if peer in self.docs else None

    def own_entry(self) -> dict[str, Any]:
        return self._view(self.me, self.clock())

    async def update_own(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Change our own entry; returns once it is on disk (a kill -9 after the answer keeps it)."""
        record = self._write_own(validate_update(fields))
        if record is not None:
            await self.wait_stored([record])
        return self.own_entry()

    def set_addrs(self, addrs: Sequence[object]) -> None:
        """Publish where we can be reached now (e.g. a relay reservation added ``/p2p-circuit`` ones)."""
        self._write_own({"addrs": [str(a) for a in addrs]})

    async def set_services(self, services: list[dict[str, Any]]) -> None:
        record = self._write_own({"service": list(services)})
        if record is not None:
            await self.wait_stored([record])

    async def wait_changed(self) -> None:
        await self._changed.wait()

    @property
    def version(self) -> int:
        return self._version

    def summary_stats(self) -> dict[str, Any]:
        return {
            "entries": len(self.docs),
            "max_entries": self.config.nodetable_max_entries,
            "doc_bytes": sum(d.size for d in self.docs.values()),
            "change_count": sum(d.change_count() for d in self.docs.values()),
            "peers": len(self.host.connected_peers()),
            **self.stats,
        }

    async def prune(self) -> int:
        """Forget every owner not seen for ``--stale-after``, in bounded batches; returns how many."""
        now = self.clock()
        horizon = now - self.config.stale_after
        doomed = [
            owner
            for owner in self.records
            if owner != self.me
            and not self._member_alive(owner)
            and max(self.last_seen.get(owner, 0.0), self._loaded_at) < horizon
            and not self.host.is_connected(owner)
        ]
        for owner in [o for o, at in self.lost_at.items() if at < horizon]:
            del self.lost_at[owner]
        self._drop_relayed_beats(now)
        for start in range(0, len(doomed), PRUNE_BATCH):
            batch = [owner for owner in doomed[start : start + PRUNE_BATCH] if owner in self.records]
            self._forget(batch)
            self.stats["pruned"] += len(batch)
            await trio.lowlevel.checkpoint()
        if doomed:
            log.info("pruned stale node table entries %s", logfmt.kv(pruned=len(doomed), entries=len(self.records)))
            self._bump()
        return len(doomed)

    def _drop_relayed_beats(self, now: float) -> None:
        """With membership, forget heartbeats older than :data:`BEAT_RELAY_FOR` of owners membership vouches for."""
        if self.membership is None:
            return
        horizon_ms = (now - BEAT_RELAY_FOR) * 1000
        for owner in [o for o, b in self.beats.items() if b.ms < horizon_ms and o != self.me]:
            if self._member_alive(owner):
                del self.beats[owner]

    # --- derived view ------------------------------------------------------------------

    def _view(self, owner: PeerId, now: float) -> dict[str, Any]:
        entry = dict(self.docs[owner].to_dict())
        if self.membership is not None and owner != self.me:
            member = self.membership.status(owner)
            if member is not None:
                alive = not member.gone
                last = now if alive else self.last_seen.get(owner, 0.0)
                entry["last_seen"] = int(last)
                entry["connected"] = alive and str(entry.get("status", "")) not in GONE
                if not alive and now - last > self.config.stale_after:
                    entry["stale"] = True
                entry["load"] = self.membership.load(owner)
                return entry
        last = now if owner == self.me else self.last_seen.get(owner, 0.0)
        direct = owner != self.me and self.host.is_connected(owner)
        fresh = now - last <= self._fresh_for()
        status = str(entry.get("status", ""))
        entry["last_seen"] = int(last)
        entry["connected"] = status not in GONE and (owner == self.me or direct or fresh)
        if now - last > self.config.stale_after and owner != self.me and not direct:
            entry["connected"] = False
            entry["stale"] = True
        entry.setdefault("load", 0)
        return entry

    def _fresh_for(self) -> float:
        """How long a sighting keeps a peer "connected": a little over two verification rounds."""
        return max(2.5 * self.config.verify_interval, 5.0)

    def _member_alive(self, owner: PeerId) -> bool:
        return self.membership is not None and bool(self.membership.alive(owner))

    def _on_member(self, peer: PeerId, status: Status) -> None:
        """Membership changed its view of ``peer``: the served view changes with it."""
        now = self.clock()
        if peer not in self.records:
            if not status.gone:
                self._ask_digests()  # a member we hold no record of: compare digests soon
            return
        self.last_seen[peer] = max(self.last_seen.get(peer, 0.0), now)
        self.lost_at.pop(peer, None)
        self._bump()

    def _ask_digests(self) -> None:
        self._digest_due = True
        self.wake()

    def seen_at(self, owner: PeerId) -> float:
        return self.clock() if owner == self.me else self.last_seen.get(owner, 0.0)

    def saw(self, owner: PeerId, when: float) -> None:
        """Record a sighting: a direct contact or a verified owner-signed heartbeat, never hearsay."""
        if owner not in self.records or owner == self.me or when <= self.lost_at.get(owner, 0.0):
            return
        if when > self.last_seen.get(owner, 0.0):
            self.last_seen[owner] = when

    # --- membership: admission, eviction, forgetting ---------------------------------------

    def sorted_texts(self) -> list[str]:
        if self._sorted is None:
            self._sorted = sorted(self.by_text)
        return self._sorted

    def is_full(self) -> bool:
        return len(self.records) >= self.config.nodetable_max_entries

    def evictable(self, now: float, *, direct: bool) -> list[PeerId]:
        """Owners that may make room, longest unseen LAST (callers pop()).

        For a directly connected peer anything but us and other direct peers;
        for a relayed newcomer only entries that are no longer fresh, so a
        flood can push out the dead but never the living.
        """
        fresh_since = now - self._fresh_for()
        out = [
            (self.last_seen.get(owner, 0.0), owner)
            for owner in self.records
            if owner != self.me
            and (direct or self.last_seen.get(owner, 0.0) < fresh_since)
            and not self._member_alive(owner)
            and not self.host.is_connected(owner)
        ]
        out.sort(key=lambda pair: pair[0], reverse=True)
        return [owner for _, owner in out]

    def refuse(self, reason: str) -> None:
        """Count a refused input by reason; logged at most once per --refusal-log-interval per reason."""
        self._refusal_log.warning(reason, "refused node table input", reason=reason)

    def verify_record(self, record: Record) -> OwnerDoc:
        """The one place records are verified (from peers and from the store); raises ValidationError."""
        return record.verify(self._limits)

    def insert(self, record: Record, doc: OwnerDoc, *, stored: bool = False) -> None:
        """Hold ``record`` (verified: ``doc`` is what it says) and queue it for LMDB, unless it came from there."""
        owner = record.owner
        text = str(owner)
        held = self.docs.get(owner)
        old = held.seq if held is not None and held.seq else None  # our own first is held at seq 0
        if old is None:
            if self.membership is not None:
                # One PeerId and one text per peer (share_ids): membership's if it knows the peer (it
                # may have met it while this record was being verified), and ours from now on.
                named = self.membership.peer_id_of(text)
                if named is not None and named is not owner:
                    owner = doc.owner = named
                    text = str(owner)
                self.membership.release_id(text)
            self.by_text[text] = owner
            self._sorted = None
        self._digest_swap(text, old, record.seq)
        doc.seq = record.seq
        doc.seen = held.seen if held is not None else None  # a copy may come with another table's
        doc.size = len(record.doc)
        if stored:
            self._unstored.pop(owner, None)
        else:
            self._unstored[owner] = record
            self._queue_write(owner.raw, record)
        self.docs[owner] = doc
        self.touch(owner)

    def known_id(self, text: str) -> PeerId | None:
        """The PeerId this node already keeps for an owner's text: ours, or the one membership parsed."""
        pid = self.by_text.get(text)
        if pid is None and self.membership is not None:
            pid = self.membership.peer_id_of(text)
        return pid

    def record(self, owner: PeerId) -> Record | None:
        """The whole record we hold for ``owner`` (to send it on), or None.

        Only what is not yet written (:meth:`_write_loop`) is in memory;
        the rest is read back from LMDB (about 10 µs), so a node that
        knows 1,000 peers does not also keep 1,000 record bodies in memory.
        """
        seq = self.records.get(owner)
        if seq is None:
            return None
        record = self._unstored.get(owner)
        if record is None:
            value = self._stored(owner.raw)
            if value is None:
                return None
            try:
                record = Record.from_bytes(owner, bytes(value))
            except ValidationError as exc:  # damaged on disk since we wrote it: the owner will resend it
                log.warning("unreadable stored node table record %s", logfmt.kv(owner=owner.short(), reason=exc))
                return None
        return record if record.seq == seq else None

    def shelf_of(self, owner: PeerId) -> int:
        """The LMDB shelf of ``owner``'s record (see :mod:`.shelf`): read in this order, each is inflated once."""
        return shelf.index(owner.raw, self._salt)

    def _stored(self, raw: bytes) -> bytes | None:
        i = shelf.index(raw, self._salt)
        data = self.store.get_bytes(DB, shelf.key(i))
        if data is None:
            return None
        cached = self._shelf_read
        if cached is not None and cached[0] == data:
            return cached[1].get(raw)
        try:
            entries = shelf.decode(data)
        except ValidationError as exc:
            self._lost_shelf(i, exc)
            return None
        self._shelf_read = (data, entries)
        return entries.get(raw)

    def _lost_shelf(self, i: int, exc: ValidationError) -> None:
        """A shelf became unreadable on disk since we wrote it: forget the owners whose records it
        held, so that comparing digests with peers brings them back, and write it again."""
        lost = [o for o in self.records if o != self.me and o not in self._unstored and self.shelf_of(o) == i]
        self._forget(lost)
        log.warning(
            "unreadable node table shelf; its records will come again from peers %s",
            logfmt.kv(lost=len(lost), reason=exc),
        )
        if self.me in self.records and self.me not in self._unstored and self.shelf_of(self.me) == i:
            self.republish_own(self.records[self.me] + 1)
        self._writes.setdefault(i, {})
        self._write_wanted.set()
        self._ask_digests()

    def _shelf_salt(self) -> bytes:
        salt = self.store.get_bytes(DB, shelf.SALT_KEY)
        if salt is None:
            salt = shelf.new_salt()
            self.store.put_bytes(DB, shelf.SALT_KEY, salt)
        return bytes(salt)

    def set_beat(self, beat: Heartbeat) -> None:
        self.beats[beat.owner] = beat
        self.touch(beat.owner)

    def touch(self, owner: PeerId) -> None:
        for pending in self.pending.values():
            pending[owner] = None

    def evict(self, owner: PeerId) -> None:
        self._forget([owner])
        self.stats["evicted"] += 1

    def _forget(self, owners: list[PeerId]) -> None:
        """Drop owners from every map and from LMDB."""
        if not owners:
            return
        for owner in owners:
            doc = self.docs.pop(owner, None)  # its row: the record's seq and when last seen go with it
            self._unstored.pop(owner, None)
            if doc is not None:
                self._digest_swap(str(owner), doc.seq, None)
            self.beats.pop(owner, None)
            self.by_text.pop(str(owner), None)
            for known in self.peer_known.values():
                known.pop(owner, None)
            for pending in self.pending.values():
                pending.pop(owner, None)
        self._sorted = None
        for owner in owners:
            self.host.forget_addrs(owner)
            self._queue_write(owner.raw, None)

    def _digest_swap(self, text: str, old: int | None, new: int | None) -> None:
        b = bucket_of(text, BUCKETS)
        if old is not None:
            self.digest[b] ^= state_hash(text, old, Status.ALIVE)
            bucket_discard(self.buckets[b], text)
        if new is not None:
            self.digest[b] ^= state_hash(text, new, Status.ALIVE)
            bucket_add(self.buckets[b], text)

    def drop_peer(self, peer: PeerId) -> None:
        """A peer left: what we kept about its connection goes with it."""
        self.peer_known.pop(peer, None)
        self.page_requests.pop(peer, None)
        self.sync.drop_peer(peer)

    # --- own entry -----------------------------------------------------------------------

    def _write_own(self, fields: dict[str, Any]) -> Record | None:
        """Change our own entry; returns the new record (queued for LMDB), or None if nothing changed."""
        doc = self._own_doc()
        if not doc.update(fields):
            return None
        if doc.change_count() > COMPACT_AFTER:
            doc = doc.compacted()
            self.docs[self.me] = doc
        seq = self.records[self.me] + 1 if self.me in self.records else 1
        return self._publish_own(Record.create(self.identity, seq, doc))

    def republish_own(self, seq: int) -> None:
        self._publish_own(Record.create(self.identity, seq, self._own_doc()))

    def _own_doc(self) -> OwnerDoc:
        """Our own entry, editable: the copy loaded from the store at start is frozen like any other."""
        doc = self.docs[self.me]
        if doc.frozen:
            doc = self.docs[self.me] = doc.compacted()
        return doc

    def _publish_own(self, record: Record) -> Record:
        self.insert(record, self.docs[self.me])
        self._bump()
        return record

    def _beat(self) -> None:
        """Sign a fresh heartbeat of our own; pushers carry it to every peer."""
        self.set_beat(Heartbeat.create(self.identity, int(self.clock() * 1000)))
        self._bump()

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()

    def wake(self) -> None:
        """Wake pushers without changing the served view."""
        self._changed.set()
        self._changed = trio.Event()

    # --- LMDB writes ---------------------------------------------------------------------
    # Every write the table makes (records held, owners forgotten, our own entry) is queued by
    # shelf and key and committed by one task, SHELVES_PER_TXN shelves to a transaction (each
    # shelf rewritten whole, see shelf.py). A commit is an fsync, and fsync never runs on the Trio
    # thread (DESIGN.md): on network storage (10-100 ms an fsync) a joiner's first 1,000 records
    # were 63 pauses of the whole node, gateway included, of one fsync each; and behind a job
    # tracker commit, LMDB's one writer lock held the event loop too. Per key only the newest
    # write waits, so the queue is bounded by the table, and a record replaced or forgotten before
    # its turn never reaches the disk.

    def _queue_write(self, key: bytes, record: Record | None) -> None:
        self._writes.setdefault(shelf.index(key, self._salt), {})[key] = record
        self._write_wanted.set()

    def _queued(self) -> int:
        return sum(len(keys) for keys in self._writes.values()) + len(self._legacy)

    async def _write_loop(self) -> None:
        try:
            while True:
                if not self._writes and not self._legacy:
                    await self._write_wanted.wait()
                    self._write_wanted = trio.Event()
                    continue
                await self._write_chunk()
        finally:
            # A cancelled loop (the table's nursery was cancelled, not closed) leaves what is
            # still queued, and what closing queues, to _drain_writes: it commits them itself.
            self._write_loop_stopped = True
            self._wrote.set()
            self._wrote = trio.Event()

    async def _write_chunk(self) -> None:
        """Commit the next SHELVES_PER_TXN queued shelves; on a failing disk, requeue them and wait 1 s."""
        chunk = {i: self._writes.pop(i) for i in list(itertools.islice(self._writes, shelf.SHELVES_PER_TXN))}
        legacy: list[bytes] = []
        if not self._writes:  # an older build's keys go once their records are on shelves
            legacy, self._legacy = self._legacy[:LEGACY_PER_TXN], self._legacy[LEGACY_PER_TXN:]
        self._writing = sum(len(keys) for keys in chunk.values()) + len(legacy)
        updates: list[tuple[bytes, Any]] = [(key, _delete) for key in legacy]
        for i, keys in chunk.items():
            changes = {key: None if r is None else r.to_bytes() for key, r in keys.items()}
            updates.append((shelf.key(i), shelf.updater(changes, self._damaged_shelf)))
        try:
            # Shielded: a transaction taken from the queue is committed, even as the table closes.
            with trio.CancelScope(shield=True):
                await self._commit(updates)
        except StoreError as exc:
            # The disk is full or failing: keep serving from memory, and try again in a while.
            self._write_failures.log(logging.ERROR, "store", "cannot write the node table; retrying in 1 s", reason=exc)
            for i, keys in chunk.items():
                queued = self._writes.setdefault(i, {})
                for key, record in keys.items():
                    queued.setdefault(key, record)  # unless a newer write for that key came meanwhile
            self._legacy[:0] = legacy
            self._writing = 0
            self._store_failing = True
            self._wrote.set()
            self._wrote = trio.Event()
            await trio.sleep(1.0)
            return
        self._writing = 0
        self._store_failing = False
        for keys in chunk.values():
            for record in keys.values():
                if record is not None and self._unstored.get(record.owner) is record:
                    del self._unstored[record.owner]
        self._wrote.set()
        self._wrote = trio.Event()

    def _damaged_shelf(self, exc: ValidationError) -> None:
        # Called on the writer's thread; logging is thread-safe.
        log.warning("rewrote an unreadable node table shelf (its owners will resend) %s", logfmt.kv(reason=exc))

    async def _commit(self, updates: list[tuple[bytes, Any]]) -> None:
        if self.store.syncs:
            await trio.to_thread.run_sync(self.store.update, DB, updates)
        else:
            # No fsync (a benchmark's store): a commit is a copy into the page cache, cheaper
            # than the hop to a thread, which would also let a mock clock jump meanwhile.
            self.store.update(DB, updates)
            await trio.lowlevel.checkpoint()

    async def wait_stored(self, records: list[Record]) -> int:
        """Wait until each of ``records`` is on disk, or replaced or forgotten; returns how many are still held.

        The intake waits here before it reads a peer's next message: a peer
        cannot hand us records faster than the disk takes them. While the disk
        fails, nobody waits: the table works from memory (bounded by its size).
        """
        while not self._store_failing and any(self._unstored.get(record.owner) is record for record in records):
            await self._wrote.wait()
        return sum(1 for record in records if self.records.get(record.owner) == record.seq)

    async def _drain_writes(self, limit: float) -> None:
        """Commit what is queued, for at most ``limit`` seconds (a failing disk must not hang shutdown)."""
        with trio.move_on_after(limit):
            while self._writes or self._legacy or self._writing:
                if self._write_loop_stopped and not self._writing:
                    await self._write_chunk()  # nobody else will: the loop was cancelled
                else:
                    await self._wrote.wait()
        if self._writes or self._legacy or self._writing:
            log.warning(
                "node table records not written at shutdown (peers will resend them) %s",
                logfmt.kv(count=self._queued() + self._writing),
            )

    def _load(self) -> None:
        """Verify every stored record as if a peer had sent it; drop (never load) what fails.

        Records written by older builds carry a signature this build cannot check
        before loading; they are dropped with a log line and come back from peers.
        Records an older build stored one to a key are moved onto their shelves.
        """
        with self.store.read() as txn:
            items = [(bytes(key), bytes(value)) for key, value in txn.cursor(db=self._db)]
        found: list[tuple[bytes, bytes, int | None]] = []  # key, stored record, the shelf it is on
        for key, value in items:
            if key == shelf.SALT_KEY:
                continue
            if not shelf.is_shelf(key):
                self._legacy.append(key)  # one record to a key: deleted once its shelf is written
                found.append((key, value, None))
                continue
            i = key[-1] if len(key) == len(shelf.key(0)) and key[-1] < shelf.SHELVES else None
            if i is None:  # no shelf of this build's
                self._legacy.append(key)
                continue
            try:
                entries = shelf.decode(value)
            except ValidationError:
                self._writes.setdefault(i, {})  # rewritten (the writer logs it), its owners resend
                continue
            found.extend((raw, data, i) for raw, data in entries.items())
        dropped = 0
        reason: Exception | None = None
        for key, value, on in found:
            try:
                owner = PeerId(key)
                record = Record.from_bytes(owner, value)
                doc = self.verify_record(record)
            except (IdentityError, ValidationError) as exc:
                log.debug("unreadable stored node table record %s", logfmt.kv(key=key[:40].hex(), reason=exc))
                dropped += 1
                reason = exc
                if on is not None:
                    self._writes.setdefault(on, {})[key] = None
                continue
            in_place = on is not None and on == shelf.index(key, self._salt)
            if on is not None and not in_place:
                self._writes.setdefault(on, {})[key] = None
            self.insert(record, doc, stored=in_place)
        if dropped:
            # One line for all of them: an upgrade may drop a whole table at once.
            log.warning(
                "dropped stored node table records (from an older build or damaged; peers will resend them) %s",
                logfmt.kv(count=dropped, last_reason=reason),
            )
        if self._writes or self._legacy:
            self._write_wanted.set()
        # Liveness is not stored: give what we loaded one --stale-after to be heard of again.
        self._loaded_at = self.clock()
        log.info("node table loaded %s", logfmt.kv(entries=len(self.records), dropped=dropped))

    def _initial_own(self) -> None:
        if self.me not in self.docs:
            self.docs[self.me] = OwnerDoc(self.me)
        fields = {
            "id": str(self.me),
            "owner": self.docs[self.me].to_dict().get("owner", ""),
            "role": ["dispatcher"] if self.config.mode == "standalone" else ["worker"],
            "status": "online",
            "version": self.software_version,
            "public_address": self.config.public_addr or "",
            "addrs": [str(a) for a in self.host.listen_addrs],
            "hardware": detect_hardware(),
        }
        if "service" not in self.docs[self.me].to_dict():
            fields["service"] = []
        self._write_own(fields)
        self._beat()

    # --- liveness ------------------------------------------------------------------------

    async def _verify_loop(self) -> None:
        if self.membership is not None:
            return  # liveness is membership's: no heartbeats to sign, no pings to send
        while True:
            await trio.sleep(self.config.verify_interval)
            log.info("Starting verification %s", logfmt.kv(peers=len(self.host.connected_peers())))
            self._beat()
            async with trio.open_nursery() as n:
                for peer in self.host.connected_peers():
                    n.start_soon(self._ping, peer)

    async def _sweep_loop(self) -> None:
        interval = max(0.05, min(self.config.stale_after / 4, SWEEP_EVERY))
        while True:
            await trio.sleep(interval)
            await self.prune()

    async def _ping(self, peer: PeerId) -> None:
        with trio.move_on_after(min(10.0, self.config.verify_interval)):
            try:
                await self.host.ping(peer)
            except TransportError:
                return
            self.saw(peer, self.clock())

    async def _watch_peers(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self._nursery is not None
        async with self.host.subscribe() as events:
            for peer in self.host.connected_peers():
                self._start_pusher(peer)
            task_status.started()
            async for event in events:
                if event.kind == "connected":
                    self.lost_at.pop(event.peer, None)
                    self.saw(event.peer, self.clock())
                    self._start_pusher(event.peer)
                else:
                    scope = self._pushers.pop(event.peer, None)
                    if scope is not None:
                        scope.cancel()
                    self.drop_peer(event.peer)
                    # What we saw ourselves no longer vouches for it; only a newer heartbeat
                    # signed by the peer itself, relayed by someone who still reaches it, will.
                    if event.peer in self.records:
                        self.lost_at[event.peer] = self.clock()
                    if event.peer in self.last_seen:
                        horizon = self.clock() - self._fresh_for() - 1.0
                        self.last_seen[event.peer] = min(self.last_seen[event.peer], horizon)
                    self._bump()  # the served view changed

    def _start_pusher(self, peer: PeerId) -> None:
        if peer in self._pushers:
            return
        scope = trio.CancelScope()
        self._pushers[peer] = scope

        async def run() -> None:
            try:
                with scope:
                    await self.sync.push(peer)
            finally:
                # Also when the table's nursery is cancelled: a departure waits on live pushers only.
                if self._pushers.get(peer) is scope:
                    del self._pushers[peer]
                    self._flush_event.set()
                    self._flush_event = trio.Event()

        assert self._nursery is not None
        self._nursery.start_soon(run)

    def flushed(self, peer: PeerId, version: int) -> None:
        self._flushed[peer] = version
        self._flush_event.set()
        self._flush_event = trio.Event()

    async def _announce_departure(self) -> None:
        """Mark ourselves left and give pushers a moment (at most 1 s) to deliver it.

        Delivered, not written: each pusher sends the record, half-closes its
        stream and ends when the peer closes its side, which its handler does
        only after applying all we sent. A record written but unread when the
        connection closed was dropped with the stream (seen in CI under load).
        """
        self.departing = True
        self._write_own({"status": "left"})
        peers = len(self._pushers)
        with trio.move_on_after(DEPARTURE_BUDGET):
            while self._pushers:
                await self._flush_event.wait()
        log.info("announced departure %s", logfmt.kv(peers=peers, unconfirmed=len(self._pushers)))


@contextlib.asynccontextmanager
async def open_nodetable(
    host: Host, config: Config, identity: Identity, store: Store, version: str, membership: Membership | None = None
) -> AsyncIterator[NodeTable]:
    """Load the table from ``store``, serve the sync protocol on ``host``; leaving announces our departure."""
    table = NodeTable(host, config, identity, store, version, membership)
    table._load()
    table._initial_own()
    for protocol in PROTOCOLS:  # older nodes push whole records on 2.0.0
        host.set_stream_handler(protocol, table.sync.handle)
    if table.membership is not None:
        table.membership.on_change(table._on_member)
        table.membership.share_ids(table.by_text)
    async with trio.open_nursery() as nursery:
        table._nursery = nursery
        nursery.start_soon(table._write_loop)
        await nursery.start(table._watch_peers)
        nursery.start_soon(table._verify_loop)
        nursery.start_soon(table._sweep_loop)
        nursery.start_soon(table.sync.retry_wants)
        try:
            yield table
        finally:
            with trio.CancelScope(shield=True):
                await table._announce_departure()
                await table._drain_writes(10.0)
            nursery.cancel_scope.cancel()


def _delete(old: bytes | None) -> None:
    """A :meth:`Store.update` rewrite that deletes its key."""
    return None
