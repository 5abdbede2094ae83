"""Structured logging: one line per event, ``key=value`` fields.

Library code logs with ``log.info("event", extra=...)``-free plain messages
built from ``kv()``, so a line greps well and parses well:
``2026-11-24T01:02:03.456Z INFO ocf.node node started peer=…hG4z9L gateway=http://…``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname} {record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + repr(record.exc_info[1])
            if record.levelno >= logging.ERROR:
                line += "\n" + self.formatException(record.exc_info)
        return line


def kv(**fields: Any) -> str:
    """Format fields as ``k=v`` pairs; values with spaces are quoted."""
    out = []
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace('"', '\\"') + '"'
        out.append(f"{key}={text}")
    return " ".join(out)


def setup(level: str = "info", stream: Any = None) -> None:
    """Configure the ``ocf`` logger tree for a process (CLI only; libraries never call this)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("ocf").setLevel(level.upper())


class RateLimitedLog:
    """Counts repeated events and logs them at most once per ``interval``, with counts.

    A hostile peer can trigger a refusal thousands of times a second; logging
    each one would turn the log into the attack's amplifier. ``note()`` is
    O(1) and logs the counts accumulated since the last line when the interval
    has passed; ``flush()`` (called from a periodic task) writes what is pending.
    """

    def __init__(self, logger: logging.Logger, message: str, interval: float = 10.0, *, level: int = logging.WARNING, clock: Any = time.monotonic) -> None:
        self.logger = logger
        self.message = message
        self.interval = interval
        self.level = level
        self.clock = clock
        self.counts: dict[str, int] = {}
        self._last = -float("inf")

    def note(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        if self.clock() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        if not self.counts:
            return
        self._last = self.clock()
        counts, self.counts = self.counts, {}
        self.logger.log(self.level, "%s %s", self.message, kv(**counts))
