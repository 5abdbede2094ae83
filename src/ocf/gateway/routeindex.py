"""The routing index: a snapshot of who serves what, built when the table changes, read per request.

Routing used to walk every node table entry for each new table version on
the request path. The index is built off it (by :func:`build`, from a
background task that waits for table changes) and is immutable once built,
so a request reads whichever snapshot is current without locks: copy on
write. Lookups are dictionary reads: by service, and by service and one
identity group (``model=m``); a request naming several groups reads the
smallest group's providers and filters those.

:func:`pick` chooses among candidates by the power of two choices: two
random candidates, then one of them with probability proportional to its
weight (availability, measured latency, requests in flight published
through membership). Sampling two rather than sorting everyone keeps a pick
O(1) at any N, and the randomness keeps a thousand gateways from all
stampeding to the one provider that looked best a moment ago.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

import attrs

from . import routing
from .routing import Provider

#: Latency assumed for a provider never measured (seconds): neither favoured nor shunned.
UNMEASURED_LATENCY = 0.05
#: Added to every latency (seconds): below it, load decides rather than jitter. Without it a
#: provider at 0.2 ms would draw ten times the traffic of one at 2 ms on the same LAN.
LATENCY_FLOOR = 0.02


@attrs.frozen
class RouteIndex:
    version: object
    by_service: Mapping[str, tuple[Provider, ...]]
    by_group: Mapping[tuple[str, str], tuple[Provider, ...]]
    keys: Mapping[str, list[str]]

    def providers(self, service: str) -> tuple[Provider, ...]:
        return self.by_service.get(service, ())

    def lookup(self, service: str, identity: Mapping[str, str]) -> tuple[Provider, ...]:
        """Providers of ``service`` in every identity group ``identity`` names (all of them if none)."""
        if not identity:
            return self.by_service.get(service, ())
        if len(identity) == 1:
            for k, v in identity.items():
                return self.by_group.get((service, f"{k}={v}"), ())
        groups = [f"{k}={v}" for k, v in identity.items()]
        lists = [self.by_group.get((service, g), ()) for g in groups]
        smallest = min(lists, key=len)
        wanted = frozenset(groups)
        return tuple(p for p in smallest if wanted <= p.groups)


def build(entries: Mapping[str, Mapping[str, object]], self_peer: str, version: object = None) -> RouteIndex:
    by_service: dict[str, list[Provider]] = {}
    by_group: dict[tuple[str, str], list[Provider]] = {}
    for peer, entry in entries.items():
        for service in routing._services_of(entry):
            provider = Provider(peer, service, entry, local=peer == self_peer)
            name = service["name"]
            by_service.setdefault(name, []).append(provider)
            for group in provider.groups:
                by_group.setdefault((name, group), []).append(provider)
    return RouteIndex(
        version,
        {k: tuple(v) for k, v in by_service.items()},
        {k: tuple(v) for k, v in by_group.items()},
        {k: routing.identity_keys(v) for k, v in by_service.items()},
    )


EMPTY = RouteIndex(None, {}, {}, {})


def weight(available: bool, latency: float | None, load: int) -> float:
    """How much a provider deserves traffic: 0 if unusable, else falling with latency and load.

    ``1 / ((LATENCY_FLOOR + rtt) * (1 + load))``: a provider 200 ms away
    draws about a tenth of the traffic of an idle neighbour, as does a
    neighbour already serving nine requests.
    """
    if not available:
        return 0.0
    rtt = UNMEASURED_LATENCY if latency is None else max(latency, 0.0)
    return 1.0 / ((LATENCY_FLOOR + rtt) * (1 + load))


def pick(
    candidates: tuple[Provider, ...] | list[Provider],
    weigh: Callable[[Provider], float],
    rng: random.Random,
    tries: int = 8,
) -> Provider | None:
    """One candidate by weighted power-of-two choices; None if none has weight (all unusable).

    Unusable candidates are skipped by resampling, a few times; if the
    samples keep hitting them (most providers down) it falls back to a scan.
    """
    n = len(candidates)
    if n == 0:
        return None
    if n == 1:
        return candidates[0] if weigh(candidates[0]) > 0 else None
    chosen: list[tuple[Provider, float]] = []
    draw = rng.random
    first: Provider | None = None
    for _ in range(tries):
        candidate = candidates[int(draw() * n)]
        if candidate is first:
            continue
        w = weigh(candidate)
        if w > 0:
            chosen.append((candidate, w))
            if first is not None:
                break
            first = candidate
    if not chosen:
        usable = [(c, w) for c in candidates if (w := weigh(c)) > 0]
        if not usable:
            return None
        chosen = rng.sample(usable, min(2, len(usable)))
    if len(chosen) == 1:
        return chosen[0][0]
    (a, wa), (b, wb) = chosen
    return a if draw() * (wa + wb) < wa else b
