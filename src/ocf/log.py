"""Structured logging: one line per event, ``key=value`` fields.

Library code logs with ``log.info("event", extra=...)``-free plain messages
built from ``kv()``, so a line greps well and parses well:
``2026-11-24T01:02:03.456Z INFO ocf.node node started peer=…hG4z9L gateway=http://…``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


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


def setup(level: str = "info", stream: TextIO | None = None) -> None:
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
    """Log a repeating event at most ``burst`` times per ``interval`` per key, with how many were not logged.

    For refusals and other events an attacker can trigger at will: one line
    per event would let a peer fill the disk (and spend our CPU formatting).
    The first events of a key in an interval are logged at once; the ones
    that follow within the interval are only counted, and the next line of
    that key, in a later interval, says ``suppressed=N``. Keys should come
    from a small fixed set (a reason, never a peer or an address); past
    ``max_keys`` the table is cleared rather than grown.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 256,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._window: dict[str, list[float]] = {}  # key -> [window start, lines logged in it]
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, **fields: Any) -> bool:
        """Log ``message`` with ``fields`` unless ``key`` used up its lines for this interval; True if logged."""
        now = self.clock()
        window = self._window.get(key)
        if window is None:
            if len(self._window) >= self.max_keys:
                self._window.clear()
                self._suppressed.clear()
            window = self._window[key] = [now, 0]
        elif now - window[0] >= self.interval:
            window[0], window[1] = now, 0
        if window[1] >= self.burst:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        window[1] += 1
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "%s %s", message, kv(**fields))
        return True

    def info(self, key: str, message: str, **fields: Any) -> bool:
        return self.log(logging.INFO, key, message, **fields)

    def warning(self, key: str, message: str, **fields: Any) -> bool:
        return self.log(logging.WARNING, key, message, **fields)
