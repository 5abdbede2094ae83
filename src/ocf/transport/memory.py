"""In-process transport: many nodes in one Trio run, no sockets.

``MemoryNetwork()`` is a registry of listeners by name; a host opened with it
listens at ``/memory/<name>`` and dials other ``/memory/…`` addresses through
it. Connections are Trio memory stream pairs and still carry the complete
multistream + Noise + yamux stack, so tests exercise exactly the code that
runs over TCP, only faster and deterministically (``MockClock`` works).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import AsyncIterator

import attrs
import trio
import trio.testing

from ..errors import PeerUnreachable, TransportError
from ..identity import Multiaddr
from .memlink import Links
from .tcp import RawConn, RawHandler


@attrs.define
class _Listener:
    handler: RawHandler
    nursery: trio.Nursery
    #: The listener's context variables: its connections' tasks run under them (a simulation
    #: tells its nodes apart by one), not under the dialer's.
    context: contextvars.Context = attrs.field(factory=contextvars.copy_context)


class MemoryNetwork:
    """A namespace of in-memory listeners; share one instance between the nodes of a test."""

    def __init__(self, links: Links | None = None) -> None:
        """``links`` simulates latency, loss and crashes (:mod:`.memlink`); without it, plain memory streams."""
        self._listeners: dict[str, _Listener] = {}
        self._names = itertools.count(1)
        self.dials = 0  # for tests: how many connections were opened
        self.links = links

    def new_name(self) -> str:
        while True:
            name = str(next(self._names))
            if name not in self._listeners:
                return name

    def listen(self, name: str | None, handler: RawHandler, nursery: trio.Nursery) -> Multiaddr:
        """Register a listener; returns its address. Use :meth:`unlisten` to stop."""
        name = name or self.new_name()
        if name in self._listeners:
            raise TransportError(f"/memory/{name} is already in use")
        self._listeners[name] = _Listener(handler, nursery)
        return Multiaddr((("memory", name),))

    def unlisten(self, addr: Multiaddr) -> None:
        name = addr.value_for("memory")
        if name is not None:
            self._listeners.pop(name, None)

    @contextlib.asynccontextmanager
    async def connect(self, addr: Multiaddr, local_addr: Multiaddr | None = None) -> AsyncIterator[RawConn]:
        """Open a connection to the listener at ``addr`` (its handler runs in the listener's nursery)."""
        await trio.lowlevel.checkpoint()
        name = addr.value_for("memory")
        listener = self._listeners.get(name or "")
        if listener is None:
            raise PeerUnreachable(f"nothing listens at /memory/{name}")
        me = local_addr.value_for("memory") if local_addr is not None else None
        if self.links is not None and self.links.unreachable(name or "?", me or "?"):
            raise PeerUnreachable(f"/memory/{name} does not answer")
        ours: trio.abc.Stream
        theirs: trio.abc.Stream
        if self.links is not None:
            ours, theirs = self.links.pair(me or "?", name or "?")
        else:
            ours, theirs = trio.testing.memory_stream_pair()
        self.dials += 1
        target = Multiaddr((("memory", name or ""),))

        async def serve() -> None:
            for var, value in listener.context.items():
                var.set(value)
            async with theirs:
                await listener.handler(RawConn(theirs, local_addr, target, "memory"))

        try:
            listener.nursery.start_soon(serve)
        except RuntimeError:  # the listener's nursery is closing
            raise PeerUnreachable(f"/memory/{name} is shutting down") from None
        async with ours:
            yield RawConn(ours, target, local_addr, "memory")


class MemoryTransport:
    """A host's view of a :class:`MemoryNetwork`."""

    def __init__(self, network: MemoryNetwork) -> None:
        self.network = network
        self.listen_addr: Multiaddr | None = None

    def can_dial(self, addr: Multiaddr) -> bool:
        return addr.has("memory")

    @contextlib.asynccontextmanager
    async def connect(self, addr: Multiaddr, timeout: float) -> AsyncIterator[RawConn]:  # noqa: ASYNC109 - dial only
        async with self.network.connect(addr, self.listen_addr) as raw:
            yield raw

    def listen(self, handler: RawHandler, nursery: trio.Nursery, name: str | None = None) -> Multiaddr:
        self.listen_addr = self.network.listen(name, handler, nursery)
        return self.listen_addr

    def close(self) -> None:
        if self.listen_addr is not None:
            self.network.unlisten(self.listen_addr)
            self.listen_addr = None
