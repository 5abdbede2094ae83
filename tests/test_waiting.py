"""The in-process waiter wakes on other tasks' steps, not on a clock."""

import trio
import trio.testing

from tests.waiting import wait_until


async def test_wakes_when_another_task_changes_the_state(autojump_clock):
    counter, checks = [0], [0]

    def reached() -> bool:
        checks[0] += 1
        return counter[0] >= 5

    async def bump() -> None:
        for _ in range(5):
            await trio.sleep(60)  # long idle gaps: a polling waiter would spin through them
            counter[0] += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(bump)
        with trio.fail_after(600):
            await wait_until(reached)
    assert counter[0] == 5
    # one check per step of another task (the bumper's six, plus the run's own housekeeping),
    # where a 10 ms poll over these 300 idle seconds would have checked 30,000 times
    assert checks[0] <= 10


async def test_returns_at_once_when_already_true():
    await wait_until(lambda: True)


async def test_the_caller_bounds_the_wait(autojump_clock):
    with trio.move_on_after(5) as scope:
        await wait_until(lambda: False)
    assert scope.cancelled_caught
