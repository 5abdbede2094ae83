"""SWIM membership as a sans-IO state machine: feed it time and messages, it says what to send.

Why SWIM and not the node table: liveness in the table meant every node
signing a heartbeat every round and every node relaying every heartbeat,
O(N) per node per round. Here a node probes one neighbour per period
(``ping``; if no ``ack`` by ``ack_timeout``, ``k`` neighbours ping it for us
with ``preq``), suspects it when nothing comes back, and declares it dead
only after ``suspicion`` seconds in which the suspect may refute. News rides
on probes and on small gossip pushes to ``fanout`` neighbours, each update
once to each neighbour but the one it came from; anti-entropy compares 64
bucket digests with one neighbour and exchanges only the buckets that
differ, which repairs what gossip missed (a partition, a long absence). No
message grows with N.

Probes go to *neighbours* (the peers the driver keeps connected, a bounded
degree), not to random members: over libp2p a probe to a stranger would
cost a Noise handshake. Every node keeps ``degree`` neighbours, so every
node has several monitors.

Hostile peers: ``alive`` and ``left`` are verified owner signatures, at most
``verify_rate`` per sending peer per second and ``verify_total`` for all
senders together; ``suspect``/``dead`` count only
for an incarnation the owner signed; the table holds at most
``max_members``; relayed ping requests are capped.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable

import attrs

from ..nodetable.heartbeat import TOTAL_VERIFY_BURST, TokenBucket, take_both
from .messages import BUCKETS, Ack, Digest, Gossip, Message, Page, Ping, PingReq
from .update import Signer, Status, Update, Verifier, bucket_add, bucket_discard, bucket_of, state_hash

COUNTERS = (
    "probes",
    "probes_failed",
    "indirect_probes",
    "suspected",
    "declared_dead",
    "refuted",
    "updates_received",
    "updates_applied",
    "updates_bad",
    "signatures_checked",
    "signatures_bad",
    "verify_deferred",
    "refused_full",
    "refused_unproven",
    "relays_refused",
    "digests",
    "pages_sent",
    "pages_received",
)


def _same(text: str) -> str:
    return text


@attrs.frozen
class SwimConfig:
    probe_interval: float = 0.5
    ack_timeout: float = 0.25
    indirect: int = 3
    suspicion: float = 5.0
    gossip_interval: float = 0.2
    fanout: int = 3
    max_piggyback: int = 8
    #: Each update goes to every neighbour when a node has at most this many (the degree it keeps),
    #: else to this many or SWIM's 3·⌈log10 N⌉, whichever is more: a hub with hundreds of
    #: neighbours would otherwise send every update hundreds of times (each of those neighbours
    #: keeps neighbours of its own, who tell it).
    spread: int = 8
    anti_entropy: float = 30.0
    dead_keep: float = 120.0
    max_members: int = 4096
    verify_rate: float = 1000.0
    verify_total: float = 1000.0  # all senders together, burst TOTAL_VERIFY_BURST x
    load_interval: float = 2.0
    max_relays: int = 256
    #: Relayed pings one asker may have outstanding. An honest prober asks k helpers once per probe,
    #: and a relay lives one probe interval, so it holds one or two; a hostile one would make us
    #: dial the addresses of every member it names (each signed by that member, but maybe a victim's).
    max_relays_per_asker: int = 8
    #: Lifeguard's local health: each probe we could not complete raises a score (to this cap) that
    #: stretches our timeouts, each success lowers it. A starved node blames itself, not its peers.
    max_health: int = 8


@attrs.define
class Member:
    incarnation: int
    status: Status
    since: float
    proof: Update  # the owner-signed alive/left this state rests on

    @property
    def load(self) -> int:
        return self.proof.load

    @property
    def addrs(self) -> tuple[str, ...]:
        return self.proof.addrs


@attrs.define(slots=True)
class _News:
    """An update still to spread, and who has been sent it."""

    update: Update
    told: set[str] = attrs.Factory(set)


@attrs.define
class _Probe:
    target: str
    seq: int
    sent: float
    acked: bool = False
    indirect: bool = False


class Swim:
    """One node's view of the membership. Not thread-safe; one driver calls it."""

    def __init__(
        self,
        me: str,
        sign: Signer,
        verify: Verifier,
        now: float,
        *,
        incarnation: int,
        addrs: tuple[str, ...] = (),
        config: SwimConfig | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.me = me
        self.config = config or SwimConfig()
        self._sign = sign
        self._verify = verify
        self.rng = rng or random.Random()
        self.incarnation = incarnation
        self.addrs = addrs
        self.load = 0
        self._published_load = 0
        self._load_at = now
        self.members: dict[str, Member] = {}
        #: Maps a member's name to the one string object this node keeps for it (the driver shares the
        #: node table's); each update arrives with a fresh copy of the name, and a kept proof keeps it.
        self.intern: Callable[[str], str] = _same
        self.digest = [0] * BUCKETS
        #: The members of each digest bucket, so a page costs its bucket's size, not the table's.
        self._in_bucket: list[list[str]] = [[] for _ in range(BUCKETS)]  # sorted (update.bucket_add)
        self.outbox: list[tuple[str, Message]] = []
        self.changes: list[tuple[str, Status]] = []
        self.stats = dict.fromkeys(COUNTERS, 0)
        self.neighbors: list[str] = []
        self._order: list[str] = []
        self._gossip_order: list[str] = []
        self._queue: dict[str, _News] = {}  # member -> the newest claim about it still to spread, newest last
        self._seq = 0
        self._probe: _Probe | None = None
        self._next_probe = now
        self._next_gossip = now
        self._next_ae = now + self.config.anti_entropy
        self._timers: collections.deque[tuple[float, str, int]] = collections.deque()  # suspicion deadlines
        self._tombs: collections.deque[tuple[float, str, int]] = collections.deque()  # forget gone members
        self._relays: dict[int, tuple[str, int, float]] = {}  # our seq -> (asker, its seq, expiry)
        self._buckets: dict[str, TokenBucket] = {}
        # All senders' checks together (identities are cheap): see the node table's Intake._may_verify.
        total = self.config.verify_total
        self._verify_total = TokenBucket.full(total, TOTAL_VERIFY_BURST * total, now)
        self.health = 0
        self._urgent: list[str] = []  # members to probe next, out of turn (we lost our connection to them)
        self.own: Update = self._sign_own(Status.ALIVE)
        self._enqueue(self.own)

    # --- driver API -------------------------------------------------------------------------

    def set_neighbors(self, peers: list[str]) -> None:
        """The peers we hold connections to (probe targets and gossip fanout)."""
        self.neighbors = [p for p in peers if p != self.me]
        gone = set(self._buckets) - set(self.neighbors)
        for peer in gone:
            del self._buckets[peer]

    def connected(self, peer: str) -> None:
        """A new neighbour: introduce ourselves and compare digests."""
        self._send(peer, Ping(self._next_seq(), (self.own,) + self._piggyback(peer, self.config.max_piggyback - 1)))
        self._send(peer, Digest(tuple(self.digest), reply=True))

    def disconnected(self, peer: str) -> None:
        """Our connection to ``peer`` dropped: probe it next (a crash or a cut, or just a closed link)."""
        if self._usable(peer) and peer not in self._urgent:
            self._urgent.append(peer)
            if self._probe is None:
                self._next_probe = 0.0  # nothing in flight: probe it at the next tick

    def alive_members(self) -> list[str]:
        return [p for p, m in self.members.items() if not m.status.gone]

    def status(self, peer: str) -> Status | None:
        if peer == self.me:
            return Status.ALIVE
        member = self.members.get(peer)
        return member.status if member is not None else None

    def set_load(self, load: int) -> None:
        self.load = max(0, min(load, (1 << 31) - 1))

    def leave(self) -> Update:
        """Sign our departure; the driver pushes it to every neighbour before closing."""
        self.own = self._sign_own(Status.LEFT)
        self._enqueue(self.own)
        return self.own

    def tick(self, now: float) -> None:
        cfg = self.config
        if self._probe is not None and not self._probe.acked:
            probe = self._probe
            if not probe.indirect and now >= probe.sent + self._scaled(cfg.ack_timeout):
                probe.indirect = True
                helpers = [p for p in self.neighbors if p != probe.target and self._usable(p)]
                for helper in self.rng.sample(helpers, min(cfg.indirect, len(helpers))):
                    self.stats["indirect_probes"] += 1
                    self._send(helper, PingReq(probe.seq, probe.target, self._piggyback(helper)))
        if now >= self._next_probe:
            self._finish_probe(now)
            self._start_probe(now)
            self._next_probe = now + self._scaled(cfg.probe_interval)
        while self._timers and self._timers[0][0] <= now:
            _, peer, inc = self._timers.popleft()
            member = self.members.get(peer)
            if member is not None and member.status == Status.SUSPECT and member.incarnation == inc:
                self.stats["declared_dead"] += 1
                self._apply_state(peer, member, inc, Status.DEAD, now)
                dead = Update(peer, inc, Status.DEAD)
                self._enqueue(dead)
                self._send(peer, Gossip((dead,)))
        while self._tombs and self._tombs[0][0] <= now:
            _, peer, inc = self._tombs.popleft()
            member = self.members.get(peer)
            if member is not None and member.status.gone and member.incarnation == inc:
                self._set_digest(peer, member, None)
                del self.members[peer]
        for seq in [s for s, (_, _, exp) in self._relays.items() if exp <= now]:
            del self._relays[seq]
        if self.load != self._published_load and now >= self._load_at + cfg.load_interval:
            self._published_load, self._load_at = self.load, now
            self.incarnation += 1
            self.own = self._sign_own(Status.ALIVE)
            self._enqueue(self.own)
        if self._queue and now >= self._next_gossip and self.neighbors:
            self._next_gossip = now + cfg.gossip_interval
            for peer in self._gossip_targets(min(cfg.fanout, len(self.neighbors))):
                updates = self._piggyback(peer)
                if updates:
                    self._send(peer, Gossip(updates))
        if now >= self._next_ae:
            self._next_ae = now + cfg.anti_entropy
            if self.neighbors:
                self._send(self.rng.choice(self.neighbors), Digest(tuple(self.digest), reply=True))

    def next_deadline(self) -> float:
        """When :meth:`tick` next has work (the driver sleeps until then or a message)."""
        t = min(self._next_probe, self._next_ae)
        if self._probe is not None and not self._probe.indirect and not self._probe.acked:
            t = min(t, self._probe.sent + self._scaled(self.config.ack_timeout))
        if self._queue and self.neighbors:
            t = min(t, self._next_gossip)
        if self._timers:
            t = min(t, self._timers[0][0])
        if self._tombs:
            t = min(t, self._tombs[0][0])
        due = self.load_due()
        if due is not None:
            t = min(t, due)
        return t

    def load_due(self) -> float | None:
        """When the load set last is due to be signed and sent; None when what is published is current."""
        if self.load == self._published_load:
            return None
        return self._load_at + self.config.load_interval

    def receive(self, sender: str, message: Message, now: float) -> None:
        if isinstance(message, Ping):
            self._absorb(sender, message.updates, now)
            self._send(sender, Ack(message.seq, self._piggyback(sender)))
        elif isinstance(message, Ack):
            self._absorb(sender, message.updates, now)
            if self._probe is not None and self._probe.seq == message.seq:
                self._probe.acked = True
            relay = self._relays.pop(message.seq, None)
            if relay is not None:
                self._send(relay[0], Ack(relay[1], self._piggyback(relay[0])))
        elif isinstance(message, PingReq):
            self._absorb(sender, message.updates, now)
            member = self.members.get(message.target)
            if (
                member is None
                or member.status.gone
                or len(self._relays) >= self.config.max_relays
                or sum(asker == sender for asker, _, _ in self._relays.values()) >= self.config.max_relays_per_asker
            ):
                self.stats["relays_refused"] += 1
                return
            seq = self._next_seq()
            self._relays[seq] = (sender, message.seq, now + self.config.probe_interval)
            self._send(message.target, Ping(seq, self._piggyback(message.target)))
        elif isinstance(message, Gossip):
            self._absorb(sender, message.updates, now)
        elif isinstance(message, Digest):
            self.stats["digests"] += 1
            for bucket, theirs in enumerate(message.hashes):
                if theirs != self.digest[bucket]:
                    self._send(sender, self._page(bucket))
            if message.reply and tuple(self.digest) != message.hashes:
                self._send(sender, Digest(tuple(self.digest), reply=False))
        else:
            self.stats["pages_received"] += 1
            for proof, opinion in message.members:
                if bucket_of(proof.peer, BUCKETS) != message.bucket:
                    self.stats["updates_bad"] += 1
                    continue
                if self.apply(sender, proof, now) is None:
                    continue
                if opinion is not None:
                    self.apply(sender, opinion, now)

    # --- applying claims ----------------------------------------------------------------------

    def _absorb(self, sender: str, updates: tuple[Update, ...], now: float) -> None:
        for update in updates:
            self.apply(sender, update, now)

    def apply(self, sender: str, u: Update, now: float) -> bool | None:
        """Take one claim; True if it changed our view, False if old news, None if refused."""
        self.stats["updates_received"] += 1
        if u.peer == self.me:
            return self._about_me(sender, u)
        member = self.members.get(u.peer)
        if u.status.signed:
            if member is not None and not u.beats(member.incarnation, member.status):
                return False
            if member is None and len(self.members) >= self.config.max_members and not self._make_room():
                self.stats["refused_full"] += 1
                return None
            if not self._check(sender, u, now):
                return None
            name = self.intern(u.peer) if member is None else member.proof.peer
            if u.peer is not name:
                u = u.renamed(name)
            if member is None:
                member = self.members[u.peer] = Member(u.incarnation, u.status, now, u)
                self._set_digest(u.peer, None, member)
                self.changes.append((u.peer, u.status))
                if u.status.gone:
                    self._tombs.append((now + self.config.dead_keep, u.peer, u.incarnation))
            else:
                member.proof = u
                self._apply_state(u.peer, member, u.incarnation, u.status, now, force_change=True)
        else:
            if member is None or u.incarnation > member.proof.incarnation:
                self.stats["refused_unproven"] += 1
                return None
            if not u.beats(member.incarnation, member.status):
                return False
            self._apply_state(u.peer, member, u.incarnation, u.status, now)
        self.stats["updates_applied"] += 1
        self._enqueue(u)
        self._queue[u.peer].told.add(sender)  # it came from there: not sent back
        return True

    def _about_me(self, sender: str, u: Update) -> bool:
        if u.status.signed:
            # Only an older run of us can have signed a higher incarnation than we hold.
            if u.incarnation <= self.incarnation or not self._check(sender, u, None):
                return False
        elif u.incarnation != self.incarnation:
            return False  # an opinion about an incarnation we never signed proves nothing
        # Someone suspects us, or an older run of us signed a higher incarnation: outbid it.
        self.stats["refuted"] += 1
        self.incarnation = u.incarnation + 1
        self.own = self._sign_own(Status.LEFT if self.own.status == Status.LEFT else Status.ALIVE)
        self._enqueue(self.own)
        return True

    def _apply_state(
        self, peer: str, member: Member, inc: int, status: Status, now: float, force_change: bool = False
    ) -> None:
        old_status = member.status
        before = Member(member.incarnation, member.status, member.since, member.proof)
        member.incarnation, member.status, member.since = inc, status, now
        self._set_digest(peer, before, member)
        if status == Status.SUSPECT and old_status != Status.SUSPECT:
            self.stats["suspected"] += 1
            self._timers.append((now + self.config.suspicion, peer, inc))
        if status.gone and not old_status.gone:
            self._tombs.append((now + self.config.dead_keep, peer, inc))
        if status != old_status or force_change:
            self.changes.append((peer, status))

    def _check(self, sender: str, u: Update, now: float | None) -> bool:
        if now is not None:
            bucket = self._buckets.get(sender)
            if bucket is None:
                rate = self.config.verify_rate
                bucket = self._buckets[sender] = TokenBucket.full(rate, 2 * rate, now)
            if not take_both(bucket, self._verify_total, now):
                self.stats["verify_deferred"] += 1
                return False
        self.stats["signatures_checked"] += 1
        if not u.verify(self._verify):
            self.stats["signatures_bad"] += 1
            return False
        return True

    def _make_room(self) -> bool:
        """Forget the oldest gone member to admit a new one; living members are never evicted."""
        gone = [(m.since, p) for p, m in self.members.items() if m.status.gone]
        if not gone:
            return False
        _, peer = min(gone)
        self._set_digest(peer, self.members.pop(peer), None)
        return True

    # --- probing ------------------------------------------------------------------------------

    def _usable(self, peer: str) -> bool:
        member = self.members.get(peer)
        return member is not None and not member.status.gone

    def _start_probe(self, now: float) -> None:
        while self._urgent:
            target = self._urgent.pop(0)
            if self._usable(target):
                self.stats["probes"] += 1
                self._probe = _Probe(target, self._next_seq(), now)
                self._send(target, Ping(self._probe.seq, self._piggyback(target)))
                return
        for _ in range(2):
            while self._order:
                target = self._order.pop()
                if target in self.neighbors and self._usable(target):
                    self.stats["probes"] += 1
                    self._probe = _Probe(target, self._next_seq(), now)
                    self._send(target, Ping(self._probe.seq, self._piggyback(target)))
                    return
            self._order = list(self.neighbors)
            self.rng.shuffle(self._order)
        self._probe = None

    def _scaled(self, seconds: float) -> float:
        return seconds * (1 + self.health)

    def _finish_probe(self, now: float) -> None:
        probe, self._probe = self._probe, None
        if probe is None:
            return
        if probe.acked:
            self.health = max(0, self.health - 1)
            return
        self.health = min(self.config.max_health, self.health + 1)
        self.stats["probes_failed"] += 1
        member = self.members.get(probe.target)
        if member is None or member.status != Status.ALIVE:
            return
        self._apply_state(probe.target, member, member.incarnation, Status.SUSPECT, now)
        suspect = Update(probe.target, member.incarnation, Status.SUSPECT)
        self._enqueue(suspect)
        self._send(probe.target, Gossip((suspect,)))  # tell it at once: it refutes if it can hear us

    # --- dissemination ------------------------------------------------------------------------

    def _gossip_targets(self, k: int) -> list[str]:
        """The next ``k`` neighbours in a shuffled round: gossip reaches each neighbour in turn."""
        out: list[str] = []
        for _ in range(2 * k):
            if len(out) == k:
                break
            if not self._gossip_order:
                self._gossip_order = list(self.neighbors)
                self.rng.shuffle(self._gossip_order)
            peer = self._gossip_order.pop()
            if peer in self.neighbors and peer not in out:
                out.append(peer)
        return out

    def _enqueue(self, u: Update) -> None:
        self._queue.pop(u.peer, None)  # a newer claim about a member supersedes the older one
        self._queue[u.peer] = _News(u)

    def _piggyback(self, to: str, limit: int | None = None) -> tuple[Update, ...]:
        """The newest news ``to`` has not been sent; an update is done once every neighbour has been sent it
        (or :attr:`SwimConfig.spread` of them, more on a hub).

        SWIM sends each update λ·log N times to random members. With bounded
        degree a node hears news only from its neighbours, so here each
        update goes to each neighbour once (gossip goes round them in turn,
        and pings and acks carry what their peer lacks). λ·log N random sends
        (3 in a small network), partly spent on pings and acks to the same
        peer, missed one of four neighbours one time in four, and that node
        waited for the next anti-entropy round, 30 s later.
        """
        limit = self.config.max_piggyback if limit is None else limit
        spread = self._spread()
        out: list[Update] = []
        for peer in reversed(list(self._queue)):
            if len(out) >= limit:
                break
            news = self._queue[peer]
            if to not in news.told:
                out.append(news.update)
                news.told.add(to)
            if len(news.told) >= spread or news.told.issuperset(self.neighbors):
                del self._queue[peer]
        return tuple(out)

    def _spread(self) -> int:
        return max(self.config.spread, 3 * math.ceil(math.log10(len(self.members) + 2)))

    def _page(self, bucket: int) -> Page:
        self.stats["pages_sent"] += 1
        items: list[tuple[Update, Update | None]] = []
        for peer in self._in_bucket[bucket]:
            m = self.members[peer]
            opinion = None if m.status == m.proof.status else Update(peer, m.incarnation, m.status)
            items.append((m.proof, opinion))
        if bucket_of(self.me, BUCKETS) == bucket:
            items.append((self.own, None))
        return Page(bucket, tuple(items))

    def _set_digest(self, peer: str, old: Member | None, new: Member | None) -> None:
        b = bucket_of(peer, BUCKETS)
        if old is not None:
            self.digest[b] ^= state_hash(peer, old.incarnation, old.status)
        if new is not None:
            self.digest[b] ^= state_hash(peer, new.incarnation, new.status)
            bucket_add(self._in_bucket[b], peer)
        else:
            bucket_discard(self._in_bucket[b], peer)

    def _sign_own(self, status: Status) -> Update:
        old: Update | None = getattr(self, "own", None)
        b = bucket_of(self.me, BUCKETS)
        if old is not None:
            self.digest[b] ^= state_hash(self.me, old.incarnation, old.status)
        own = Update.signed(self._sign, self.me, self.incarnation, status, self._published_load, self.addrs)
        self.digest[b] ^= state_hash(self.me, own.incarnation, own.status)
        return own

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, peer: str, message: Message) -> None:
        self.outbox.append((peer, message))
