"""Dashboard and claim wake-ups across nodes: ``LISTEN ocf_jobs`` on one connection per node.

Each committed batch that changed anything sends one ``NOTIFY`` (inside its
transaction, so it is delivered only if the batch commits) naming the stages
that got pending jobs. Every other node's listener hands it to the tracker
on the Trio thread, which wakes long-polling claimers of those stages and
the dashboard's live feed, as a local commit would. A listener that loses its
connection reconnects and reports "something changed" (it may have missed
notifications meanwhile).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any
from collections.abc import Callable

import psycopg
import trio

from ... import log as logfmt
from ...log import RateLimitedLog
from .schema import CHANNEL

log = logging.getLogger("ocf.jobs")

RECONNECT_DELAY = 1.0
POLL = 0.5  # how often the listening thread looks up from its socket to see if it should stop
MAX_PAYLOAD = 8000  # PostgreSQL's own limit on a NOTIFY payload

#: ``None`` means "anything may have changed"; else the (project, stage) pairs that got pending jobs.
Deliver = Callable[[list[tuple[str, int]] | None], None]


def parse(payload: str, node: str) -> tuple[bool, list[tuple[str, int]] | None]:
    """``(ours, stages)`` from a payload; anything malformed counts as "something changed"."""
    if len(payload) > MAX_PAYLOAD:
        return False, None
    try:
        data: Any = json.loads(payload)
        ours = data.get("node") == node and bool(node)
        raw = data.get("stages")
        if raw is None:
            return ours, None
        stages = [(str(p), int(s)) for p, s in raw]
    except (ValueError, TypeError, AttributeError):
        return False, None
    return ours, stages


class Listener:
    """A daemon thread that LISTENs and delivers other nodes' notifications through the Trio token."""

    def __init__(self, url: str, node: str, deliver: Deliver, token: trio.lowlevel.TrioToken) -> None:
        self.url = url
        self.node = node
        self.deliver = deliver
        self.token = token
        self.received = 0
        self.refusals = RateLimitedLog(log, 30.0)  # a database down for an hour logs a line per 30 s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ocf-jobs-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(RECONNECT_DELAY + POLL + 5)

    def _send(self, stages: list[tuple[str, int]] | None) -> None:
        try:
            self.token.run_sync_soon(self.deliver, stages)
        except trio.RunFinishedError:
            self._stop.set()

    def _loop(self) -> None:
        connected_before = False
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    if connected_before:
                        log.info("job tracker listening again %s", logfmt.kv(channel=CHANNEL))
                        self._send(None)
                    connected_before = True
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=POLL):
                            ours, stages = parse(note.payload, self.node)
                            if not ours:
                                self.received += 1
                                self._send(stages)
            except psycopg.Error as exc:
                self.refusals.log(
                    logging.WARNING, "lost", "job tracker notifications lost", error=" ".join(str(exc).split())[:200]
                )
                self._stop.wait(RECONNECT_DELAY)
