"""Worker client for the job tracker: async (Trio or asyncio, through anyio), with a blocking wrapper.

Trio or asyncio (``trio.run(main)`` or ``asyncio.run(main())``)::

    async with ocf.jobs.client.connect("http://node:8092", "laion-crawl", nickname="alice") as tracker:
        async for job in tracker.jobs("crawl", batch=10):
            job.output = await crawl(job.input)      # completed when the loop moves on

Each pass of the loop leases jobs in batches, heartbeats them in the
background (so a long job keeps its lease), and completes a job with
``job.output`` when the loop asks for the next one, unless the body called
``await job.fail(...)``, ``await job.flag(...)`` or ``await job.complete(...)``
itself. Completions are sent in batches. Breaking out of the loop keeps
the outputs already set (the job the loop stopped at included, if its
output was set); leaving ``connect`` sends them, then says ``bye``, which
hands back any job still held at once (no attempt is used up), so a worker
that crashes out of its loop loses nothing.

Blocking::

    with ocf.jobs.client.connect_sync(url, project, nickname="bob") as tracker:
        for job in tracker.jobs("embed"):
            job.output = embed(job.input)

The URL may be a tracker node (``http://node:8092``) or any node of the
network (its ``/v1/service/jobs`` route finds the tracker): pass
``via_network=True``.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import anyio
import attrs
import httpx

from ..errors import OcfError, collapse_groups

DEFAULT_TIMEOUT = 60.0
MAX_HEARTBEAT_INTERVAL = 30.0
_UNSET: Any = object()


class TrackerError(OcfError):
    """The tracker refused a call; ``status`` and ``code`` are its HTTP answer."""

    def __init__(self, message: str, *, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _raise_for(response: httpx.Response) -> Any:
    if response.status_code < 400:
        return response.json()
    try:
        error = response.json()["error"]
        message, code = error["message"], error["code"]
    except (ValueError, KeyError, TypeError):
        message, code = response.text[:500] or response.reason_phrase, "http_error"
    raise TrackerError(f"tracker answered {response.status_code}: {message}", status=response.status_code, code=code)


def _base(url: str, project: str, via_network: bool) -> str:
    return f"{url.rstrip('/')}/v1/{'service/jobs' if via_network else 'jobs'}/{project}"


def _mark_output(job: Job, attribute: Any, value: Any) -> Any:
    job.has_output = True
    return value


@attrs.define(eq=False)
class Job:
    """A leased job. Set :attr:`output` (or call one of the methods) before the loop moves on."""

    id: int
    input: Any
    stage: str
    attempts: int
    output: Any = attrs.field(default=None, on_setattr=_mark_output)
    #: "held" until completed, failed, flagged, or lost (lease expired / rolled back).
    state: str = "held"
    _worker: Any = attrs.field(default=None, repr=False)
    #: True once ``output`` was assigned (None is a valid output), so a loop left early still sends it.
    has_output: bool = attrs.field(default=False, repr=False)

    async def complete(self, output: Any = _UNSET) -> None:
        if output is not _UNSET:
            self.output = output
        await self._worker._finish(self)

    async def fail(self, error: str) -> dict[str, Any]:
        self.state = "failed"
        return await self._worker._call("POST", f"/jobs/{self.id}/fail", {"error": error})

    async def flag(self, reason: str | None = None) -> dict[str, Any]:
        self.state = "flagged"
        return await self._worker._call("POST", f"/jobs/{self.id}/flag", {"reason": reason})


class StageWorker:
    """One registered worker of one stage (the tracker's unit of leases and leaderboard credit)."""

    def __init__(self, http: httpx.AsyncClient, base: str, registration: dict[str, Any]) -> None:
        self.http = http
        self.base = base
        self.token: str = registration["token"]
        self.name: str = registration["name"]
        self.stage: str = registration["stage"]
        self.lease_timeout: float = registration["lease_timeout"]
        self.held: dict[int, Job] = {}
        self._done: list[Job] = []
        #: The batch the ``jobs()`` loop is handing out; settled when the loop ends, however it ends.
        self._batch: list[Job] = []
        self.progress: str | None = None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.http.request(
            method,
            self.base + path,
            json=body or {},
            headers={"Authorization": f"Bearer {self.token}", "X-OCF-Worker-Token": self.token},
        )
        return _raise_for(response)

    async def claim(self, limit: int, wait: float) -> list[Job]:
        answer = await self._call("POST", "/claim", {"max": limit, "wait": wait})
        return self._adopt(answer["jobs"])

    async def _finish(self, job: Job) -> None:
        if job.state == "held":
            job.state = "completing"
            self._done.append(job)
        await self.flush()

    async def flush(self, claim: int = 0) -> list[Job]:
        """Send queued completions in one call, leasing ``claim`` new jobs in the same request.

        A job whose lease was lost meanwhile is marked ``lost`` (its result was not recorded).
        """
        if not self._done and not claim:
            return []
        batch = list(self._done)
        # Dropped from the queue only once the tracker answered: a tracker that is down or
        # restarting gets them again on the next flush (a repeat is answered already_done).
        answer = await self._call(
            "POST", "/complete", {"results": [{"id": j.id, "output": j.output} for j in batch], "claim": claim}
        )
        del self._done[: len(batch)]
        for job, outcome in zip(batch, answer["results"], strict=True):
            self.held.pop(job.id, None)
            job.state = "done" if outcome["status"] in ("done", "already_done") else "lost"
        return self._adopt(answer["jobs"])

    def settle(self) -> None:
        """Queue the outputs set in the current batch; the rest stay held (``bye`` hands them back)."""
        for job in self._batch:
            if job.state == "held" and job.has_output:
                job.state = "completing"
                self._done.append(job)
        self._batch = []

    def _adopt(self, raw: list[dict[str, Any]]) -> list[Job]:
        jobs = [Job(j["id"], j["input"], j["stage"], j["attempts"], worker=self) for j in raw]
        for job in jobs:
            self.held[job.id] = job
        return jobs

    async def heartbeat(self) -> None:
        answer = await self._call("POST", "/heartbeat", {"jobs": list(self.held), "progress": self.progress})
        for job_id in answer["lost"]:
            job = self.held.pop(job_id, None)
            if job is not None:
                job.state = "lost"

    async def heartbeat_forever(self) -> None:
        interval = min(MAX_HEARTBEAT_INTERVAL, max(self.lease_timeout / 3, 0.05))
        while True:
            await anyio.sleep(interval)
            if self.held:
                try:
                    await self.heartbeat()
                except httpx.TransportError:
                    continue  # the tracker is restarting: leases last longer than a few beats
                except TrackerError as exc:
                    if exc.status == 404:
                        return  # forgotten: the jobs loop learns it on its next call and registers again
                    continue  # never take the worker down from a background task; its loop sees real errors

    async def bye(self) -> None:
        with contextlib.suppress(httpx.HTTPError, TrackerError):
            await self._call("POST", "/bye")


class TrackerClient:
    """A connection to one project of a tracker; registers one worker per stage on first use."""

    def __init__(
        self, http: httpx.AsyncClient, base: str, nickname: str, user: str | None, nursery: anyio.abc.TaskGroup
    ) -> None:
        self.http = http
        self.base = base
        self.nickname = nickname
        self.user = user
        self._nursery = nursery
        self._workers: dict[str, StageWorker] = {}

    async def worker(self, stage: str) -> StageWorker:
        worker = self._workers.get(stage)
        if worker is None:
            body = {"nickname": self.nickname, "stage": stage}
            if self.user:
                body["user"] = self.user
            registration = _raise_for(await self.http.post(self.base + "/workers", json=body))
            worker = self._workers[stage] = StageWorker(self.http, self.base, registration)
            self._nursery.start_soon(worker.heartbeat_forever)
        return worker

    def forget_worker(self, stage: str) -> None:
        """Drop this stage's registration (the tracker forgot it); the next call registers again."""
        self._workers.pop(stage, None)

    async def jobs(
        self, stage: str, *, batch: int = 1, wait: float = 20.0, until_empty: bool = False
    ) -> AsyncIterator[Job]:
        """Lease and yield jobs of ``stage`` forever (or until none are left, with ``until_empty``)."""
        worker = await self.worker(stage)
        try:
            worker.settle()  # an earlier loop left early: its outputs go with the next flush
            jobs: list[Job] = []
            while True:
                if not jobs:
                    if worker._done:
                        jobs = await worker.flush(claim=batch)
                    else:
                        jobs = await worker.claim(batch, 0.0 if until_empty else wait)
                    if not jobs:
                        if until_empty:
                            return
                        continue
                worker._batch = list(jobs)
                for job in jobs:
                    yield job
                    if job.state == "held":
                        job.state = "completing"
                        worker._done.append(job)
                worker._batch = []
                # Report this batch and lease the next one in a single request.
                jobs = await worker.flush(claim=batch)
        finally:
            # Runs on break only when the generator is finalised (later, for an async
            # generator): connect() also settles and flushes before it says bye.
            worker.settle()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                if worker._done:
                    with contextlib.suppress(httpx.HTTPError, TrackerError):
                        await worker.flush()

    async def run(
        self, stage: str, handle: Callable[[Any], Awaitable[Any]], *, batch: int = 1, until_empty: bool = False
    ) -> int:
        """Complete each job with ``await handle(job.input)``; an exception fails the job with its text."""
        done = 0
        async for job in self.jobs(stage, batch=batch, until_empty=until_empty):
            try:
                job.output = await handle(job.input)
            except Exception as exc:  # the worker's code failed on this input: tell the tracker, go on
                await job.fail(f"{type(exc).__name__}: {exc}"[:1000])
            else:
                done += 1
        return done

    async def stats(self) -> dict[str, Any]:
        return _raise_for(await self.http.get(self.base + "/stats"))


@contextlib.asynccontextmanager
async def connect(
    url: str,
    project: str,
    *,
    nickname: str = "anonymous",
    user: str | None = None,
    via_network: bool = False,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - per HTTP call (httpx's), not for the client's whole life
    http: httpx.AsyncClient | None = None,
) -> AsyncIterator[TrackerClient]:
    """Open a client for ``project`` at ``url``; leaving the block says bye for every stage worker."""
    owns = http is None
    client = http or httpx.AsyncClient(timeout=timeout)
    try:
        # The heartbeat task group wraps the caller's own exception in a group;
        # a library context manager should hand it back as it was raised.
        with collapse_groups():
            async with anyio.create_task_group() as nursery:
                tracker = TrackerClient(client, _base(url, project, via_network), nickname, user, nursery)
                try:
                    yield tracker
                finally:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                        for worker in tracker._workers.values():
                            # Outputs set before the caller broke out of a jobs() loop are results, not losses.
                            worker.settle()
                            if worker._done:
                                with contextlib.suppress(httpx.HTTPError, TrackerError):
                                    await worker.flush()
                            await worker.bye()
                    nursery.cancel_scope.cancel()
    finally:
        if owns:
            await client.aclose()


# --- blocking wrapper -----------------------------------------------------------------------


class SyncTracker:
    """Blocking client for scripts that are not Trio programs; heartbeats between jobs."""

    def __init__(self, http: httpx.Client, base: str, nickname: str, user: str | None) -> None:
        self.http = http
        self.base = base
        self.nickname = nickname
        self.user = user
        self._tokens: dict[str, dict[str, Any]] = {}

    def _call(self, stage: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        token = self.register(stage)["token"]
        return _raise_for(
            self.http.request(
                method,
                self.base + path,
                json=body or {},
                headers={"Authorization": f"Bearer {token}", "X-OCF-Worker-Token": token},
            )
        )

    def register(self, stage: str) -> dict[str, Any]:
        if stage not in self._tokens:
            body = {"nickname": self.nickname, "stage": stage, **({"user": self.user} if self.user else {})}
            self._tokens[stage] = _raise_for(self.http.post(self.base + "/workers", json=body))
        return self._tokens[stage]

    def claim(self, stage: str, limit: int = 1, wait: float = 0.0) -> list[dict[str, Any]]:
        return self._call(stage, "POST", "/claim", {"max": limit, "wait": wait})["jobs"]

    def complete(self, stage: str, job_id: int, output: Any) -> dict[str, Any]:
        return self._call(stage, "POST", f"/jobs/{job_id}/complete", {"output": output})

    def fail(self, stage: str, job_id: int, error: str) -> dict[str, Any]:
        return self._call(stage, "POST", f"/jobs/{job_id}/fail", {"error": error})

    def heartbeat(self, stage: str, jobs: list[int], progress: str | None = None) -> dict[str, Any]:
        return self._call(stage, "POST", "/heartbeat", {"jobs": jobs, "progress": progress})

    def jobs(self, stage: str, *, batch: int = 1, wait: float = 20.0, until_empty: bool = False) -> Iterator[Job]:
        """Like the Trio client's ``jobs``: completes each job with ``job.output`` when the loop moves on."""
        lease = self.register(stage)["lease_timeout"]
        beat_every = min(MAX_HEARTBEAT_INTERVAL, lease / 3)
        raw: list[dict[str, Any]] = []
        while True:
            if not raw:
                raw = self.claim(stage, batch, 0.0 if until_empty else wait)
                if not raw:
                    if until_empty:
                        return
                    continue
            last_beat = time.monotonic()
            held = [Job(j["id"], j["input"], j["stage"], j["attempts"]) for j in raw]
            results = []
            try:
                for i, job in enumerate(held):
                    if time.monotonic() - last_beat > beat_every:
                        self.heartbeat(stage, [j.id for j in held[i:]])
                        last_beat = time.monotonic()
                    yield job
                    if job.state == "held":
                        job.state = "done"
                        results.append({"id": job.id, "output": job.output})
            except GeneratorExit:
                # The caller broke out: send what is done, including the job it stopped at if its output was set.
                stopped = [
                    j for j in held if j.state == "held" and j.has_output and all(r["id"] != j.id for r in results)
                ]
                results.extend({"id": j.id, "output": j.output} for j in stopped)
                if results:
                    with contextlib.suppress(httpx.HTTPError, TrackerError):
                        self._call(stage, "POST", "/complete", {"results": results})
                raise
            # Report this batch and lease the next one in a single request.
            raw = self._call(stage, "POST", "/complete", {"results": results, "claim": batch})["jobs"]

    def close(self) -> None:
        for stage in list(self._tokens):
            with contextlib.suppress(httpx.HTTPError, TrackerError):
                self._call(stage, "POST", "/bye")
        self.http.close()


@contextlib.contextmanager
def connect_sync(
    url: str,
    project: str,
    *,
    nickname: str = "anonymous",
    user: str | None = None,
    via_network: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Iterator[SyncTracker]:
    tracker = SyncTracker(httpx.Client(timeout=timeout), _base(url, project, via_network), nickname, user)
    try:
        yield tracker
    finally:
        tracker.close()


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if not math.isfinite(seconds):
        return "unknown"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] * bool(days) + [f"{hours}h"] * bool(hours) + [f"{minutes}m"] * bool(minutes)
    return " ".join(parts + [f"{secs}s"]) if seconds < 3600 else " ".join(parts)
