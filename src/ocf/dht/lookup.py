"""An iterative Kademlia lookup as a state machine, with no I/O.

The driver asks :meth:`Lookup.next_queries` whom to ask, sends each a
FIND_NODE, and reports back with :meth:`Lookup.on_response` (the peers the
reply listed, already filtered to those it can dial) or
:meth:`Lookup.on_failure`. The lookup ends, as the spec says, once the ``k``
closest peers it has heard of have all answered, or once nobody is left to
ask. Two budgets bound what a hostile network can make one lookup do: at
most ``max_candidates`` peers are remembered (the closest ones) and at most
``max_queries`` are ever asked.
"""

from __future__ import annotations

import enum

from ..identity import PeerId
from .table import K, peer_key

ALPHA = 3
MAX_CANDIDATES = 256
MAX_QUERIES = 64


class State(enum.Enum):
    WAITING = "waiting"
    IN_FLIGHT = "in_flight"
    ANSWERED = "answered"
    FAILED = "failed"


class Lookup:
    """Which peers to ask next for the peers closest to ``key``."""

    def __init__(
        self,
        key: bytes,
        seeds: list[PeerId],
        *,
        local: PeerId | None = None,
        k: int = K,
        alpha: int = ALPHA,
        max_candidates: int = MAX_CANDIDATES,
        max_queries: int = MAX_QUERIES,
    ) -> None:
        self.key = key
        self._target = int.from_bytes(key, "big")
        self.local = local
        self.k = k
        self.alpha = alpha
        self.max_candidates = max_candidates
        self.max_queries = max_queries
        self.queries = 0  # FIND_NODE requests started
        self.failures = 0
        self._state: dict[PeerId, State] = {}
        self._dist: dict[PeerId, int] = {}
        self._add(seeds)

    def _distance(self, peer: PeerId) -> int:
        return int.from_bytes(peer_key(peer), "big") ^ self._target

    def _add(self, peers: list[PeerId]) -> None:
        for peer in peers:
            if peer == self.local or peer in self._state:
                continue
            self._state[peer] = State.WAITING
            self._dist[peer] = self._distance(peer)
        if len(self._state) > self.max_candidates:
            # Forget the farthest peers nobody is talking to; their answers could not matter.
            for peer in sorted(self._state, key=self._dist.__getitem__, reverse=True):
                if len(self._state) <= self.max_candidates:
                    break
                if self._state[peer] is State.WAITING:
                    del self._state[peer]
                    del self._dist[peer]

    def _ranked(self) -> list[PeerId]:
        """Candidates that have not failed, closest first."""
        alive = [p for p, s in self._state.items() if s is not State.FAILED]
        alive.sort(key=self._dist.__getitem__)
        return alive

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self._state.values() if s is State.IN_FLIGHT)

    def next_queries(self) -> list[PeerId]:
        """Peers to query now (marked in flight), closest first; empty when waiting or done."""
        out: list[PeerId] = []
        free = self.alpha - self.in_flight
        if free <= 0 or self.done:
            return out
        for peer in self._ranked()[: self.k]:
            if len(out) >= free or self.queries >= self.max_queries:
                break
            if self._state[peer] is State.WAITING:
                self._state[peer] = State.IN_FLIGHT
                self.queries += 1
                out.append(peer)
        return out

    def on_response(self, peer: PeerId, closer: list[PeerId]) -> None:
        if self._state.get(peer) is not State.IN_FLIGHT:
            return
        self._state[peer] = State.ANSWERED
        self._add(closer)

    def on_failure(self, peer: PeerId) -> None:
        if self._state.get(peer) is not State.IN_FLIGHT:
            return
        self._state[peer] = State.FAILED
        self.failures += 1

    @property
    def done(self) -> bool:
        """The k closest live candidates all answered, or nothing is left to ask."""
        top = self._ranked()[: self.k]
        if all(self._state[p] is State.ANSWERED for p in top):
            return True
        if self.queries >= self.max_queries:
            return not any(self._state[p] is State.IN_FLIGHT for p in self._state)
        return not any(self._state[p] in (State.WAITING, State.IN_FLIGHT) for p in self._state)

    def closest(self, count: int | None = None) -> list[PeerId]:
        """The peers that answered, closest first."""
        answered = [p for p, s in self._state.items() if s is State.ANSWERED]
        answered.sort(key=self._dist.__getitem__)
        return answered[: self.k if count is None else count]
