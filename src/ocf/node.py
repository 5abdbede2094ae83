"""The node supervisor: one object, one nursery, every subsystem inside it.

``async with open_node(config) as node:`` is the library entry point. It
opens the store, resolves the identity, then enters each subsystem's own
async context manager on one :class:`contextlib.AsyncExitStack`, so they stop
in reverse order of starting: the gateway stops taking requests first, the
node table announces our departure while the transport is still up, and the
store is closed last, after every task that could write to it is gone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any
from collections.abc import AsyncIterator

import trio

from . import log as logfmt
from .config import Config
from .errors import OcfError, single_leaf
from .identity import Identity, Multiaddr, PeerId, load_or_create
from .store import Store
from .version import __version__

if TYPE_CHECKING:
    from .gateway.server import Gateway

log = logging.getLogger("ocf.node")


class Node:
    """A running node. Attributes are filled in as subsystems start."""

    def __init__(self, config: Config, identity: Identity, store: Store) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.peer_id: PeerId = identity.peer_id
        self.version = __version__
        self.started_at = time.time()
        self._started_monotonic = time.monotonic()
        self.listen_addrs: list[Multiaddr] = []
        self.gateway: Gateway | None = None
        self.admin_token: str | None = None  # set by the gateway (read from or created in data_dir)
        # Subsystems attach themselves here (transport host, node table, services, jobs).
        self.host: Any = None
        self.bootstrap: Any = None  # ocf.transport.bootstrap.Bootstrapper
        self.membership: Any = None  # ocf.membership.driver.Membership
        self.table: Any = None
        self.services: Any = None
        self.jobs: Any = None
        self.nursery: trio.Nursery | None = None

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started_monotonic

    @property
    def gateway_url(self) -> str:
        if self.gateway is None:
            raise RuntimeError("gateway not started")
        return self.gateway.url

    def __repr__(self) -> str:
        return f"<Node {self.peer_id.short()}>"


def resolve_identity(config: Config) -> Identity:
    """``--seed`` gives a deterministic identity; otherwise the stored key (created on first start)."""
    if config.seed:
        identity = Identity.from_seed(config.seed)
        log.warning("identity derived from --seed; do not use seeds in production %s", logfmt.kv(peer=identity.peer_id))
        return identity
    identity, created = load_or_create(config.data_dir)
    if created:
        log.info("created identity %s", logfmt.kv(peer=identity.peer_id, file=config.data_dir / "identity.key"))
    return identity


@contextlib.asynccontextmanager
async def open_node(config: Config, memory_network: Any = None) -> AsyncIterator[Node]:
    """Start a node inside the caller's Trio run; leaving the block stops it.

    ``memory_network`` (an :class:`ocf.transport.MemoryNetwork`) makes the
    node listen on that in-process network instead of TCP, for tests that run
    many nodes in one process.
    """
    from .gateway.server import open_gateway

    t0 = time.monotonic()
    store = Store.open(config.data_dir, cleanslate=config.cleanslate)
    started = False
    try:
        identity = resolve_identity(config)
        node = Node(config, identity, store)
        async with trio.open_nursery() as nursery:
            node.nursery = nursery
            async with contextlib.AsyncExitStack() as stack:
                # --- subsystems, in start order (each stops in reverse) -------------
                # transport: node.host (+ bootstrap peers kept connected) ---------
                from .transport import open_host
                from .transport.bootstrap import open_bootstrap

                node.host = await stack.enter_async_context(open_host(identity, config, memory_network))
                node.listen_addrs = list(node.host.listen_addrs)
                node.bootstrap = await stack.enter_async_context(open_bootstrap(node.host, config))
                # ------------------------------------------------------------------
                # membership (SWIM liveness, bounded degree): node.membership ----
                from .membership.driver import open_membership

                if config.membership:
                    node.membership = await stack.enter_async_context(open_membership(node.host, identity, config))
                # node table: node.table -----------------------------------------------
                from .nodetable import open_nodetable

                node.table = await stack.enter_async_context(open_nodetable(node))
                # services registrar: node.services ------------------------------
                from .services import open_registrar

                node.services = await stack.enter_async_context(open_registrar(node))
                # ------------------------------------------------------------------
                # jobs tracker: node.jobs (only with --jobs) ---------------------
                if config.jobs:
                    from .jobs import open_tracker

                    node.jobs = await stack.enter_async_context(open_tracker(node))
                # gateway --------------------------------------------------------------
                node.gateway = await stack.enter_async_context(open_gateway(node))
                # ----------------------------------------------------------------------
                log.info(
                    "node started %s",
                    logfmt.kv(
                        peer=node.peer_id,
                        mode=config.mode,
                        listen=",".join(str(a) for a in node.listen_addrs) or "-",
                        gateway=node.gateway_url,
                        startup_ms=round((time.monotonic() - t0) * 1000),
                    ),
                )
                started = True
                try:
                    yield node
                finally:
                    log.info("node stopping %s", logfmt.kv(peer=node.peer_id.short()))
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A subsystem that fails to start raises inside nurseries, which wrap
        # it; callers of open_node deserve the plain error (e.g. port in use).
        leaf = single_leaf(group)
        if not started and isinstance(leaf, OcfError):
            raise leaf from None
        raise
    finally:
        store.close()
    log.info("node stopped %s", logfmt.kv(peer=identity.peer_id.short()))
