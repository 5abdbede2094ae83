"""A deterministic in-test network of sans-IO SWIM machines: messages with latency and loss, no I/O."""

from __future__ import annotations

import hashlib
import heapq
import itertools
import random

from ocf.membership import messages
from ocf.membership.swim import Swim, SwimConfig
from ocf.membership.update import Status


def fake_sign(peer: str):
    def sign(data: bytes) -> bytes:
        return hashlib.sha512(b"key:" + peer.encode() + data).digest()

    return sign


def fake_verify(peer: str, data: bytes, signature: bytes) -> bool:
    return hashlib.sha512(b"key:" + peer.encode() + data).digest() == signature


class SimNet:
    def __init__(
        self, n: int, seed: int, *, degree: int = 4, loss: float = 0.0, latency: float = 0.01, config=None
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.loss = loss
        self.latency = latency
        self.config = config or SwimConfig()
        self.names = [f"peer-{i:03d}" for i in range(n)]
        self.nodes: dict[str, Swim] = {}
        self.dead: set[str] = set()
        self.cut: set[frozenset[str]] = set()  # pairs that cannot talk (a partition)
        self.queue: list = []
        self.counter = itertools.count()
        self.false_dead: set[tuple[str, str]] = set()  # (observer, live peer it declared dead)
        self.delivered = 0
        self.graph: dict[str, set[str]] = {name: set() for name in self.names}
        for i, name in enumerate(self.names):  # a ring plus random chords: connected, bounded degree
            self._link(name, self.names[(i + 1) % n])
        for name in self.names:
            while len(self.graph[name]) < degree:
                other = self.rng.choice(self.names)
                if other != name:
                    self._link(name, other)
        for name in self.names:
            self.nodes[name] = Swim(
                name, fake_sign(name), fake_verify, 0.0, incarnation=1, config=self.config, rng=random.Random(name)
            )
        for name, node in self.nodes.items():
            node.set_neighbors(sorted(self.graph[name]))
            for peer in sorted(self.graph[name]):
                node.connected(peer)
            self._flush(name)

    def _link(self, a: str, b: str) -> None:
        self.graph[a].add(b)
        self.graph[b].add(a)

    def _flush(self, name: str) -> None:
        node = self.nodes[name]
        out, node.outbox = node.outbox, []
        for peer, message in out:
            if name in self.dead or peer in self.dead or frozenset((name, peer)) in self.cut:
                continue
            if self.loss and self.rng.random() < self.loss:
                continue
            # Round-trip through the wire form so the codec is exercised too.
            decoded, bad = messages.from_wire(messages.to_wire(message))
            assert bad == 0
            at = self.now + self.latency * (0.5 + self.rng.random())
            heapq.heappush(self.queue, (at, next(self.counter), name, peer, decoded))
        node.changes.clear()

    def _check_false(self, name: str) -> None:
        for peer, status in self.nodes[name].changes:
            if status == Status.DEAD and peer not in self.dead:
                self.false_dead.add((name, peer))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            live = [n for n in self.names if n not in self.dead]
            t_tick = min(self.nodes[n].next_deadline() for n in live)
            t_msg = self.queue[0][0] if self.queue else float("inf")
            t = min(t_tick, t_msg)
            if t > end:
                self.now = end
                return
            self.now = max(self.now, t)
            if t_msg <= t_tick:
                _, _, sender, peer, message = heapq.heappop(self.queue)
                if peer in self.dead or frozenset((sender, peer)) in self.cut:
                    continue
                self.delivered += 1
                self.nodes[peer].receive(sender, message, self.now)
                self._check_false(peer)
                self._flush(peer)
            else:
                for n in live:
                    if self.nodes[n].next_deadline() <= self.now:
                        self.nodes[n].tick(self.now)
                        self._check_false(n)
                        self._flush(n)

    def kill(self, name: str) -> None:
        self.dead.add(name)

    def view(self, observer: str, peer: str) -> Status | None:
        return self.nodes[observer].status(peer)

    def live(self) -> list[str]:
        return [n for n in self.names if n not in self.dead]
