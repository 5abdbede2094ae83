"""The tracker's one writer thread: every LMDB write transaction and its fsync run here.

A commit waits for the disk (one fsync, a millisecond or more). On the Trio
thread that wait stalls everything the node does meanwhile: LLM streams it
relays, keepalives, health checks. So the tracker's group commit hands each
batch to this thread and the Trio task awaits it; requests are still answered
only once their batch is durable.

One thread, not a pool: LMDB has a single writer anyway, a write transaction
must begin and end on the same thread, and one thread keeps the batches in
order. The Trio side never blocks on it (it is woken through the run's
token), and a batch that was handed over always runs to its end.
"""

from __future__ import annotations

import queue
import threading
from typing import Any
from collections.abc import Callable

import outcome
import trio


class WriterThread:
    """Run callables one at a time on a dedicated daemon thread; ``await run(fn)`` for the result."""

    def __init__(self, name: str = "ocf-jobs-writer") -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Callable[[outcome.Outcome], None]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, deliver = item
            deliver(outcome.capture(fn))

    async def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the writer thread. Not cancellable once submitted: a commit is never half-awaited."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome] = []

        def deliver(result: outcome.Outcome) -> None:
            box.append(result)
            token.run_sync_soon(done.set)

        self._queue.put((fn, deliver))
        with trio.CancelScope(shield=True):
            await done.wait()
        return box[0].unwrap()

    def close(self, timeout: float = 10.0) -> None:
        """Let queued work finish, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def ident(self) -> int | None:
        return self._thread.ident
