"""Who can serve a request, as this gateway sees it now: the table snapshot, liveness and peers.

:mod:`ocf.gateway.routing` decides from plain dictionaries which providers
match a request and in what order; this module feeds it the node table's
live entries (reused while the table is unchanged), remembers which peers
failed to connect lately (backing off exponentially), and opens the
``/libp2p-http`` stream to a peer, dialling addresses from its table entry
when the transport knows none.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from .. import log as logfmt
from ..errors import BadRequest, IdentityError, RelayRefused, TransportError
from . import routeindex, routing

if TYPE_CHECKING:
    from ..config import Config
    from ..identity import PeerId
    from ..ports import LocalServices, PeerDialer, ProviderDirectory
    from ..transport.muxer import MuxedStream

log = logging.getLogger("ocf.gateway")

LIBP2P_HTTP = "/libp2p-http"  # protocol id of HTTP over transport streams, as OCF
ENTRIES_TTL = 0.5  # seconds a node table snapshot is reused while the table's version is unchanged
#: The routing index is rebuilt when the table changes, at most this often, and at least every
#: INDEX_REFRESH seconds (liveness fields age with time even when nothing changes).
INDEX_MIN_GAP = 0.05
INDEX_REFRESH = 5.0


class ConnectFailed(Exception):
    """No exchange could be started with a provider (nothing reached it)."""


class RelayLimited(ConnectFailed):
    """The peer is reachable only through a relay, and the relay refused (its limits, or no reservation)."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


class UnknownPeer(ConnectFailed):
    """Not connected, and neither the transport nor the node table knows an address."""


class Providers:
    """The node table's providers with this gateway's view of their liveness."""

    def __init__(
        self,
        config: Config,
        peer_id: PeerId,
        host: PeerDialer | None,
        table: ProviderDirectory | None,
        services: LocalServices | None,
    ) -> None:
        self.config = config
        self.me = str(peer_id)
        self.host = host
        self.table = table
        self.services = services
        self.down: dict[str, tuple[float, float]] = {}  # peer -> (until, backoff) after connect failures
        self._peer_ids: dict[str, PeerId] = {}
        self._entries_cache: dict[str, dict] = {}
        self._entries_version: int | None = None
        self._entries_at = 0.0
        self._routes: dict[str, tuple[list[routing.Provider], list[str]]] = {}
        self._routes_of: dict | None = None  # the entries snapshot _routes was worked out from
        self.index: routeindex.RouteIndex = routeindex.EMPTY
        self._index_of: dict | None = None  # the entries snapshot the index was built from

    def entries(self) -> dict[str, dict]:
        """The node table's live entries, as routing reads them, reused while the table is unchanged (<= 0.5 s).

        Building the entries means materialising every peer's document, and
        a busy dispatcher asks on every request; the short expiry keeps
        time-based fields (liveness) fresh, and :meth:`usable` checks the
        live connection state anyway.

        A peer that vanished without leaving (killed, cut off) stays listed,
        not connected, until it is stale: its services then answer 503 with
        ``Retry-After`` (it may be back), and 404 only once the table has
        given up on it or it said it left.

        Each entry keeps only :data:`ROUTING_FIELDS`: the full view is at
        ``table.entry()`` and ``/v1/dnt/table``.
        """
        table = self.table
        if table is not None:
            version = table.version
            now = time.monotonic()
            if version == self._entries_version and now - self._entries_at < ENTRIES_TTL:
                return self._entries_cache
            entries = {
                peer: {k: e[k] for k in ROUTING_FIELDS if k in e}
                for peer, e in table.entries(include_all=True).items()
                if _still_listed(e)
            }
            self._entries_cache, self._entries_version, self._entries_at = entries, version, now
            return entries
        services = self.services
        records = services.records() if services is not None else []
        return {self.me: {"id": self.me, "service": records}}

    async def keep_index(self) -> None:
        """Rebuild the routing index whenever the table changes, so requests only read it."""
        table = self.table
        if table is None:
            return
        while True:
            entries = self.entries()
            if entries is not self._index_of:
                self.index = routeindex.build(entries, self.me, table.version)
                self._index_of = entries
            with trio.move_on_after(INDEX_REFRESH):
                await table.wait_changed()
            await trio.sleep(INDEX_MIN_GAP)  # coalesce a burst of changes into one rebuild

    def route(self, entries: dict[str, dict], name: str) -> tuple[list[routing.Provider], list[str]]:
        """The providers of ``name`` and the identity keys they route on, worked out once per table snapshot."""
        if entries is self._index_of:
            index = self.index
            return list(index.providers(name)), index.keys.get(name, [])
        if self._routes_of is not entries:
            self._routes, self._routes_of = {}, entries
        route = self._routes.get(name)
        if route is None:
            providers = routing.providers_of(entries, name, self.me)
            route = (providers, routing.identity_keys(providers))
            if len(self._routes) < 256:  # names come from request paths: bounded
                self._routes[name] = route
        return route

    def usable(self, provider: routing.Provider, now: float) -> bool:
        if provider.local:
            services = self.services
            return services is not None and services.status(provider.service["name"]) == "healthy"
        if not (provider.healthy and provider.online):
            return False
        if self.is_down(provider.peer, now):
            return False
        host = self.host
        if host is None:
            return False
        return host.is_connected(self.peer_id(provider.peer)) or bool(provider.entry.get("addrs"))

    def is_down(self, peer: str, now: float) -> bool:
        """Failed to connect lately, and its back-off has not run out."""
        down = self.down.get(peer)
        return down is not None and down[0] > now

    def mark_down(self, peer: str) -> None:
        _, backoff = self.down.get(peer, (0.0, 1.0))
        self.down[peer] = (time.monotonic() + backoff, min(backoff * 2, 30.0))

    def mark_up(self, peer: str) -> None:
        self.down.pop(peer, None)

    def connected(self, peer: str) -> bool:
        host = self.host
        return host is not None and host.is_connected(self.peer_id(peer))

    def rtt(self, peer: str) -> float | None:
        """Measured round-trip time to a provider we are connected to (None: not connected or not measured)."""
        host = self.host
        return host.rtt(self.peer_id(peer)) if host is not None else None

    def known(self, peer: PeerId, peer_text: str) -> bool:
        """Connected, listed in the node table, or with an address the transport knows."""
        host = self.host
        if host is None:
            return False
        return host.is_connected(peer) or peer_text in self.entries() or bool(host.peer_addrs(peer))

    def peer_id(self, text: str) -> PeerId:
        cached = self._peer_ids.get(text)
        if cached is not None:
            return cached
        from ..identity import PeerId

        try:
            peer = PeerId.from_string(text)
        except (IdentityError, ValueError) as exc:
            raise BadRequest(f"'{text}' is not a peer ID: {exc}", code="bad_peer_id") from None
        if len(self._peer_ids) < 4096:
            self._peer_ids[text] = peer
        return peer

    def relay_limit(self, peer_text: str) -> str | None:
        """Why our relayed connection to the peer just ended, if its relay cut it at its limit."""
        if self.host is None:
            return None
        try:
            return self.host.relay_limit(self.peer_id(peer_text))
        except BadRequest:
            return None

    async def open_stream(self, peer_text: str) -> MuxedStream:
        """A new ``/libp2p-http`` stream to ``peer_text``, dialling its table addresses if not connected."""
        host = self.host
        if host is None:
            raise ConnectFailed("this node has no transport")
        peer = self.peer_id(peer_text)
        if not host.is_connected(peer):
            entry = self.entries().get(peer_text) or {}
            addrs = [a for a in entry.get("addrs") or [] if isinstance(a, str)]
            if addrs:
                try:
                    host.add_addrs(peer, addrs)
                except Exception as exc:  # noqa: BLE001 - a bad address in someone's entry must not break routing
                    log.debug("ignoring bad addrs from the node table %s", logfmt.kv(peer=peer.short(), reason=exc))
            if not host.is_connected(peer) and not host.peer_addrs(peer):
                if addrs:
                    # The client hears only "unreachable": the log says why (the refusals are logged above it).
                    log.debug("no dialable address %s", logfmt.kv(peer=peer.short(), published=len(addrs)))
                    raise ConnectFailed(f"peer {peer_text} publishes no address this node dials")
                raise UnknownPeer(f"peer {peer_text} is not connected and no address of it is known")
        try:
            with trio.fail_after(self.config.dial_timeout):
                return await host.new_stream(peer, LIBP2P_HTTP)
        except trio.TooSlowError:
            reason = f"opening a stream timed out after {self.config.dial_timeout:g} s"
            log.debug("cannot open a stream %s", logfmt.kv(peer=peer.short(), reason=reason))
            raise ConnectFailed(reason) from None
        except RelayRefused as exc:
            raise RelayLimited(str(exc), exc.status) from None
        except TransportError as exc:
            log.debug("cannot open a stream %s", logfmt.kv(peer=peer.short(), reason=exc))
            raise ConnectFailed(str(exc) or type(exc).__name__) from None


#: What routing reads of an entry. The snapshot keeps only these: it lives as long as the table
#: is unchanged, on every node, and a whole entry (hardware and all) costs about 2.5 KB per peer.
ROUTING_FIELDS = ("service", "services", "connected", "status", "stale", "addrs")


def _still_listed(entry: dict) -> bool:
    """Neither stale (unseen for ``--stale-after``) nor departed: routing still counts it as a provider."""
    return not entry.get("stale") and str(entry.get("status") or "").lower() not in routing.GONE_ENTRY_STATUSES


def short(peer: str) -> str:
    return "…" + peer[-6:]
