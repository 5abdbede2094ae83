"""Bootstrap: find the peers to join and keep them connected.

Modes (as OCF's ``--mode``):

- ``standalone``: no bootstrap peers; others connect to us (a dispatcher).
- ``node`` (default): ``--bootstrap.addr`` entries, each a multiaddr ending
  in ``/p2p/<id>`` or an http(s) URL answering ``{"bootstraps": [multiaddr,
  …]}`` (OCF's ``/v1/dnt/bootstraps`` shape).
- ``local``: a dispatcher on this machine. Its peer ID is not known in
  advance, so we first ask its gateway, ``http://127.0.0.1:8092/v1/dnt/bootstraps``;
  if that does not answer we dial ``/ip4/127.0.0.1/tcp/43905`` without a peer
  ID and accept whichever peer completes the Noise handshake (it is still
  authenticated: we learn and log its peer ID, we just had no expectation).
  Our own peer ID is always skipped, so a local node never "bootstraps" to itself.

Each bootstrap address gets a keeper task that connects, waits for the
connection to drop, and reconnects with exponential backoff: 5 s, doubling,
capped at 2 minutes (OCF's schedule), reset after every success.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any
from collections.abc import AsyncIterator
from urllib.parse import urlparse

import httpx
import trio

from .. import log as logfmt
from ..config import Config
from ..errors import MultiaddrError, TransportError
from ..identity import Multiaddr, PeerId

if TYPE_CHECKING:
    from .host import Host

log = logging.getLogger("ocf.transport.bootstrap")

BACKOFF_INITIAL = 5.0
BACKOFF_MAX = 120.0
HTTP_TIMEOUT = 10.0
LOCAL_GATEWAY_URL = "http://127.0.0.1:8092/v1/dnt/bootstraps"
LOCAL_TCP_ADDR = "/ip4/127.0.0.1/tcp/43905"
MAX_URL_ADDRS = 64


def next_backoff(current: float) -> float:
    return min(current * 2, BACKOFF_MAX)


def parse_bootstraps(data: Any) -> list[Multiaddr]:
    """Multiaddrs from a ``{"bootstraps": [...]}`` document; bad entries are skipped (logged)."""
    if not isinstance(data, dict) or not isinstance(data.get("bootstraps"), list):
        raise ValueError('expected a JSON object {"bootstraps": [multiaddr, ...]}')
    out: list[Multiaddr] = []
    for item in data["bootstraps"][:MAX_URL_ADDRS]:
        try:
            out.append(Multiaddr.parse(str(item)))
        except MultiaddrError as exc:
            log.warning("ignoring bad bootstrap address %s", logfmt.kv(addr=item, reason=exc))
    return out


async def fetch_bootstraps(url: str, client: httpx.AsyncClient | None = None) -> list[Multiaddr]:
    """GET ``url`` and parse its bootstrap list; raises ``OSError``/``httpx.HTTPError``/``ValueError``."""
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=HTTP_TIMEOUT))
        response = await client.get(url)
        response.raise_for_status()
        return parse_bootstraps(response.json())


class Bootstrapper:
    """Keeps the configured bootstrap peers connected. Run with :func:`open_bootstrap`."""

    def __init__(
        self, host: Host, config: Config, *, local_url: str = LOCAL_GATEWAY_URL, local_addr: str = LOCAL_TCP_ADDR
    ) -> None:
        self.host = host
        self.config = config
        self.local_url = local_url
        self.local_addr = local_addr
        self.connected: set[PeerId] = set()  # bootstrap peers currently connected
        self.attempts = 0  # dial attempts so far (for tests and stats)
        self._nursery: trio.Nursery | None = None
        self._keeping: set[str] = set()
        self._changed = trio.Event()

    async def wait_connected(self, peer: PeerId | None = None) -> PeerId:
        """Wait until ``peer`` (or any bootstrap peer) is connected; returns it."""
        while True:
            if peer is None and self.connected:
                await trio.lowlevel.checkpoint()
                return next(iter(self.connected))
            if peer is not None and peer in self.connected:
                await trio.lowlevel.checkpoint()
                return peer
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def sources(self) -> list[str]:
        """The configured sources for this mode (multiaddr strings and URLs)."""
        mode = self.config.mode
        if mode == "standalone":
            return []
        if mode == "local":
            return ["local"]
        return list(self.config.bootstrap_addrs)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            sources = self.sources()
            if not sources:
                log.info("no bootstrap peers %s", logfmt.kv(mode=self.config.mode))
            for source in sources:
                if source == "local":
                    nursery.start_soon(self._resolve_local)
                elif source.startswith(("http://", "https://")):
                    nursery.start_soon(self._resolve_url, source)
                else:
                    self.keep(Multiaddr.parse(source))
            task_status.started()

    def keep(self, addr: Multiaddr, *, learned: bool = False) -> None:
        """Start keeping ``addr`` connected (idempotent).

        ``learned``: the address comes from a fetched bootstrap list (which
        serves what peers published), so the host's dial policy applies.
        """
        if addr.peer_id == self.host.peer_id or str(addr) in self._keeping or self._nursery is None:
            return
        self._keeping.add(str(addr))
        self._nursery.start_soon(self._keeper, addr, learned)

    async def _resolve_url(self, url: str) -> None:
        self.host.dial_policy.note_home(urlparse(url).hostname)  # the operator's list server is in our networks
        delay = BACKOFF_INITIAL
        while True:
            try:
                addrs = await fetch_bootstraps(url)
            except (OSError, httpx.HTTPError, ValueError) as exc:
                log.warning(
                    "cannot fetch bootstrap list %s",
                    logfmt.kv(url=url, reason=exc or type(exc).__name__, retry_in=delay),
                )
                await trio.sleep(delay)
                delay = next_backoff(delay)
                continue
            log.info("bootstrap list fetched %s", logfmt.kv(url=url, addrs=len(addrs)))
            for addr in addrs:
                if addr.peer_id is None:
                    log.warning("ignoring bootstrap address without /p2p/<id> %s", logfmt.kv(addr=addr, url=url))
                    continue
                self.keep(addr, learned=True)
            return

    async def _resolve_local(self) -> None:
        try:
            addrs = await fetch_bootstraps(self.local_url)
        except (OSError, httpx.HTTPError, ValueError) as exc:
            log.info(
                "local gateway has no bootstrap list; dialing local port %s",
                logfmt.kv(url=self.local_url, reason=exc or type(exc).__name__, addr=self.local_addr),
            )
            addrs = []
        addrs = [a for a in addrs if a.peer_id is not None and a.peer_id != self.host.peer_id]
        if not addrs:
            self.keep(Multiaddr.parse(self.local_addr))
        for addr in addrs:
            self.keep(addr, learned=True)

    async def _keeper(self, addr: Multiaddr, learned: bool = False) -> None:
        delay = BACKOFF_INITIAL
        while True:
            # Subscribed only while connecting/connected, so events do not pile up while we sleep.
            async with self.host.subscribe() as events:
                self.attempts += 1
                try:
                    peer = await self.host.connect(addr, learned=learned)
                except TransportError as exc:
                    log.warning("bootstrap peer unreachable %s", logfmt.kv(addr=addr, reason=exc, retry_in=delay))
                    peer = None
                if peer is not None:
                    delay = BACKOFF_INITIAL
                    self.connected.add(peer)
                    self._notify()
                    log.info("connected to bootstrap peer %s", logfmt.kv(peer=peer.short(), addr=addr.without_p2p()))
                    while self.host.is_connected(peer):
                        event = await events.receive()
                        if event.kind == "disconnected" and event.peer == peer:
                            break
                    self.connected.discard(peer)
                    self._notify()
                    log.info("lost bootstrap peer; reconnecting %s", logfmt.kv(peer=peer.short(), retry_in=delay))
            await trio.sleep(delay)
            if peer is None:
                delay = next_backoff(delay)


@contextlib.asynccontextmanager
async def open_bootstrap(host: Host, config: Config, **kw: Any) -> AsyncIterator[Bootstrapper]:
    """Keep bootstrap peers connected while the block runs."""
    boot = Bootstrapper(host, config, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(boot.run)
        try:
            yield boot
        finally:
            nursery.cancel_scope.cancel()
