"""The composition root: the one place that builds every subsystem and wires them together.

``async with open_node(config) as node:`` is the library entry point. It
opens the store, resolves the identity, then enters each subsystem's own
async context manager on one :class:`contextlib.AsyncExitStack`, so they stop
in reverse order of starting: the gateway stops taking requests first, the
node table announces our departure while the transport is still up, and the
store is closed last, after every task that could write to it is gone.

Each subsystem is built with the few things it uses, not with the node: the
node table gets the transport host, the registrar gets the table (as a
:class:`~ocf.ports.ServiceBoard`), the tracker gets the store and the
registrar, and the gateway gets a :class:`~ocf.gateway.app.GatewayParts`
naming its peer dialer, provider directory, local services and the routes
other subsystems mount on it (:class:`~ocf.ports.HttpMount`). So no
subsystem imports another, nor this module; ``tests/test_layering.py``
checks it. :class:`Node` is what the caller gets once all of it runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator

import attrs

from . import log as logfmt
from .config import Config
from .errors import OcfError, single_leaf
from .identity import Identity, Multiaddr, PeerId, load_or_create
from .store import Store
from .version import __version__

if TYPE_CHECKING:
    from .dht import Dht
    from .membership.driver import Membership
    from .gateway.server import Gateway
    from .jobs import Tracker
    from .nodetable import NodeTable
    from .services import Registrar
    from .transport import MemoryNetwork
    from .transport.bootstrap import Bootstrapper
    from .transport.host import Host
    from .transport.relay.nat import Nat

log = logging.getLogger("ocf.node")


@attrs.define(eq=False)
class Node:
    """A running node: every subsystem, started (``jobs`` is None without ``--jobs``)."""

    config: Config
    identity: Identity
    store: Store
    host: Host
    bootstrap: Bootstrapper
    dht: Dht  # peer routing: the host asks it for the addresses of peers it has none for
    table: NodeTable
    services: Registrar
    jobs: Tracker | None
    gateway: Gateway
    started_at: float  # wall clock
    _started_monotonic: float = attrs.field(alias="started_monotonic")
    version: str = __version__
    nat: Nat | None = None
    membership: Membership | None = None  # SWIM liveness (None with --no-membership)

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    @property
    def listen_addrs(self) -> list[Multiaddr]:
        return list(self.host.listen_addrs)

    @property
    def admin_token(self) -> str:
        return self.gateway.admin_token

    @property
    def uptime(self) -> float:
        return time.monotonic() - self._started_monotonic

    @property
    def gateway_url(self) -> str:
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
async def open_node(config: Config, memory_network: MemoryNetwork | None = None) -> AsyncIterator[Node]:
    """Start a node inside the caller's Trio run; leaving the block stops it.

    ``memory_network`` makes the node listen on that in-process network
    instead of TCP, for tests that run many nodes in one process. A caller
    that runs tasks beside the node opens its own nursery next to this block.
    """
    # Imported here, not at the top: ``import ocf`` (the CLI's worker and ping commands, embedders)
    # should not pay for the gateway's web stack and the tracker unless a node starts.
    from .dht import open_dht
    from .membership.driver import open_membership
    from .dht.metrics import DhtCollector
    from .gateway.app import GatewayParts
    from .gateway.server import open_gateway
    from .jobs import open_tracker
    from .jobs.mount import jobs_mount
    from .nodetable import open_nodetable
    from .nodetable.http import nodetable_mount
    from .ports import HttpMount
    from .services import open_registrar
    from .transport import open_host
    from .transport.bootstrap import open_bootstrap
    from .transport.metrics import TransportCollector
    from .transport.relay.metrics import NatCollector
    from .transport.relay.nat import open_nat

    t0 = time.monotonic()
    started_at = time.time()
    store = Store.open(config.data_dir, cleanslate=config.cleanslate)
    started = False
    try:
        identity = resolve_identity(config)
        peer_id = identity.peer_id
        async with contextlib.AsyncExitStack() as stack:
            # --- subsystems, in start order (each stops in reverse) -------------------------
            host = await stack.enter_async_context(open_host(identity, config, memory_network))
            bootstrap = await stack.enter_async_context(open_bootstrap(host, config))
            dht = await stack.enter_async_context(open_dht(host, config))
            # membership (SWIM liveness, bounded degree) before the table, which takes liveness from it
            membership = None
            if config.membership:
                membership = await stack.enter_async_context(open_membership(host, identity, config))
            table = await stack.enter_async_context(
                open_nodetable(host, config, identity, store, __version__, membership)
            )
            # NAT traversal: relay client, --relay, AutoNAT, hole punching; circuit addresses go in the table
            nat = await stack.enter_async_context(
                open_nat(host, config, on_addrs=lambda: table.set_addrs(host.listen_addrs))
            )
            services = await stack.enter_async_context(open_registrar(config.services, table))
            jobs = None
            if config.jobs:
                jobs = await stack.enter_async_context(open_tracker(config, store, services, node_id=str(peer_id)))

            def health() -> dict[str, object]:
                return {
                    "peer_id": str(peer_id),
                    "version": __version__,
                    "mode": config.mode,
                    "uptime": round(time.monotonic() - t0, 3),
                    "reachability": nat.reachability,
                }

            mounts = (
                HttpMount(collectors=(TransportCollector(host), DhtCollector(dht), NatCollector(nat))),
                nodetable_mount(table, host, nat),
                jobs_mount(jobs, max_body_size=config.max_body_size, request_timeout=config.request_timeout),
            )
            parts = GatewayParts(config, peer_id, health, host, table, services, mounts, load=membership)
            # Stopping runs the stack backwards: once the gateway has drained its requests (they may
            # still dial a provider), the node dials no one while the layers below say goodbye.
            stack.callback(host.stop_dialing)
            gateway = await stack.enter_async_context(open_gateway(parts))
            # ----------------------------------------------------------------------------------
            node = Node(
                config,
                identity,
                store,
                host,
                bootstrap,
                dht,
                table,
                services,
                jobs,
                gateway,
                started_at,
                started_monotonic=t0,
                nat=nat,
                membership=membership,
            )
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
                log.info("node stopping %s", logfmt.kv(peer=peer_id.short()))
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
