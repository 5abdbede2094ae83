"""A huge job-creation request must not freeze the node: bounded transactions, incremental decoding.

One anonymous 2 MB ``POST`` of ``[0,0,...]`` used to create a million jobs
in one transaction on the event loop's thread, and the node answered
nothing else for 19 s. Two figures while the request runs:

* the longest single task step on the Trio thread (a Trio instrument): the
  time the event loop could not switch tasks, which is what a synchronous
  transaction or ``json.loads`` of the whole body would show; under 50 ms.
  It is the Trio thread's own CPU time in the step (``time.thread_time``),
  so the OS running other processes on a busy machine does not count as the
  node's pause; waiting for the GIL does not either, which the wake-up gaps
  below count instead.
  Time in the garbage collector is counted apart: a full collection walks
  the whole node's heap whoever triggered it (about 100 ms on a loaded
  two-core machine even with the node idle), which is a property of the
  process, not of job creation; it gets the generous bound below. The test
  runner's own heap (pytest, hypothesis: far larger than a node's) is frozen
  out of collections for the measurement, so a collection costs what it
  would in a node process;
* the gaps between the wake-ups of a task sleeping 5 ms in a loop: their
  p99, less the same figure measured just before on the idle node, under
  50 ms, and the longest under a second (it was 19 s). These also count the
  time the OS did not schedule the process at all (a thread preempted while
  it holds the GIL stops every thread), which on a shared, overloaded
  machine reaches a few hundred milliseconds now and then whatever the code
  does; hence the p99 and the generous bound on the maximum.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import httpx
import pytest
import trio
import trio.abc

from ocf.node import open_node

pytestmark = pytest.mark.timeout(300)

MAX_STEP = 0.050
MAX_ADDED_P99 = 0.050
MAX_GAP = 1.0
MAX_GC = 0.250
#: A million in the slow run; CI's default run uses a bounded size with the same chunking.
JOBS = int(os.environ.get("OCF_TEST_CREATE_JOBS", "1000000"))


class LongestStep(trio.abc.Instrument):
    """The longest task step on the Trio thread while armed, less the garbage collector's time in it."""

    def __init__(self) -> None:
        self.armed = False
        self.longest = 0.0
        self.longest_gc = 0.0
        self.longest_task = ""
        self._started = 0.0
        self._gc_at_start = 0.0
        self._gc_total = 0.0
        self._gc_began = 0.0
        self._thread = threading.get_ident()

    def gc_callback(self, phase: str, info: dict) -> None:
        # A collection run on the Trio thread is CPU time of its step; the writer thread's
        # collections hold the GIL instead, which the wake-up gaps count.
        if threading.get_ident() != self._thread:
            return
        if phase == "start":
            self._gc_began = time.thread_time()
        else:
            spent = time.thread_time() - self._gc_began
            self._gc_total += spent
            if self.armed:
                self.longest_gc = max(self.longest_gc, spent)

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.thread_time()
        self._gc_at_start = self._gc_total

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        # The node's tasks only: the probes below (and the test's HTTP client) are the apparatus.
        if self.armed and not task.name.startswith(("tests.", "httpx", "httpcore")):
            step = time.thread_time() - self._started - (self._gc_total - self._gc_at_start)
            if step > self.longest:
                self.longest, self.longest_task = step, task.name


async def _creation_pause(node_config, count: int) -> dict[str, float]:
    async with (
        open_node(node_config(jobs=True)) as node,
        httpx.AsyncClient(
            base_url=node.gateway_url, headers={"X-OCF-Admin-Token": node.admin_token}, timeout=600
        ) as http,
    ):
        assert (await http.put("/v1/jobs/bomb", json={"stages": ["one"]})).status_code == 201
        body = b"[" + b",".join([b"0"] * count) + b"]"
        figures = {
            "max_gap": 0.0,
            "baseline_gap": 0.0,
            "longest_step": 0.0,
            "longest_gc": 0.0,
            "health": 0.0,
            "health_max": 0.0,
        }
        gaps: dict[str, list[float]] = {"max_gap": [], "baseline_gap": []}
        steps = LongestStep()
        trio.lowlevel.add_instrument(steps)
        gc.callbacks.append(steps.gc_callback)
        done = trio.Event()

        async def watch(key: str, until: trio.Event) -> None:
            last = time.perf_counter()
            while not until.is_set():
                await trio.sleep(0.005)
                now = time.perf_counter()
                figures[key] = max(figures[key], now - last - 0.005)
                gaps[key].append(now - last - 0.005)
                last = now

        idle = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, "baseline_gap", idle)
            await trio.sleep(2.0)  # a measurement window, not a wait for a condition
            idle.set()

        async def health() -> None:
            async with httpx.AsyncClient(base_url=node.gateway_url, timeout=10) as probe:
                while not done.is_set():
                    start = time.perf_counter()
                    assert (await probe.get("/v1/health")).status_code == 200
                    took = time.perf_counter() - start
                    figures["health"] += 1
                    figures["health_max"] = max(figures["health_max"], took)
                    await trio.sleep(0.1)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, "max_gap", done)
                nursery.start_soon(health)
                steps.armed = True
                r = await http.post("/v1/jobs/bomb/jobs", content=body, headers={"content-type": "application/json"})
                steps.armed = False
                done.set()
        finally:
            trio.lowlevel.remove_instrument(steps)
            gc.callbacks.remove(steps.gc_callback)
        figures["longest_step"] = steps.longest
        figures["longest_gc"] = steps.longest_gc
        for key, name in (("max_gap", "p99_gap"), ("baseline_gap", "baseline_p99")):
            ordered = sorted(gaps[key])
            figures[name] = ordered[int(0.99 * (len(ordered) - 1))]
        print("longest step in task", steps.longest_task)
        assert r.status_code == 201, r.text
        assert r.json()["created"] == count
        counts = (await http.get("/v1/jobs/bomb")).json()["stages"][0]
        assert counts["pending"] == count
        print("creation pause figures (s):", figures)
        return figures


@pytest.fixture
def frozen_runner_heap():
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def _check(figures: dict[str, float]) -> None:
    assert figures["longest_step"] < MAX_STEP, figures
    assert figures["p99_gap"] - figures["baseline_p99"] < MAX_ADDED_P99, figures
    assert figures["max_gap"] < MAX_GAP and figures["longest_gc"] < MAX_GC, figures


async def test_job_creation_keeps_event_loop_pauses_short(node_config, frozen_runner_heap):
    figures = await _creation_pause(node_config, min(JOBS, 100_000))
    _check(figures)
    assert figures["health"] >= 1, figures


@pytest.mark.slow
async def test_million_job_creation_keeps_event_loop_pauses_short(node_config, frozen_runner_heap):
    figures = await _creation_pause(node_config, JOBS)
    _check(figures)
    assert figures["health"] >= 10 and figures["health_max"] < 1.0, figures
