"""Test helpers: many hosts with a DHT each on one in-memory network."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import attrs
import trio

from ocf.config import Config
from ocf.dht import Dht, DhtLimits, open_dht
from ocf.identity import Identity
from ocf.transport import MemoryNetwork, open_host
from ocf.transport.host import Host, PeerInfo

#: Tests drive lookups themselves: no background self-lookup.
QUIET = DhtLimits(refresh_interval=0)


def config(**kw: object) -> Config:
    return Config(**kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def dht_nodes(
    modes: Sequence[str],
    *,
    net: MemoryNetwork | None = None,
    limits: DhtLimits = QUIET,
    prefix: str = "dht",
    protocols: Sequence[str] | None = None,
) -> AsyncIterator[list[Dht]]:
    """One host + DHT per entry of ``modes`` ("server" or "client"), deterministic identities."""
    net = net or MemoryNetwork()
    async with contextlib.AsyncExitStack() as stack:
        nodes = []
        for i, mode in enumerate(modes):
            protocol = protocols[i] if protocols else "/ocf/kad/1.0.0"
            cfg = config(dht_protocol=protocol)
            host = await stack.enter_async_context(open_host(Identity.from_seed(f"{prefix}-{i}"), cfg, net))
            nodes.append(await stack.enter_async_context(open_dht(host, cfg, mode=mode, limits=limits)))
        yield nodes


def link(a: Dht, b: Dht) -> None:
    """``a`` knows ``b`` as a DHT server (in its table, with its address), without connecting."""
    a.host.add_addrs(b.host.peer_id, b.host.listen_addrs)
    a.table.add(b.host.peer_id)


@attrs.define
class Identified:
    """Wait until identify has told ``host`` about ``peer``."""

    host: Host
    seen: dict[object, trio.Event] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.host.identify_listeners.append(self._on)

    def _on(self, peer: object, info: PeerInfo) -> None:
        self.seen.setdefault(peer, trio.Event()).set()

    async def wait(self, peer: object) -> None:
        await self.seen.setdefault(peer, trio.Event()).wait()
