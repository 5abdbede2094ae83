"""Which accepted connections a server takes on, and logging refusals without a storm.

Every open connection costs a file descriptor, a task and its buffers, and
an idle one costs a client nothing. Without a cap, tens of thousands of
idle connections exhaust the process's descriptors: ``accept`` then fails
with EMFILE for everyone, health checks included. So a server admits
connections in three ways (:meth:`ConnectionGate.admit`):

* under the cap: served normally;
* at the cap, the connection that has waited longest for a request (idle
  keep-alive, or a head still arriving) is closed to make room, as nginx
  reuses its idle connections: a client holding connections without using
  them loses them first;
* when every connection is busy with a request: a small reserve of extra
  connections, each allowed one request to the server's *reserved* paths
  (the health check) and 503 for anything else, so operators can still
  see the node while it is full. Past the reserve, a connection is closed
  as soon as it is accepted: that costs nothing and cannot be held open.

Refusals and accept errors are counted and logged at most once per interval
(:class:`ocf.log.RateLimitedLog`), never once per event.
"""

from __future__ import annotations

import collections
import logging
import resource
from typing import Protocol
from collections.abc import Callable

import attrs

NORMAL, RESERVE, REFUSE = "normal", "reserve", "refuse"

#: Descriptors the rest of a node needs besides its HTTP connections (peers, stores, backends).
FD_HEADROOM = 1024
#: Evicted connections still open (their task has not run yet) that admission tolerates over the cap.
EVICTION_SLACK = 16


@attrs.frozen
class ConnectionLimits:
    """A server's connection cap and the reserve kept for its reserved paths."""

    max_connections: int = 1024
    reserve: int = 16
    reserved_paths: frozenset[str] = frozenset()


@attrs.define
class ServerStats:
    """What a server's connections met, for ``/metrics``: the gate's counts and the engine's own refusals."""

    gate: ConnectionGate | None = None
    refusals: collections.Counter[str] = attrs.Factory(collections.Counter)


class ConnectionGate:
    """Counts one server's connections (sans-IO: the listener reports opens and closes)."""

    __slots__ = ("cap", "reserve", "open", "reserve_open", "refused", "evicted", "accept_errors")

    def __init__(self, cap: int, reserve: int) -> None:
        self.cap = cap
        self.reserve = reserve
        self.open = 0  # normal connections, evicted ones included until they have closed
        self.reserve_open = 0
        self.refused = 0
        self.evicted = 0
        self.accept_errors = 0

    def admit(self, evict_idle: Callable[[], bool]) -> str:
        """How to take a connection just accepted: NORMAL, RESERVE or REFUSE.

        ``evict_idle()`` closes the longest-idle connection and says whether
        there was one. An evicted connection still holds its descriptor
        until its task ends, so admitting by eviction stops at ``cap +
        EVICTION_SLACK`` open normal connections, bounding descriptors
        however fast connections arrive.
        """
        if self.open < self.cap or (self.open < self.cap + EVICTION_SLACK and evict_idle()):
            if self.open >= self.cap:
                self.evicted += 1
            self.open += 1
            return NORMAL
        if self.reserve_open < self.reserve:
            self.reserve_open += 1
            return RESERVE
        self.refused += 1
        return REFUSE

    def closed(self, kind: str) -> None:
        if kind == NORMAL:
            self.open -= 1
        elif kind == RESERVE:
            self.reserve_open -= 1


class IdleConnection(Protocol):
    """A connection waiting for a request, which shutdown or the cap may end."""

    def end_idle(self) -> None: ...


class Draining:
    """Shared by one server's connections: what shutdown and the connection cap act on.

    Connections waiting for a request (idle keep-alive, or a head still
    arriving) register here, oldest first. :meth:`drain` closes them all at
    shutdown (a connection in the middle of a request ends after its
    response); :meth:`evict_oldest` closes the one that waited longest, to
    make room for a new connection.
    """

    def __init__(self, refusals: collections.Counter[str] | None = None) -> None:
        self.draining = False
        self._idle: dict[IdleConnection, None] = {}  # insertion order: oldest first
        #: Requests the engine answered (or connections it ended) itself, by reason
        #: ("408 head_timeout", "write_timeout"...).
        self.refusals: collections.Counter[str] = refusals if refusals is not None else collections.Counter()

    def drain(self) -> None:
        self.draining = True
        for conn in list(self._idle):
            conn.end_idle()

    def evict_oldest(self) -> bool:
        """End the longest-waiting idle connection; False if none is idle."""
        for conn in self._idle:
            del self._idle[conn]
            conn.end_idle()
            return True
        return False


def fit_descriptor_limit(cap: int, reserve: int, log: logging.Logger) -> int:
    """The connection cap this process can honour; raises the soft descriptor limit if it must.

    A cap above what ``RLIMIT_NOFILE`` allows would turn into EMFILE for
    every new connection instead of a graceful refusal, so the soft limit
    is raised toward the hard one, and if that is not enough the cap is
    lowered (with a warning) to leave :data:`FD_HEADROOM` for the rest.
    """
    needed = cap + EVICTION_SLACK + reserve + FD_HEADROOM
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - no such limit on this platform
        return cap
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitted = max(16, soft // 2 - reserve)
        if fitted < cap:
            log.warning(
                "http connection cap lowered to fit the descriptor limit cap=%d was=%d nofile=%d", fitted, cap, soft
            )
            return fitted
    return cap
