"""The transport's resource manager: budgets for what peers may make a node hold.

In the spirit of go-libp2p's ``rcmgr``: every connection, pending handshake,
stream and buffered byte is *reserved* from a scope before it is used and
released when it is gone, and a reservation that would cross a scope's limit
is refused. The scopes, and why each exists:

- **system**: the whole node. Bounds the total a crowd of peers can pin, so
  the process stays within its memory and file descriptors.
- **ip** (source address of an inbound connection; IPv6 grouped by /64,
  which one host usually owns whole): pending handshakes, connections and
  pre-upgrade buffered bytes. A single machine cannot fill the system-wide
  handshake slots and lock out everyone else, which is what a squatter
  sending half a handshake on many sockets would otherwise do.
- **peer** (authenticated peer ID): connections, streams and bytes held in
  receive buffers, so one peer cannot use up the system budget alone.

Refusals are counted by (scope kind, resource), never by peer or address, so
the counters stay bounded however many attackers there are; they and the
usage are what ``/metrics`` shows. Scopes of peers and addresses that hold
nothing are dropped at once: the tables grow with what is in use, not with
how many peers ever came by.

Everything here is synchronous bookkeeping: the Trio code in host, tcp,
websocket and muxer asks before it allocates and releases in ``finally``.
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Hashable, Iterator

import attrs
import trio

from .. import log as logfmt
from ..errors import ResourceLimitExceeded

log = logging.getLogger("ocf.transport.resources")

#: Resources a scope accounts for.
RESOURCES = ("handshakes", "conns_inbound", "conns_outbound", "streams_inbound", "streams_outbound", "memory")
#: Seconds between two log lines about refusals of the same kind.
REFUSAL_LOG_INTERVAL = 10.0


@attrs.frozen
class Limits:
    """Every budget of the resource manager (see the transport settings in :mod:`ocf.config`)."""

    connections: int = 512  # system, both directions
    inbound_connections: int = 384  # system; the rest stays free for our own dials
    connections_per_peer: int = 8
    connections_per_ip: int = 32  # inbound, established
    handshakes: int = 64  # system, pending inbound
    handshakes_per_ip: int = 8
    streams: int = 16384  # system, both directions
    streams_per_peer: int = 1024
    memory: int = 512 << 20  # system, bytes held in receive buffers
    memory_per_peer: int = 32 << 20
    memory_per_ip: int = 64 << 20  # unread bytes from one address, all its peers and WebSocket messages

    @classmethod
    def from_config(cls, config: object) -> Limits:
        """Limits from a :class:`~ocf.config.Config` (missing attributes keep the defaults)."""
        values = {}
        for name, attr in _CONFIG_NAMES.items():
            if hasattr(config, attr):
                values[name] = getattr(config, attr)
        return cls(**values)


_CONFIG_NAMES = {
    "connections": "max_connections",
    "inbound_connections": "max_inbound_connections",
    "connections_per_peer": "max_connections_per_peer",
    "connections_per_ip": "max_connections_per_ip",
    "handshakes": "max_pending_handshakes",
    "handshakes_per_ip": "max_pending_handshakes_per_ip",
    "streams": "max_system_streams",
    "streams_per_peer": "max_streams_per_peer",
    "memory": "max_buffered",
    "memory_per_peer": "max_buffered_per_peer",
    "memory_per_ip": "max_buffered_per_ip",
}


class Scope:
    """Usage of one scope; limits are looked up by the manager (they differ by kind)."""

    __slots__ = ("kind", "key", "usage")

    def __init__(self, kind: str, key: Hashable) -> None:
        self.kind = kind
        self.key = key
        self.usage = dict.fromkeys(RESOURCES, 0)

    @property
    def idle(self) -> bool:
        return not any(self.usage.values())

    def __repr__(self) -> str:
        used = ",".join(f"{k}={v}" for k, v in self.usage.items() if v)
        return f"<Scope {self.kind} {used or 'idle'}>"


def ip_key(addr: object) -> str | None:
    """The per-address scope key of a remote multiaddr (``None``: not an IP, e.g. in-memory).

    IPv6 is grouped by /64: a host gets a whole /64 and could otherwise
    pose as 2**64 sources.
    """
    parts = getattr(addr, "parts", None)
    if not parts or parts[0][0] not in ("ip4", "ip6"):
        return None
    text = parts[0][1] or ""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class ResourceManager:
    """Reserve-or-refuse accounting for the transport. One per host."""

    def __init__(self, limits: Limits | None = None, *, log_interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.limits = limits or Limits()
        self.system = Scope("system", None)
        self._peers: dict[Hashable, Scope] = {}
        self._ips: dict[str, Scope] = {}
        #: (scope kind, resource) -> reservations refused.
        self.refusals: collections.Counter[tuple[str, str]] = collections.Counter()
        self._log = logfmt.RateLimitedLog(log, log_interval)
        #: pending handshake slots by source address, oldest first (for eviction)
        self._pending: dict[str | None, collections.deque[HandshakeSlot]] = {}
        self._build_limits()

    # --- limits ------------------------------------------------------------------------------

    def _build_limits(self) -> None:
        """Per kind of scope: resource -> limit, and the limits over several resources at once."""
        lim = self.limits
        self._single: dict[str, dict[str, int]] = {
            "system": {"handshakes": lim.handshakes, "conns_inbound": lim.inbound_connections, "memory": lim.memory},
            "ip": {
                "handshakes": lim.handshakes_per_ip,
                "conns_inbound": lim.connections_per_ip,
                "memory": lim.memory_per_ip,
            },
            "peer": {"memory": lim.memory_per_peer},
        }
        # (limit, resources summed): connections both ways, streams both ways.
        # The system's connection count includes pending handshakes: they
        # become connections, and a burst of them must not overshoot.
        conns = ("conns_inbound", "conns_outbound")
        streams = ("streams_inbound", "streams_outbound")
        self._combined: dict[str, dict[str, tuple[int, tuple[str, ...]]]] = {
            "system": {
                **dict.fromkeys(conns, (lim.connections, conns + ("handshakes",))),
                **dict.fromkeys(streams, (lim.streams, streams)),
            },
            "ip": {},
            "peer": {
                **dict.fromkeys(conns, (lim.connections_per_peer, conns)),
                **dict.fromkeys(streams, (lim.streams_per_peer, streams)),
            },
        }

    # --- reservations --------------------------------------------------------------------------

    def _scopes(self, peer: Hashable | None, ip: str | None, *, create: bool) -> list[Scope]:
        scopes = [self.system]
        if ip is not None:
            scope = self._ips.get(ip)
            if scope is None and create:
                scope = self._ips[ip] = Scope("ip", ip)
            if scope is not None:
                scopes.append(scope)
        if peer is not None:
            scope = self._peers.get(peer)
            if scope is None and create:
                scope = self._peers[peer] = Scope("peer", peer)
            if scope is not None:
                scopes.append(scope)
        return scopes

    def try_reserve(self, resource: str, n: int = 1, *, peer: Hashable | None = None, ip: str | None = None) -> bool:
        """Reserve ``n`` of ``resource`` in the system scope and the given peer/ip scopes; all or nothing.

        A refusal is counted and logged (rate-limited) under the innermost
        scope that said no; ``False`` is returned and nothing is held.
        """
        scopes = self._scopes(peer, ip, create=True)
        for scope in reversed(scopes):  # innermost first: the most specific reason wins
            usage = scope.usage
            limit = self._single[scope.kind].get(resource)
            if limit is not None and usage[resource] + n > limit:
                self._refuse(scope, resource, limit)
                self._prune(scopes)
                return False
            combined = self._combined[scope.kind].get(resource)
            if combined is not None and sum(usage[r] for r in combined[1]) + n > combined[0]:
                self._refuse(scope, resource, combined[0])
                self._prune(scopes)
                return False
        for scope in scopes:
            scope.usage[resource] += n
        return True

    def reserve(self, resource: str, n: int = 1, *, peer: Hashable | None = None, ip: str | None = None) -> None:
        """Like :meth:`try_reserve`, raising :class:`~ocf.errors.ResourceLimitExceeded` on refusal."""
        if not self.try_reserve(resource, n, peer=peer, ip=ip):
            raise ResourceLimitExceeded(f"resource limit reached: {resource}", resource=resource)

    def release(self, resource: str, n: int = 1, *, peer: Hashable | None = None, ip: str | None = None) -> None:
        """Give back what :meth:`try_reserve` took (same arguments)."""
        scopes = self._scopes(peer, ip, create=False)
        for scope in scopes:
            left = scope.usage[resource] - n
            if left < 0:
                log.error(
                    "resource released twice %s",
                    logfmt.kv(scope=scope.kind, resource=resource, n=n, held=scope.usage[resource]),
                )
                left = 0
            scope.usage[resource] = left
        self._prune(scopes)

    def _prune(self, scopes: list[Scope]) -> None:
        for scope in scopes:
            if scope.idle:
                if scope.kind == "peer":
                    self._peers.pop(scope.key, None)
                elif scope.kind == "ip":
                    self._ips.pop(str(scope.key), None)

    def _refuse(self, scope: Scope, resource: str, limit: int) -> None:
        self.refusals[scope.kind, resource] += 1
        self._log.info(
            f"{scope.kind}:{resource}", "refused: resource limit", scope=scope.kind, resource=resource, limit=limit
        )

    def note_refusal(self, scope: str, resource: str, message: str, **fields: object) -> None:
        """Count and log (rate-limited) a refusal decided elsewhere (e.g. accept failing, a deadline)."""
        self.refusals[scope, resource] += 1
        self._log.info(f"{scope}:{resource}", message, scope=scope, resource=resource, **fields)

    # --- handles the transport code holds --------------------------------------------------------

    def handshake(self, ip: str | None, timeout: float) -> HandshakeSlot | None:
        """A pending-handshake slot for an inbound connection from ``ip``, or ``None`` if refused.

        The slot carries one deadline for the whole upgrade (sniffing, the
        WebSocket upgrade, multistream, Noise, multistream again), so no step
        can restart the clock.
        """
        # A handshake that could only end in a refused connection is refused
        # now, before any crypto is spent on it.
        lim, sys_usage = self.limits, self.system.usage
        pending = sys_usage["handshakes"]
        if sys_usage["conns_inbound"] + sys_usage["conns_outbound"] + pending >= lim.connections:
            self._refuse(self.system, "connections", lim.connections)
            return None
        if sys_usage["conns_inbound"] + pending >= lim.inbound_connections:
            self._refuse(self.system, "conns_inbound", lim.inbound_connections)
            return None
        scope = self._ips.get(ip) if ip is not None else None
        if scope is not None and scope.usage["conns_inbound"] + scope.usage["handshakes"] >= lim.connections_per_ip:
            self._refuse(scope, "conns_inbound", lim.connections_per_ip)
            return None
        if pending >= lim.handshakes:
            self._evict_for(ip)
        if not self.try_reserve("handshakes", ip=ip):
            return None
        slot = HandshakeSlot(self, ip, trio.current_time() + timeout)
        self._pending.setdefault(ip, collections.deque()).append(slot)
        return slot

    def _evict_for(self, ip: str | None) -> None:
        """All handshake slots are taken: free one from the address holding the most, if it holds more than ``ip``.

        The per-address limit keeps one host from taking every slot; this
        keeps a few hosts together from doing it: a newcomer from a less
        busy address displaces the oldest pending handshake of the busiest
        one, so squatting many slots only ever makes one's own slots go first.
        """
        mine = len(self._pending.get(ip, ()))
        busiest = max(self._pending.items(), key=lambda item: len(item[1]), default=None)
        if busiest is None or len(busiest[1]) <= mine + 1:
            return
        for slot in busiest[1]:
            if slot.cancel_scope is not None:
                self.note_refusal("ip", "handshake_evicted", "pending handshake evicted for a less busy address")
                slot.evict()
                return

    def _forget_slot(self, slot: HandshakeSlot) -> None:
        slots = self._pending.get(slot.ip)
        if slots is not None:
            with contextlib.suppress(ValueError):
                slots.remove(slot)
            if not slots:
                del self._pending[slot.ip]

    def peer_scope(self, peer: Hashable, ip: str | None = None) -> PeerResources:
        """What one connection to ``peer`` (from or to address ``ip``) charges."""
        return PeerResources(self, peer, ip)

    # --- introspection ----------------------------------------------------------------------------

    def usage(self) -> dict[str, int]:
        """System-wide usage by resource, plus how many peer and address scopes are live."""
        out = dict(self.system.usage)
        out["peers"] = len(self._peers)
        out["ips"] = len(self._ips)
        return out

    def peer_usage(self, peer: Hashable) -> dict[str, int]:
        scope = self._peers.get(peer)
        return dict(scope.usage) if scope is not None else dict.fromkeys(RESOURCES, 0)

    def ip_usage(self, ip: str) -> dict[str, int]:
        scope = self._ips.get(ip)
        return dict(scope.usage) if scope is not None else dict.fromkeys(RESOURCES, 0)

    def max_usage(self, kind: str) -> dict[str, int]:
        """The largest usage of each resource over live scopes of ``kind`` ("peer" or "ip")."""
        scopes = self._peers.values() if kind == "peer" else self._ips.values()
        out = dict.fromkeys(RESOURCES, 0)
        for scope in scopes:
            for resource, value in scope.usage.items():
                if value > out[resource]:
                    out[resource] = value
        return out

    def limits_by_scope(self) -> Iterator[tuple[str, str, int]]:
        """(scope kind, resource, limit) for every configured limit (for /metrics)."""
        lim = self.limits
        yield from (
            ("system", "connections", lim.connections),
            ("system", "conns_inbound", lim.inbound_connections),
            ("system", "handshakes", lim.handshakes),
            ("system", "streams", lim.streams),
            ("system", "memory", lim.memory),
            ("peer", "connections", lim.connections_per_peer),
            ("peer", "streams", lim.streams_per_peer),
            ("peer", "memory", lim.memory_per_peer),
            ("ip", "conns_inbound", lim.connections_per_ip),
            ("ip", "handshakes", lim.handshakes_per_ip),
            ("ip", "memory", lim.memory_per_ip),
        )


class HandshakeSlot:
    """One pending inbound handshake; :meth:`release` is idempotent."""

    __slots__ = ("_rm", "ip", "deadline", "_held", "on_release", "cancel_scope")

    def __init__(self, rm: ResourceManager, ip: str | None, deadline: float) -> None:
        self._rm = rm
        self.ip = ip
        self.deadline = deadline
        self._held = True
        #: called once the handshake is over (e.g. WebSocket lifts its handshake-sized message cap)
        self.on_release: list[Callable[[], None]] = []
        #: set by the transport holding the connection: cancelling it drops the connection (eviction)
        self.cancel_scope: trio.CancelScope | None = None

    @property
    def held(self) -> bool:
        return self._held

    def evict(self) -> None:
        """Drop this pending handshake to make room for another."""
        if self._held and self.cancel_scope is not None:
            self._held = False
            self._rm._forget_slot(self)
            self._rm.release("handshakes", ip=self.ip)
            self.on_release.clear()
            self.cancel_scope.cancel()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._rm._forget_slot(self)
            self._rm.release("handshakes", ip=self.ip)
            for callback in self.on_release:
                callback()
            self.on_release.clear()


class PeerResources:
    """What one upgraded connection charges to its peer's scope (streams and buffered bytes).

    Buffered bytes are also charged to the remote address's scope, so that
    many identities from one host cannot together take the node's whole
    budget (and with it, every other peer's room to receive).

    The muxer holds one per connection. ``memory_held`` is what this
    connection holds now, so closing it gives everything back even if a
    stream forgot to.
    """

    __slots__ = ("rm", "peer", "ip", "memory_held", "streams_held")

    def __init__(self, rm: ResourceManager, peer: Hashable, ip: str | None = None) -> None:
        self.rm = rm
        self.peer = peer
        self.ip = ip
        self.memory_held = 0
        self.streams_held = collections.Counter[str]()

    def open_stream(self, inbound: bool) -> bool:
        resource = "streams_inbound" if inbound else "streams_outbound"
        if not self.rm.try_reserve(resource, peer=self.peer):
            return False
        self.streams_held[resource] += 1
        return True

    def close_stream(self, inbound: bool) -> None:
        resource = "streams_inbound" if inbound else "streams_outbound"
        if self.streams_held[resource] > 0:
            self.streams_held[resource] -= 1
            self.rm.release(resource, peer=self.peer)

    def reserve_memory(self, n: int) -> bool:
        if n <= 0:
            return True
        if not self.rm.try_reserve("memory", n, peer=self.peer, ip=self.ip):
            return False
        self.memory_held += n
        return True

    def release_memory(self, n: int) -> None:
        n = min(n, self.memory_held)
        if n > 0:
            self.memory_held -= n
            self.rm.release("memory", n, peer=self.peer, ip=self.ip)

    def close(self) -> None:
        """The connection is gone: release whatever it still holds."""
        self.release_memory(self.memory_held)
        for resource, count in list(self.streams_held.items()):
            if count:
                self.rm.release(resource, count, peer=self.peer)
        self.streams_held.clear()
