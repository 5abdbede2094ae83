"""Wait for in-process state that has no event of its own, without polling on a clock.

Counters and budgets (a refusal count, a resource manager's usage, a peer's
identify record) change only when some Trio task runs. So instead of sleeping
in a loop and guessing a period, the waiter parks on an event that a Trio
instrument sets after any other task takes a step, and checks again then. It
wakes exactly when something could have changed, costs nothing while the
process is idle, and works under the autojump clock (a parked waiter counts
as blocked). State held by another process is not covered: poll that over
its own interface.
"""

from __future__ import annotations

from collections.abc import Callable

import trio


class _AnyStep(trio.abc.Instrument):
    """Sets ``event`` after a step of any task but ``waiter``."""

    def __init__(self, waiter: trio.lowlevel.Task) -> None:
        self.waiter = waiter
        self.event = trio.Event()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.waiter:
            self.event.set()


async def wait_until(predicate: Callable[[], object]) -> None:
    """Return once ``predicate()`` is true; the caller bounds the wait (``trio.fail_after``)."""
    if predicate():
        return
    steps = _AnyStep(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        while not predicate():
            await steps.event.wait()
            steps.event = trio.Event()
    finally:
        trio.lowlevel.remove_instrument(steps)
