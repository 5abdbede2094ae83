"""Simulated links for the in-memory network: latency, loss as a reliable transport sees it, crashes.

A link is a pair of one-way pipes. ``send_all`` stamps each write with when
it arrives (now + one-way latency, never before the write ahead of it, so
order is kept), and one task per :class:`Links` wakes each reader when its
write is due: no task per link, which is what lets a thousand nodes share
one process. (A reader sleeping until its own deadline cost a cancel scope
firing, an exception raised and caught, per write: a tenth of a 1,000-node
simulation's CPU.) Loss on a reliable stream is
not missing bytes but a retransmission: a lost write (probability ``loss``)
arrives one retransmission timeout later, and everything behind it waits
(head-of-line blocking), as over TCP. A crashed endpoint (:meth:`crash`)
goes silent: what it sends and what is sent to it vanishes, and no EOF or
reset reaches its peers, who must find out by themselves, as after a
power cut. A partition (:meth:`Links.partition`) does the same to the links
between two groups only, until :meth:`Links.heal`. Bytes and writes are
counted per sending endpoint.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import random
from collections.abc import Iterable

import trio

#: Linux's minimum TCP retransmission timeout: what one lost segment costs a reliable stream.
MIN_RTO = 0.2


class LinkStats:
    def __init__(self) -> None:
        self.bytes: collections.Counter[str] = collections.Counter()
        self.writes: collections.Counter[str] = collections.Counter()


class Links:
    """Shared settings and state of every link of one network."""

    def __init__(self, latency: float = 0.0, loss: float = 0.0, seed: int | None = None) -> None:
        self.latency = latency
        self.loss = loss
        self.rng = random.Random(seed)
        self.crashed: set[str] = set()
        self.cut: set[frozenset[str]] = set()  # pairs of names that cannot reach each other
        self.stats = LinkStats()
        # Writes not yet due, as (when, tiebreak, pipe): the delivery task sets each pipe's event then.
        self._due: list[tuple[float, int, _Pipe]] = []
        self._order = itertools.count()
        self._wake = trio.Event()
        self._run: object = None  # the Trio run whose delivery task serves these links

    def _deliver_at(self, at: float, pipe: _Pipe) -> None:
        """Wake ``pipe``'s reader at ``at``: started lazily, the delivery task lives as long as the run."""
        token = trio.lowlevel.current_trio_token()
        if self._run is not token:
            self._run = token
            self._due.clear()
            self._wake = trio.Event()
            trio.lowlevel.spawn_system_task(self._deliver, name="memlink.deliver")
        if not self._due or at < self._due[0][0]:
            self._wake.set()  # sooner than the task sleeps until
        heapq.heappush(self._due, (at, next(self._order), pipe))

    async def _deliver(self) -> None:
        due = self._due
        while True:
            now = trio.current_time()
            while due and due[0][0] <= now:
                heapq.heappop(due)[2].event.set()
            self._wake = trio.Event()
            if due:
                with trio.move_on_at(due[0][0]):
                    await self._wake.wait()
            else:
                await self._wake.wait()

    def crash(self, name: str) -> None:
        """``/memory/<name>`` goes silent in both directions, telling no one."""
        self.crashed.add(name)

    def partition(self, side: Iterable[str], other: Iterable[str]) -> None:
        """Every link between the two sides goes silent and no dial crosses, telling no one; :meth:`heal` ends it."""
        other = list(other)
        self.cut.update(frozenset((a, b)) for a in side for b in other)

    def heal(self) -> None:
        self.cut.clear()

    def unreachable(self, a: str, b: str) -> bool:
        return a in self.crashed or b in self.crashed or (bool(self.cut) and frozenset((a, b)) in self.cut)

    def rto(self) -> float:
        return max(MIN_RTO, 4 * self.latency)

    def pair(self, a: str, b: str) -> tuple[LinkStream, LinkStream]:
        ab, ba = _Pipe(), _Pipe()
        return LinkStream(self, a, b, ab, ba), LinkStream(self, b, a, ba, ab)


class _Pipe:
    __slots__ = ("chunks", "event", "eof", "reader_closed", "last_at")

    def __init__(self) -> None:
        self.chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        self.event = trio.Event()
        self.eof = False
        self.reader_closed = False
        self.last_at = 0.0


class LinkStream(trio.abc.Stream):
    def __init__(self, links: Links, me: str, peer: str, out: _Pipe, inp: _Pipe) -> None:
        self.links = links
        self.me = me
        self.peer = peer
        self._out = out
        self._in = inp
        self._closed = False

    def _silent(self) -> bool:
        links = self.links
        return bool(links.crashed or links.cut) and links.unreachable(self.me, self.peer)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("link closed")
        if self._silent():
            return
        if self._out.reader_closed:
            raise trio.BrokenResourceError("peer closed the link")
        links = self.links
        delay = links.latency
        if links.loss and links.rng.random() < links.loss:
            delay += links.rto()
        now = trio.current_time()
        at = max(now + delay, self._out.last_at)
        self._out.last_at = at
        self._out.chunks.append((at, bytes(data)))
        if at <= now:
            self._out.event.set()
        else:
            links._deliver_at(at, self._out)
        links.stats.bytes[self.me] += len(data)
        links.stats.writes[self.me] += 1

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        inp = self._in
        while True:
            if self._closed:
                raise trio.ClosedResourceError("link closed")
            if inp.chunks:
                at, data = inp.chunks[0]
                if at > trio.current_time():
                    inp.event = trio.Event()  # set when it is due (Links._deliver), or on close
                    await inp.event.wait()
                    continue
                if self._silent():
                    inp.chunks.clear()
                    continue
                if max_bytes is not None and len(data) > max_bytes:
                    inp.chunks[0] = (at, data[max_bytes:])
                    data = data[:max_bytes]
                else:
                    inp.chunks.popleft()
                await trio.lowlevel.checkpoint()
                return data
            if inp.eof:
                await trio.lowlevel.checkpoint()
                return b""
            inp.event = trio.Event()
            await inp.event.wait()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._in.reader_closed = True
            self._in.chunks.clear()
            if not self._silent():  # a crashed host's sockets close without telling anyone
                self._out.eof = True
                self._out.event.set()
            self._in.event.set()
        await trio.lowlevel.checkpoint()
