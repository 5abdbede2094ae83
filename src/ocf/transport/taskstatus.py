"""A Trio task status that lets go of Trio's once ``started`` was called.

Trio's status holds the nursery the task was started from, and that nursery
its task: the caller of ``nursery.start``. A long-lived task (a connection, a
QUIC endpoint's socket reader) keeps its status in its frames for its whole
life, which may be days, while the caller (a membership dial, a gateway
request) ends in milliseconds. Handing the task this wrapper in place of
Trio's status, and deleting Trio's from the frame, lets the caller and all
it refers to be freed as soon as it ends.
"""

from __future__ import annotations

from typing import Any


class StartedOnce:
    """A task status that remembers whether ``started`` was called, and drops Trio's once it was."""

    def __init__(self, status: Any) -> None:
        self._status: Any = status
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        status, self._status = self._status, None
        status.started(value)
