"""The small interfaces one subsystem needs from another, so none imports the other.

``ocf.node`` is the composition root: it builds every subsystem with the few
things that subsystem uses. Where such a thing comes from another subsystem
(the gateway needs "who provides a service" from the node table and "a
stream to a peer" from the transport; the registrar needs "publish my
services" from the table; the tracker needs "register an internal service"
from the registrar), its type is a Protocol here, in a module that imports
no subsystem. The concrete classes satisfy them structurally; mypy checks
that where the node wires them. ``tests/test_layering.py`` keeps the rule.

Two value types live here too (:class:`LocalService`, :class:`InternalService`):
they are what the registrar hands the gateway, so both sides must name them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol
from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from quart import Blueprint

    from .identity import Multiaddr, PeerId
    from .transport.muxer import MuxedStream

#: The service name whose providers are told apart by ``model`` and listed on ``/v1/models``.
LLM_SERVICE = "llm"

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


# --- services: what the registrar publishes and the gateway forwards to ---------------------------


@attrs.frozen
class LocalService:
    """A service reached over HTTP at ``host:port`` (e.g. an LLM server)."""

    name: str
    host: str
    port: int
    api_key: str | None = attrs.field(default=None, repr=False)  # the backend's own key (--service.api-key)


@attrs.frozen
class InternalService:
    """A service served by this node's own gateway under ``path_prefix``."""

    name: str
    path_prefix: str


class LocalServices(Protocol):
    """This node's services, as the gateway routes to them (the registrar)."""

    def lookup(self, name: str) -> LocalService | InternalService | None: ...

    def names(self) -> list[str]: ...

    def status(self, name: str) -> str | None: ...

    def records(self) -> list[dict[str, Any]]: ...


class InternalServices(Protocol):
    """Where a subsystem served by the gateway announces itself as a service (the registrar)."""

    def register_internal(self, name: str, path_prefix: str) -> None: ...

    def unregister_internal(self, name: str) -> None: ...


# --- the node table, as others use it --------------------------------------------------------------


class ProviderDirectory(Protocol):
    """Who offers what, for routing (the node table's live entries, keyed by peer ID text)."""

    @property
    def version(self) -> int: ...

    def entries(self, include_all: bool = False) -> dict[str, dict[str, Any]]: ...

    async def wait_changed(self) -> None: ...


class LoadBoard(Protocol):
    """Load published through membership: ours (requests our backends serve) and each peer's."""

    def load_from(self, source: Callable[[], int]) -> None:
        """Read our load from ``source`` whenever membership wakes (it publishes changes every couple of seconds)."""

    def load(self, peer: PeerId) -> int: ...


class ServiceBoard(Protocol):
    """Where the registrar publishes this node's services (its own node table entry)."""

    def own_entry(self) -> dict[str, Any]: ...

    async def set_services(self, services: list[dict[str, Any]]) -> None: ...

    async def wait_changed(self) -> None: ...


# --- the transport, as the gateway uses it ---------------------------------------------------------


class PeerDialer(Protocol):
    """Streams to other peers, and the stream handler other peers' gateways reach us by (the host)."""

    def is_connected(self, peer: PeerId) -> bool: ...

    def connected_peers(self) -> list[PeerId]: ...

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]: ...

    def add_addrs(self, peer: PeerId, addrs: Sequence[Multiaddr | str]) -> None: ...

    async def new_stream(self, peer: PeerId, protocols: str | Sequence[str]) -> MuxedStream: ...

    def set_stream_handler(self, protocol: str, handler: Callable[[MuxedStream], Awaitable[None]]) -> None: ...

    def remove_stream_handler(self, protocol: str) -> None: ...

    def relay_limit(self, peer: PeerId) -> str | None: ...

    def rtt(self, peer: PeerId) -> float | None: ...


class NatView(Protocol):
    """What ``/v1/dnt/*`` shows of NAT traversal (``ocf.transport.relay.nat.Nat``)."""

    def status(self) -> dict[str, object]: ...

    def relayed(self, peer: PeerId) -> bool: ...


# --- what a subsystem mounts on the gateway --------------------------------------------------------


class RoutedRequest(Protocol):
    """A request the gateway's router classified: its path parameters and what it does."""

    @property
    def action(self) -> str: ...

    def param(self, name: str) -> str: ...


class RawRoute(Protocol):
    """A route served as raw ASGI, in front of Quart, after the router and the access policy."""

    async def __call__(self, route: RoutedRequest, scope: dict, receive: Receive, send: Send) -> None: ...


@attrs.frozen
class HttpMount:
    """What one subsystem serves through the gateway; the node hands the gateway one per subsystem.

    ``extensions`` are put in the Quart app's ``extensions`` for the
    blueprints to read (e.g. the tracker), ``raw`` maps a router family to
    the raw-ASGI handler serving it, and ``collectors`` join ``/metrics``.
    """

    blueprints: Sequence[Blueprint] = ()
    extensions: Mapping[str, object] = attrs.field(factory=dict)
    raw: Mapping[str, RawRoute] = attrs.field(factory=dict)
    collectors: Sequence[Collector] = ()
