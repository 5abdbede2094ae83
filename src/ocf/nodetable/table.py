"""The node table service: owns the records, persists them, syncs them, tracks liveness.

Thin Trio code around the pure pieces in :mod:`record`, :mod:`entry` and
:mod:`wire`. One task per connected peer pushes what that peer lacks; the
stream handler applies what peers push to us. Every accepted record is
stored in LMDB in the same transaction batch it arrived in, then offered to
every other peer — that is how a change crosses any number of hops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

import trio

from .. import log as logfmt
from ..errors import IdentityError, ProtocolError, TransportError, ValidationError
from ..identity import PeerId
from . import wire
from .docguard import DocLimits
from .entry import detect_hardware, validate_update
from .record import OwnerDoc, Record

if TYPE_CHECKING:
    from ..node import Node

log = logging.getLogger("ocf.nodetable")

PROTOCOL = "/ocf/nodetable/1.0.0"
DB = "nodetable"
COMPACT_AFTER = 64  # own document changes before it is rewritten with a one-change history
GONE = ("left", "offline")
RECEIVE = 65536


class NodeTable:
    def __init__(self, node: "Node") -> None:
        self.node = node
        self.host = node.host
        self.config = node.config
        self.identity = node.identity
        self.me = node.peer_id
        self.records: dict[PeerId, Record] = {}
        self.docs: dict[PeerId, OwnerDoc] = {}
        self.last_seen: dict[PeerId, float] = {}
        self.peer_known: dict[PeerId, dict[PeerId, int]] = {}
        self.stats = {"sync_rounds": 0, "records_received": 0, "records_rejected": 0, "records_sent": 0}
        self._version = 0
        self._changed = trio.Event()
        self._pushers: dict[PeerId, trio.CancelScope] = {}
        self._flushed: dict[PeerId, int] = {}  # table version each pusher has fully sent
        self._flush_event = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.clock = time.time
        store = node.store
        self._db = store.db(DB)

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
        self._write_own(validate_update(fields))
        return self.own_entry()

    async def set_services(self, services: list[dict[str, Any]]) -> None:
        self._write_own({"service": list(services)})

    async def wait_changed(self) -> None:
        await self._changed.wait()

    @property
    def version(self) -> int:
        return self._version

    def summary_stats(self) -> dict[str, Any]:
        return {
            "entries": len(self.docs),
            "doc_bytes": sum(len(r.doc) for r in self.records.values()),
            "change_count": sum(d.change_count() for d in self.docs.values()),
            "peers": len(self.host.connected_peers()),
            **self.stats,
        }

    # --- derived view ------------------------------------------------------------------

    def _view(self, owner: PeerId, now: float) -> dict[str, Any]:
        entry = dict(self.docs[owner].to_dict())
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

    # --- own entry -----------------------------------------------------------------------

    def _write_own(self, fields: dict[str, Any]) -> None:
        doc = self.docs[self.me]
        if not doc.update(fields):
            return
        if doc.change_count() > COMPACT_AFTER:
            doc = doc.compacted()
            self.docs[self.me] = doc
        seq = self.records[self.me].seq + 1 if self.me in self.records else 1
        record = Record.create(self.identity, seq, doc)
        with self.node.store.write() as txn:
            txn.put(self.me.raw, record.to_bytes(), db=self._db)
        self.records[self.me] = record
        self._bump()

    def _republish_own(self, seq: int) -> None:
        record = Record.create(self.identity, seq, self.docs[self.me])
        with self.node.store.write() as txn:
            txn.put(self.me.raw, record.to_bytes(), db=self._db)
        self.records[self.me] = record
        self._bump()

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()

    def _load(self) -> None:
        """Verify every stored record as if a peer had sent it; drop (never load) what fails.

        Records written by older builds carry a signature this build cannot check
        before loading; they are dropped with a log line and come back from peers.
        """
        with self.node.store.read() as txn:
            items = list(txn.cursor(db=self._db))
        limits = DocLimits.from_config(self.config)
        dropped: list[bytes] = []
        reason: Exception | None = None
        for key, value in items:
            try:
                owner = PeerId(bytes(key))
                record = Record.from_bytes(owner, bytes(value))
                doc = record.verify(limits)
            except (IdentityError, ValidationError) as exc:
                log.debug("unreadable stored node table record %s", logfmt.kv(key=bytes(key)[:40].hex(), reason=exc))
                dropped.append(bytes(key))
                reason = exc
                continue
            self.records[owner] = record
            self.docs[owner] = doc
        if dropped:
            # One line for all of them: an upgrade may drop a whole table at once.
            log.warning(
                "dropped stored node table records (from an older build or damaged; peers will resend them) %s",
                logfmt.kv(count=len(dropped), last_reason=reason),
            )
            with self.node.store.write() as txn:
                for key in dropped:
                    txn.delete(key, db=self._db)
        log.info("node table loaded %s", logfmt.kv(entries=len(self.records), dropped=len(dropped)))

    def _initial_own(self) -> None:
        if self.me not in self.docs:
            self.docs[self.me] = OwnerDoc(self.me)
        fields = {
            "id": str(self.me),
            "owner": self.docs[self.me].to_dict().get("owner", ""),
            "role": ["dispatcher"] if self.config.mode == "standalone" else ["worker"],
            "status": "online",
            "version": self.node.version,
            "public_address": self.config.public_addr or "",
            "addrs": [str(a) for a in self.host.listen_addrs],
            "hardware": detect_hardware(),
        }
        if "service" not in self.docs[self.me].to_dict():
            fields["service"] = []
        self._write_own(fields)

    # --- sync ------------------------------------------------------------------------------

    def _summary(self) -> dict[str, Any]:
        now = self.clock()
        have = {}
        for owner, record in self.records.items():
            seen = now if owner == self.me else self.last_seen.get(owner, 0.0)
            have[str(owner)] = [record.seq, seen]
        return {"t": "summary", "have": have}

    async def _push(self, peer: PeerId) -> None:
        """Keep ``peer`` up to date over one outbound stream until it or we go away."""
        limit = self.config.max_message_size
        try:
            stream = await self.host.new_stream(peer, PROTOCOL)
        except TransportError as exc:
            log.debug("no sync stream %s", logfmt.kv(peer=peer.short(), reason=exc))
            return
        known = self.peer_known.setdefault(peer, {})
        try:
            async with stream:
                await stream.send_all(wire.encode(self._summary()))
                last_summary = trio.current_time()
                while True:
                    version = self._version
                    batch: list[dict[str, Any]] = []
                    size = 0
                    for owner, record in list(self.records.items()):
                        if owner == peer or known.get(owner, -1) >= record.seq:
                            continue
                        item = record.to_wire()
                        # liveness rides along, so a relayed entry arrives "seen", not stale
                        item["seen"] = self.clock() if owner == self.me else self.last_seen.get(owner, 0.0)
                        item_size = len(item["doc"]) + 300
                        if batch and size + item_size > limit // 2:
                            await self._send_records(stream, batch)
                            batch, size = [], 0
                        batch.append(item)
                        size += item_size
                        known[owner] = record.seq
                    if batch:
                        await self._send_records(stream, batch)
                    self._flushed[peer] = version
                    self._flush_event.set()
                    self._flush_event = trio.Event()
                    with trio.move_on_at(last_summary + self.config.verify_interval):
                        await self._changed.wait()
                        continue
                    await stream.send_all(wire.encode(self._summary()))  # liveness, once per interval
                    last_summary = trio.current_time()
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("sync stream ended %s", logfmt.kv(peer=peer.short(), reason=exc or type(exc).__name__))

    async def _send_records(self, stream: Any, batch: list[dict[str, Any]]) -> None:
        await stream.send_all(wire.encode({"t": "records", "records": batch}))
        self.stats["records_sent"] += len(batch)

    async def _handle(self, stream: Any) -> None:
        """Apply what a peer pushes to us. A protocol violation ends only this stream."""
        peer = stream.remote_peer
        reader = wire.Reader(self.config.max_message_size)
        known = self.peer_known.setdefault(peer, {})
        try:
            while data := await stream.receive_some(RECEIVE):
                for message in reader.feed(data):
                    self.stats["sync_rounds"] += 1
                    if message["t"] == "summary":
                        self._on_summary(peer, message, known)
                    else:
                        self._on_records(peer, message, known)
        except ProtocolError as exc:
            log.warning("bad node table message %s", logfmt.kv(peer=peer.short(), reason=exc))
            stream.reset()
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _on_summary(self, peer: PeerId, message: dict[str, Any], known: dict[PeerId, int]) -> None:
        have = message.get("have")
        if not isinstance(have, dict):
            raise ProtocolError("nodetable: summary without 'have'")
        now = self.clock()
        self.last_seen[peer] = now
        wake = False
        for text, pair in have.items():
            try:
                owner = PeerId.from_string(text)
                seq, seen = int(pair[0]), float(pair[1])
            except (IdentityError, TypeError, ValueError, IndexError):
                raise ProtocolError("nodetable: malformed summary") from None
            if known.get(owner, -1) < seq:
                known[owner] = seq
            mine = self.records.get(owner)
            if mine is not None and mine.seq > seq:
                wake = True
            if owner != self.me and min(seen, now) > self.last_seen.get(owner, 0.0):
                self.last_seen[owner] = min(seen, now)
        for owner in self.records:
            if str(owner) not in have and owner != peer:
                known.pop(owner, None)
                wake = True
        if wake:
            self._changed.set()
            self._changed = trio.Event()

    def _on_records(self, peer: PeerId, message: dict[str, Any], known: dict[PeerId, int]) -> None:
        items = message.get("records")
        if not isinstance(items, list):
            raise ProtocolError("nodetable: records message without a list")
        accepted: list[Record] = []
        for item in items:
            try:
                record = Record.from_wire(item)
            except ValidationError as exc:
                self._reject(peer, None, exc)
                continue
            known[record.owner] = max(known.get(record.owner, -1), record.seq)
            seen = item.get("seen") if isinstance(item, dict) else None
            if isinstance(seen, (int, float)) and record.owner != self.me:
                seen = min(float(seen), self.clock())
                if seen > self.last_seen.get(record.owner, 0.0):
                    self.last_seen[record.owner] = seen
            current = self.records.get(record.owner)
            if current is not None and current.seq >= record.seq:
                continue
            try:
                doc = record.verify(DocLimits.from_config(self.config))
            except ValidationError as exc:
                self._reject(peer, record.owner, exc)
                continue
            if record.owner == self.me:
                # An older incarnation of us (e.g. before --cleanslate) published newer
                # versions: continue their numbering and republish what is true now.
                self._republish_own(record.seq + 1)
                continue
            self.records[record.owner] = record
            self.docs[record.owner] = doc
            accepted.append(record)
            add_addrs = getattr(self.host, "add_addrs", None)
            if add_addrs is not None:
                from ..identity import Multiaddr

                addrs = []
                for text in doc.to_dict().get("addrs", []) or []:
                    try:
                        addrs.append(Multiaddr.parse(text).without_p2p())
                    except Exception:  # noqa: BLE001 - a peer's bad address is its problem
                        continue
                add_addrs(record.owner, addrs)
        if accepted:
            with self.node.store.write() as txn:
                for record in accepted:
                    txn.put(record.owner.raw, record.to_bytes(), db=self._db)
            self.stats["records_received"] += len(accepted)
            log.debug("node table updated %s", logfmt.kv(peer=peer.short(), records=len(accepted)))
            self._bump()

    def _reject(self, peer: PeerId, owner: PeerId | None, exc: Exception) -> None:
        self.stats["records_rejected"] += 1
        log.warning(
            "rejected node table record %s",
            logfmt.kv(from_peer=peer.short(), owner=owner.short() if owner else "?", reason=exc),
        )

    # --- liveness ------------------------------------------------------------------------

    async def _verify_loop(self) -> None:
        while True:
            await trio.sleep(self.config.verify_interval)
            log.info("Starting verification %s", logfmt.kv(peers=len(self.host.connected_peers())))
            async with trio.open_nursery() as n:
                for peer in self.host.connected_peers():
                    n.start_soon(self._ping, peer)

    async def _ping(self, peer: PeerId) -> None:
        with trio.move_on_after(min(10.0, self.config.verify_interval)):
            try:
                await self.host.ping(peer)
            except TransportError:
                return
            self.last_seen[peer] = self.clock()

    async def _watch_peers(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        assert self._nursery is not None
        async with self.host.subscribe() as events:
            for peer in self.host.connected_peers():
                self._start_pusher(peer)
            task_status.started()
            async for event in events:
                if event.kind == "connected":
                    self.last_seen[event.peer] = self.clock()
                    self._start_pusher(event.peer)
                else:
                    scope = self._pushers.pop(event.peer, None)
                    if scope is not None:
                        scope.cancel()
                    # What we saw ourselves no longer vouches for it; a peer that still
                    # reaches it will say so in its next summary.
                    horizon = self.clock() - self._fresh_for() - 1.0
                    self.last_seen[event.peer] = min(self.last_seen.get(event.peer, 0.0), horizon)
                    self._bump()  # the served view changed

    def _start_pusher(self, peer: PeerId) -> None:
        if peer in self._pushers:
            return
        scope = trio.CancelScope()
        self._pushers[peer] = scope

        async def run() -> None:
            with scope:
                await self._push(peer)
            if self._pushers.get(peer) is scope:
                del self._pushers[peer]

        assert self._nursery is not None
        self._nursery.start_soon(run)

    async def _announce_departure(self) -> None:
        """Mark ourselves left and give pushers a moment (at most 1 s) to deliver it."""
        self._write_own({"status": "left"})
        target = self._version
        with trio.move_on_after(1.0):
            while any(self._flushed.get(peer, -1) < target for peer in self._pushers):
                await self._flush_event.wait()
        log.info("announced departure %s", logfmt.kv(peers=len(self._pushers)))


@contextlib.asynccontextmanager
async def open_nodetable(node: "Node") -> AsyncIterator[NodeTable]:
    table = NodeTable(node)
    table._load()
    table._initial_own()
    node.host.set_stream_handler(PROTOCOL, table._handle)
    async with trio.open_nursery() as nursery:
        table._nursery = nursery
        await nursery.start(table._watch_peers)
        nursery.start_soon(table._verify_loop)
        try:
            yield table
        finally:
            with trio.CancelScope(shield=True):
                await table._announce_departure()
            nursery.cancel_scope.cancel()
