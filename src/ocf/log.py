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
