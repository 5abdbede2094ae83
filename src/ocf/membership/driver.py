"""The Trio driver of :class:`~ocf.membership.swim.Swim` over ``/ocf/swim/1.0.0`` streams.

It owns the lifetimes and nothing else: one long-lived outbound stream per
peer we talk to (a bounded queue in front of it; when the queue is full the
message is dropped and counted, as a datagram would be: SWIM is built for
loss), an inbound reader per peer stream (at most two per peer, every
message bounded in size and, once started, in time), a clock loop that
ticks the machine, and a keeper of the bounded degree: it dials random
living members while we have fewer than ``--membership.degree`` neighbours,
and now and then one recently dead member, so that two sides of a healed
partition find each other again. A member declared dead is disconnected.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from .. import log as logfmt
from ..errors import ProtocolError, TransportError, transport_errors_unwrapped
from ..identity import Multiaddr, PeerId, varint
from ..nodetable.wire import Reader
from ..transport.streams import hand_over, receive_before
from . import messages
from .messages import KINDS, PROTOCOL
from .swim import Swim, SwimConfig
from .update import Status, Verifier
from .verify import SignatureCache

if TYPE_CHECKING:
    from ..config import Config
    from ..identity import Identity
    from ..transport.host import Host

log = logging.getLogger("ocf.membership")

#: Largest SWIM message (a full page of 256 members is about 80 KB; gossip is far smaller).
MAX_MESSAGE = 128 << 10
QUEUE = 64
LEAVE_BUDGET = 1.0  # seconds a leaving node waits for its neighbours to confirm its "left"
RECEIVE = 65536
KEEPER_INTERVAL = 1.0

COUNTERS = (
    "messages_sent",
    "bytes_sent",
    "messages_received",
    "bytes_received",
    "dropped_queue_full",
    "dropped_unreachable",
    "dropped_items",
    "streams_refused",
    "streams_timed_out",
    "bad_messages",
    "dials",
)


def swim_config(config: Config) -> SwimConfig:
    probe = config.membership_probe_interval
    return SwimConfig(
        probe_interval=probe,
        ack_timeout=probe / 2,
        suspicion=config.membership_suspicion,
        anti_entropy=config.membership_anti_entropy,
        max_members=config.nodetable_max_entries,
        verify_rate=config.nodetable_verify_rate,
        verify_total=config.nodetable_verify_total,
        spread=config.membership_degree,
    )


class Membership:
    """Who is alive. ``status(peer)`` for queries, ``on_change`` for listeners (the node table)."""

    def __init__(self, host: Host, identity: Identity, config: Config, verifier: Verifier | None = None) -> None:
        self.host = host
        self.config = config
        self.me = identity.peer_id
        # Signed without their /p2p/<ID> suffix: the member is named beside them, every node that
        # dials them adds it, and each of N members' copies on N nodes is 57 bytes shorter an address.
        # A peer's addresses that do carry it (an older build's) are taken as they are.
        addrs = tuple(str(a.without_p2p()) for a in host.listen_addrs)
        self.swim = Swim(
            str(self.me),
            identity.sign,
            verifier or SignatureCache(),
            trio.current_time(),
            incarnation=int(time.time() * 1000),  # a restart always outbids what the last run signed
            addrs=addrs,
            config=swim_config(config),
        )
        self.stats = dict.fromkeys(COUNTERS, 0)
        # PeerIds of members, parsed once: only of those the node table holds no record of (see share_ids).
        self._ids: dict[str, PeerId] = {str(self.me): self.me}
        self._shared_ids: Mapping[str, PeerId] = {}
        self._senders: dict[str, trio.MemorySendChannel[bytes]] = {}
        self._inbound: dict[PeerId, int] = {}
        self._listeners: list[Callable[[PeerId, Status], None]] = []
        self._wake = trio.Event()
        self._load_source: Callable[[], int] | None = None
        self._leaving = False  # our "left" is queued: senders end once each peer confirms it read all
        self._progress = trio.Event()  # set when a sender ends (leave() waits for the neighbours')
        self._nursery: trio.Nursery | None = None
        self._refusals = logfmt.RateLimitedLog(log, config.refusal_log_interval)

    # --- queries ----------------------------------------------------------------------------

    def status(self, peer: PeerId) -> Status | None:
        return self.swim.status(str(peer))

    def alive(self, peer: PeerId) -> bool:
        status = self.swim.status(str(peer))
        return status is not None and not status.gone

    def load(self, peer: PeerId) -> int:
        member = self.swim.members.get(str(peer))
        return member.load if member is not None else (self.swim.load if peer == self.me else 0)

    def on_change(self, listener: Callable[[PeerId, Status], None]) -> None:
        self._listeners.append(listener)

    def load_from(self, source: Callable[[], int]) -> None:
        """Read our load (requests in flight) from ``source`` at every tick; changes are re-signed every 2 s at most.

        The gateway's count changes twice per request; being read when the
        clock task wakes anyway (every probe interval at most) costs a request
        nothing, where being told each time cost it a call into membership
        and two task switches (a quarter more instructions per forwarded request).
        """
        self._load_source = source

    def summary_stats(self) -> dict[str, Any]:
        alive = sum(1 for m in self.swim.members.values() if not m.status.gone)
        return {
            "members": len(self.swim.members),
            "alive": alive,
            "neighbors": len(self.swim.neighbors),
            "incarnation": self.swim.incarnation,
            **self.swim.stats,
            **self.stats,
        }

    # --- the loop -----------------------------------------------------------------------------

    def share_ids(self, ids: Mapping[str, PeerId]) -> None:
        """Name members by the PeerIds (and their texts) in ``ids``, the node table's, before parsing our own.

        A node that knows N peers would otherwise hold two PeerIds and two
        texts of each, one set per layer. With this, whichever layer learns
        a peer first parses it and the other reuses that object: the table
        takes ours (:meth:`peer_id_of`) and tells us when it holds the peer
        (:meth:`release_id`); we look up its own, and our member names are
        its texts (``Swim.intern``).
        """
        self._shared_ids = ids
        self.swim.intern = self._intern

    def peer_id_of(self, text: str) -> PeerId | None:
        """The PeerId we keep for the member named ``text``; None if we know no such member."""
        pid = self._ids.get(text)
        if pid is None and text in self.swim.members:
            pid = self._pid(text)
        return pid

    def release_id(self, text: str) -> None:
        """The table now holds a PeerId for ``text`` (see :meth:`share_ids`): ours goes."""
        if text != str(self.me):
            self._ids.pop(text, None)

    def _intern(self, text: str) -> str:
        pid = self._shared_ids.get(text) or self._ids.get(text)
        return str(pid) if pid is not None else text

    def _pid(self, text: str) -> PeerId | None:
        pid = self._ids.get(text) or self._shared_ids.get(text)
        if pid is None:
            member = self.swim.members.get(text)
            if member is not None:
                text = member.proof.peer  # the member's own name (its text), not the caller's copy
            try:
                pid = PeerId.from_string(text)
            except Exception:  # noqa: BLE001 - a member name that is no peer ID is nobody we can reach
                return None
            if len(self._ids) > 4 * self.swim.config.max_members:
                self._ids = {str(self.me): self.me}
            self._ids[text] = pid
        return pid

    def _kick(self) -> None:
        self._wake.set()

    def _flush(self) -> None:
        """Hand what the machine wants sent to per-peer senders, and tell listeners what changed."""
        swim = self.swim
        out, swim.outbox = swim.outbox, []
        for peer, message in out:
            body = json.dumps(messages.to_wire(message), separators=(",", ":")).encode()
            data = varint.encode(len(body)) + body
            send = self._senders.get(peer)
            if send is None:
                pid = self._pid(peer)
                if pid is None or self._nursery is None:
                    self.stats["dropped_unreachable"] += 1
                    continue
                send, recv = trio.open_memory_channel[bytes](QUEUE)
                self._senders[peer] = send
                self._nursery.start_soon(self._sender, peer, pid, send, recv)
            try:
                send.send_nowait(data)
            except trio.WouldBlock:
                self.stats["dropped_queue_full"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.stats["dropped_unreachable"] += 1
        changes, swim.changes = swim.changes, []
        for peer, status in changes:
            pid = self._pid(peer)
            if pid is None:
                continue
            if status.gone and self.host.is_connected(pid) and self._nursery is not None:
                self._nursery.start_soon(self.host.disconnect, pid)
            for listener in self._listeners:
                listener(pid, status)

    async def _clock(self) -> None:
        while True:
            if self._load_source is not None:
                self.swim.set_load(self._load_source())
            self.swim.tick(trio.current_time())
            self._flush()
            with trio.move_on_at(self.swim.next_deadline()):
                await self._wake.wait()
                self._wake = trio.Event()

    async def _sender(
        self, peer: str, pid: PeerId, send: trio.MemorySendChannel[bytes], recv: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        # One try for the dial and the writes: whatever ends this task, a cancel during the dial
        # included, the finally counts what was queued for this peer as never written.
        try:
            try:
                # A dial's nursery may group its failures: unwrapped, they are the TransportError caught here.
                with transport_errors_unwrapped(), trio.fail_after(max(1.0, 4 * self.swim.config.probe_interval)):
                    if not self.host.is_connected(pid):
                        # Not a neighbour (a ping for someone's indirect probe, a suspect told it is
                        # suspected): dial the addresses the member signed in its own alive.
                        self.stats["dials"] += 1
                        member = self.swim.members.get(peer)
                        if member is not None:
                            self._learn_addrs(pid, member.addrs)
                    stream = await self.host.new_stream(pid, PROTOCOL)
            except (TransportError, trio.TooSlowError) as exc:
                log.debug("no swim stream %s", logfmt.kv(peer=pid.short(), reason=exc or type(exc).__name__))
                self.stats["dropped_unreachable"] += 1
                stream = None
            if stream is not None:
                async with stream:
                    async for data in recv:
                        await stream.send_all(data)
                        self.stats["messages_sent"] += 1
                        self.stats["bytes_sent"] += len(data)
                    if self._leaving:  # leave() closed our queue after our "left": wait until it is read
                        await hand_over(stream)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("swim stream ended %s", logfmt.kv(peer=pid.short(), reason=exc or type(exc).__name__))
        finally:
            if self._senders.get(peer) is send:
                del self._senders[peer]
            recv.close()  # what was queued for this peer will never be written
            self._progress.set()
            self._progress = trio.Event()

    async def handle(self, stream: Any) -> None:
        peer: PeerId = stream.remote_peer
        if self._inbound.get(peer, 0) >= self.config.nodetable_max_streams:
            self.stats["streams_refused"] += 1
            self._refusals.warning("extra_stream", "refused swim stream", reason="extra_stream")
            stream.reset()
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        sender = str(peer)
        reader = Reader(MAX_MESSAGE, KINDS, "swim")
        deadline = math.inf
        try:
            while True:
                data = await receive_before(stream, deadline, RECEIVE)
                if data is None:
                    self.stats["streams_timed_out"] += 1
                    self._refusals.warning("message_timeout", "refused swim stream", reason="message_timeout")
                    stream.reset()
                    return
                if not data:
                    return
                self.stats["bytes_received"] += len(data)
                now = trio.current_time()
                self._receive(sender, reader.feed(data), now)
                self._flush()
                self._kick()
                if not reader.partial:
                    deadline = math.inf
                elif deadline == math.inf:
                    deadline = now + self.config.nodetable_message_timeout
        except ProtocolError as exc:
            self.stats["bad_messages"] += 1
            self._refusals.warning("bad_message", "refused swim message", reason="bad_message")
            log.debug("bad swim message %s", logfmt.kv(peer=peer.short(), reason=exc))
            stream.reset()
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            left = self._inbound.get(peer, 1) - 1
            if left:
                self._inbound[peer] = left
            else:
                self._inbound.pop(peer, None)

    def _receive(self, sender: str, objs: list[Any], now: float) -> None:
        """Hand decoded messages to the machine (in a frame of its own: none is kept while the stream waits)."""
        for obj in objs:
            message, bad = messages.from_wire(obj)
            self.stats["messages_received"] += 1
            self.stats["dropped_items"] += bad
            self.swim.receive(sender, message, now)

    async def _watch_peers(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with self.host.subscribe() as events:
            self._set_neighbors()
            for peer in self.host.connected_peers():
                self.swim.connected(str(peer))
            self._flush()
            task_status.started()
            async for event in events:
                self._set_neighbors()
                text = str(event.peer)
                if event.kind == "connected":
                    self.swim.connected(text)
                else:
                    send = self._senders.pop(text, None)
                    if send is not None:
                        send.close()
                    self.swim.disconnected(text)
                self._flush()
                self._kick()

    def _set_neighbors(self) -> None:
        self.swim.set_neighbors([str(p) for p in self.host.connected_peers()])

    async def _keep_degree(self) -> None:
        """Dial random living members while below the degree; now and then a recently dead one."""
        degree = self.config.membership_degree
        rng = self.swim.rng
        last_revive = trio.current_time()
        while True:
            await trio.sleep(KEEPER_INTERVAL * (0.5 + rng.random()))
            connected = {str(p) for p in self.host.connected_peers()}
            missing = degree - len(connected)
            members = self.swim.members
            if missing > 0:
                candidates = [p for p, m in members.items() if not m.status.gone and p not in connected and m.addrs]
                for peer in rng.sample(candidates, min(missing, 2, len(candidates))):
                    self._dial(peer, members[peer].addrs)
            now = trio.current_time()
            if now - last_revive >= self.swim.config.anti_entropy:
                last_revive = now
                gone = [p for p, m in members.items() if m.status == Status.DEAD and p not in connected and m.addrs]
                if gone:
                    peer = rng.choice(gone)
                    self._dial(peer, members[peer].addrs)

    def _dial(self, peer: str, addrs: tuple[str, ...]) -> None:
        pid = self._pid(peer)
        if pid is None or self._nursery is None:
            return
        self._learn_addrs(pid, addrs)
        self.stats["dials"] += 1
        self._nursery.start_soon(self._connect, pid)

    def _learn_addrs(self, pid: PeerId, addrs: tuple[str, ...]) -> None:
        """Give the host the addresses a member published (signed), so it can be dialed."""
        self.host.add_addrs(pid, [a for a in addrs if _parses(a)])

    async def _connect(self, pid: PeerId) -> None:
        """Connect only; the "connected" event then introduces us and opens the probe stream.

        Through the host's dial (its order, its short shared try of a NATed
        member's direct addresses before its relays): dialing the addresses
        in the order learned tried a NATed member's dead LAN addresses every
        round and never its relay, holding the member's one dial for 2 s of
        each round, so a gateway's dial to it waited behind ours.
        """
        with trio.move_on_after(max(2.0, 4 * self.swim.config.probe_interval)):
            try:
                await self.host.connect_peer(pid, resolve=False)
            except TransportError as exc:
                log.debug("degree dial failed %s", logfmt.kv(peer=pid.short(), reason=exc))

    async def leave(self) -> None:
        """Sign our departure and deliver it to every neighbour (at most a second).

        Delivered, not written: after the "left", each neighbour's sender
        half-closes its stream and ends when the neighbour closes its side,
        which its handler does only after reading all we sent. Closing the
        connection right after the write reset the stream, and the neighbour
        dropped what it had not read yet: our "left" with it.
        """
        own = self.swim.leave()
        neighbours = list(self.swim.neighbors)
        for peer in neighbours:
            self.swim.outbox.append((peer, messages.Gossip((own,))))
        self._leaving = True
        self._flush()
        for peer in neighbours:
            send = self._senders.get(peer)
            if send is not None:
                send.close()  # its sender writes what is queued, then hands the stream over
        with trio.move_on_after(LEAVE_BUDGET):
            while any(peer in self._senders for peer in neighbours):
                await self._progress.wait()
        unconfirmed = sum(peer in self._senders for peer in neighbours)
        log.info("left membership %s", logfmt.kv(neighbours=len(neighbours), unconfirmed=unconfirmed))


def _parses(text: str) -> bool:
    try:
        Multiaddr.parse(text)
    except Exception:  # noqa: BLE001 - a member's bad address is its problem
        return False
    return True


@contextlib.asynccontextmanager
async def open_membership(
    host: Host, identity: Identity, config: Config, verifier: Verifier | None = None
) -> AsyncIterator[Membership]:
    membership = Membership(host, identity, config, verifier)
    host.set_stream_handler(PROTOCOL, membership.handle)
    async with trio.open_nursery() as nursery:
        membership._nursery = nursery
        await nursery.start(membership._watch_peers)
        nursery.start_soon(membership._clock)
        nursery.start_soon(membership._keep_degree)
        try:
            yield membership
        finally:
            with trio.CancelScope(shield=True):
                await membership.leave()
            nursery.cancel_scope.cancel()
            host.remove_stream_handler(PROTOCOL)
