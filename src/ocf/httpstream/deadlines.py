"""How long one HTTP connection may take over each part of an exchange (sans-IO).

A hostile client holds a connection, a task and a file descriptor for as long
as the server waits for it, so every wait has a deadline of its own:

* the **head**: a request head must arrive whole within ``head`` seconds of
  its first byte (of the connection's start, for the first request). This
  is separate from the keep-alive idle timeout: a client that sends half a
  head is not idle, it is slowloris;
* the **body**: it may not stall for ``body`` seconds, and it must keep up
  a minimum average rate: the deadline starts at ``body`` seconds and each
  byte received buys ``1 / min_body_rate`` seconds more (Apache's
  mod_reqtimeout ``MinRate``). An inactivity timeout alone lets a client
  trickle one byte every few seconds forever. Time the server spends not
  reading (the application has not taken what was read yet) is not
  counted against the client;
* a **write**: one write may not wait longer than ``write`` seconds (plus at
  most one watchdog period, the shortest timeout) for the client to read (a
  client that never reads its response fills the socket's buffers and then
  parks the response forever).

:class:`ConnectionClock` holds the current deadlines; the Trio driver in
:mod:`ocf.httpstream.server` tells it what happened and one watchdog task
per connection asks it when to wake and what expired.
"""

from __future__ import annotations

import math

import attrs

from .bridge import PHASE_BODY, PHASE_HEAD

INF = math.inf

#: What :meth:`ConnectionClock.expired` returns.
HEAD, HEAD_UNSTARTED, BODY, WRITE = "head", "head_unstarted", "body", "write"


@attrs.frozen
class Timeouts:
    """The per-connection deadlines (seconds; ``min_body_rate`` in bytes per second)."""

    head: float = 10.0
    body: float = 30.0
    min_body_rate: float = 1024.0
    write: float = 30.0

    @property
    def shortest(self) -> float:
        return min(self.head, self.body, self.write)


class ConnectionClock:
    """The deadlines of one connection's current phase; times are Trio clock seconds."""

    __slots__ = (
        "timeouts",
        "head_since",
        "head_bytes",
        "body_budget",
        "body_idle",
        "writing",
        "writes",
        "write_seen",
        "write_since",
        "paused_since",
    )

    def __init__(self, timeouts: Timeouts, now: float) -> None:
        self.timeouts = timeouts
        # The first request's head is due within ``head`` seconds of the connection opening.
        self.head_since: float | None = now
        self.head_bytes = False  # whether any byte of that head arrived (decides 408 or a quiet close)
        self.body_budget = INF
        self.body_idle = INF
        # Writes are not timed by the writer (a clock read per write costs every response):
        # the driver flags one in flight and counts finished ones; the watchdog notes when it
        # first saw the current one, so a write is cut off between ``write`` and ``write`` +
        # one watchdog period after it started.
        self.writing = False
        self.writes = 0
        self.write_seen = -1
        self.write_since = INF
        self.paused_since: float | None = None  # the server stopped reading (backpressure) at this time

    def received(self, now: float, nbytes: int, phase: int, expecting_continue: bool = False) -> None:
        """``nbytes`` arrived and were parsed; the request is now in ``phase``.

        A client waiting for ``100 Continue`` before its body is not late:
        its body is due from :meth:`continued` on.
        """
        if phase == PHASE_HEAD:
            if nbytes and (self.head_since is None or not self.head_bytes):
                if self.head_since is None:
                    self.head_since = now
                self.head_bytes = True
        elif phase == PHASE_BODY:
            self.head_since = None
            if expecting_continue:
                return
            if self.body_budget == INF:
                self.body_budget = now + self.timeouts.body
            else:
                self.body_budget += nbytes / self.timeouts.min_body_rate
            self.body_idle = now + self.timeouts.body
        else:
            self.head_since = None
            self.body_budget = self.body_idle = INF

    def continued(self, now: float) -> None:
        """``100 Continue`` went out: the body is due from now."""
        self.body_budget = now + self.timeouts.body
        self.body_idle = now + self.timeouts.body

    def pause(self, now: float) -> None:
        """The server stops reading (backpressure): until :meth:`resume`, the client is not to blame."""
        self.paused_since = now

    def resume(self, now: float) -> None:
        if self.paused_since is None:
            return
        if self.body_budget != INF:
            self.body_budget += now - self.paused_since
            self.body_idle = max(self.body_idle, now + self.timeouts.body)
        self.paused_since = None

    def next_cycle(self, now: float, buffered: int) -> None:
        """The exchange ended; bytes already buffered are the start of the next head."""
        self.head_since = now if buffered else None
        self.head_bytes = bool(buffered)
        self.body_budget = self.body_idle = INF

    def stop_reading(self) -> None:
        """No more request bytes are awaited (a head or body deadline was acted on)."""
        self.head_since = None
        self.body_budget = self.body_idle = INF

    def expired(self, now: float, phase: int) -> str | None:
        """What is overdue at ``now`` (the request being in ``phase``), or None; called by the watchdog only."""
        if self.writing:
            if self.write_seen != self.writes:
                self.write_seen, self.write_since = self.writes, now  # a write not seen before: timed from now
            elif now >= self.write_since + self.timeouts.write:
                return WRITE
        if phase == PHASE_HEAD:
            if self.head_since is not None and now >= self.head_since + self.timeouts.head:
                return HEAD if self.head_bytes else HEAD_UNSTARTED
        elif phase == PHASE_BODY and self.paused_since is None and now >= min(self.body_budget, self.body_idle):
            return BODY
        return None

    def next_deadline(self, phase: int) -> float:
        """The earliest deadline that could expire in ``phase`` (INF if none is running)."""
        deadline = self.write_since + self.timeouts.write if self.writing and self.write_seen == self.writes else INF
        if phase == PHASE_HEAD and self.head_since is not None:
            deadline = min(deadline, self.head_since + self.timeouts.head)
        elif phase == PHASE_BODY and self.paused_since is None:
            deadline = min(deadline, self.body_budget, self.body_idle)
        return deadline
