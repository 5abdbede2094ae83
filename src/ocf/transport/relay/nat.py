"""NAT traversal as one subsystem: relay service, relay client, AutoNAT, reservations, hole punching.

:func:`open_nat` is what the node enters after its host. It always attaches
the relay client (any node may need to dial a ``/p2p-circuit`` address) and
AutoNAT's server; it serves the relay's hop protocol with ``--relay``; and
it decides, from ``--reachability`` or from AutoNAT's answers, whether this
node is reachable. A private node keeps reservations on up to
``--max-relays`` of its connected peers that speak the hop protocol (the
"autorelay" of go-libp2p and js-libp2p), and its circuit addresses appear
in identify and, through ``on_addrs``, in the node table.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator, Callable

import trio

from ... import log as logfmt
from ...errors import TransportError
from ...identity import PeerId
from .client import RelayClient, open_relay_client
from .messages import HOP
from .service import RelayLimits, RelayService, open_relay_service

if TYPE_CHECKING:
    from ...config import Config
    from ..host import Host
    from .autonat import AutoNat
    from .dcutr import HolePuncher

log = logging.getLogger("ocf.transport.relay")

RELAY_RETRY_AFTER = 60.0  # seconds before a relay that refused or failed us is asked again


class Nat:
    """What this node knows about its reachability, and the relays it holds slots on."""

    def __init__(self, host: Host, config: Config, client: RelayClient, service: RelayService | None) -> None:
        self.host = host
        self.config = config
        self.client = client
        self.service = service
        self.autonat: AutoNat | None = None
        self.holepunch: HolePuncher | None = None
        self.reachability = config.reachability if config.reachability != "auto" else "unknown"
        self._kept: set[PeerId] = set()
        self._failed: dict[PeerId, float] = {}
        self._wake = trio.Event()

    def set_reachability(self, value: str) -> None:
        if value != self.reachability:
            log.info("reachability %s", logfmt.kv(was=self.reachability, now=value))
            self.reachability = value
            self._wake.set()

    def relayed(self, peer: PeerId) -> bool:
        return self.host.is_relayed(peer)

    def status(self) -> dict[str, object]:
        """For ``/v1/health`` and ``/v1/dnt/peers_status``."""
        out: dict[str, object] = {
            "reachability": self.reachability,
            "relay_addrs": [str(a) for a in self.client.circuit_addrs()],
            "relays": [str(p) for p in self.client.reservations],
            "relay_service": self.service is not None,
        }
        if self.autonat is not None:
            out["autonat"] = self.autonat.summary()
        if self.holepunch is not None:
            out["holepunch"] = dict(self.holepunch.stats)
        if self.service is not None:
            out["relay"] = dict(
                self.service.stats,
                reservations=len(self.service.reservations),
                circuits=self.service.circuits_total,
                refused=sum(self.service.refused.values()),
            )
        return out

    def _candidates(self) -> list[PeerId]:
        now = time.monotonic()
        out = []
        for peer in self.host.connected_peers():
            if peer in self._kept or self._failed.get(peer, -RELAY_RETRY_AFTER) + RELAY_RETRY_AFTER > now:
                continue
            info = self.host.peer_info(peer)
            direct = any(c.usable and not c.relayed for c in self.host.connections(peer))
            if info is not None and HOP in info.protocols and direct:
                out.append(peer)
        return out

    async def _keep(self, relay: PeerId) -> None:
        try:
            await self.client.keep(relay)
        except TransportError as exc:
            log.info("relay reservation refused %s", logfmt.kv(relay=relay.short(), reason=exc))
        finally:
            self._kept.discard(relay)
            self._failed[relay] = time.monotonic()
            self._wake.set()

    async def run_autorelay(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``max_relays`` reservations while private; wakes on peer, identify and reachability changes."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                if self.reachability == "private":
                    for relay in self._candidates()[: max(0, self.config.max_relays - len(self._kept))]:
                        self._kept.add(relay)
                        nursery.start_soon(self._keep, relay)
                wake = self._wake
                async with trio.open_nursery() as waiter:

                    async def host_changed(cancel: trio.CancelScope = waiter.cancel_scope) -> None:
                        await self.host.wait_changed()
                        cancel.cancel()

                    async def woken(cancel: trio.CancelScope = waiter.cancel_scope, wake: trio.Event = wake) -> None:
                        await wake.wait()
                        cancel.cancel()

                    waiter.start_soon(host_changed)
                    waiter.start_soon(woken)
                    if self._failed:  # a refused relay may be asked again later
                        waiter.cancel_scope.deadline = trio.current_time() + RELAY_RETRY_AFTER
                if self._wake.is_set():
                    self._wake = trio.Event()


def relay_limits(config: Config) -> RelayLimits:
    return RelayLimits(
        max_reservations=config.relay_max_reservations,
        max_circuits=config.relay_max_circuits,
        circuit_duration=config.relay_circuit_duration,
        circuit_data=config.relay_circuit_data,
    )


@contextlib.asynccontextmanager
async def open_nat(host: Host, config: Config, on_addrs: Callable[[], None] | None = None) -> AsyncIterator[Nat]:
    """Run NAT traversal for ``host`` for the block (see the module doc)."""
    from .autonat import open_autonat
    from .dcutr import open_holepunch

    async with contextlib.AsyncExitStack() as stack:
        service = (
            await stack.enter_async_context(open_relay_service(host, relay_limits(config))) if config.relay else None
        )
        client = await stack.enter_async_context(open_relay_client(host))
        if on_addrs is not None:
            client.on_addrs.append(on_addrs)
        nat = Nat(host, config, client, service)
        nat.autonat = await stack.enter_async_context(open_autonat(host, nat))
        nat.holepunch = await stack.enter_async_context(open_holepunch(host, nat))
        async with trio.open_nursery() as nursery:
            await nursery.start(nat.run_autorelay)
            try:
                yield nat
            finally:
                nursery.cancel_scope.cancel()
