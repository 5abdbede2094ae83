"""``/v1/jobs/...``: the tracker's native HTTP API.

JSON in, JSON out, honest status codes with errors in the gateway's shape.
A worker authenticates every call with the token it got at registration,
as ``X-OCF-Worker-Token``, ``Authorization: Bearer <token>`` or a ``"token"``
field in the body. Creating projects and jobs needs the node's admin token;
the gateway's router enforces that (and every other route's policy) before
a view runs (:mod:`ocf.gateway.access`).
The three routes a worker fleet hammers (claim, heartbeat, complete) are
served as raw ASGI by :mod:`ocf.jobs.hot`; this module serves the rest and
holds the parsing both share.

==========================================  ==========================================================
``GET    /v1/jobs``                         projects with their progress
``PUT    /v1/jobs/<p>``                     create a project (same definition again: 200, different: 409)
``GET    /v1/jobs/<p>``                     definition + per-stage counts
``POST   /v1/jobs/<p>/jobs``                add stage-1 jobs: JSON list, ``{"inputs": [...]}`` or NDJSON
``GET    /v1/jobs/<p>/jobs/<id>``           one job
``POST   /v1/jobs/<p>/workers``             register ``{nickname, user?, stage}`` -> token and name
``GET    /v1/jobs/<p>/workers``             live workers: job, progress, done, user, last seen
                                          (``?stage=&all=&offset=&limit=``)
``GET    /v1/jobs/<p>/workers/<name>``      a worker's page: completions, jobs per hour
``POST   /v1/jobs/<p>/claim``               lease up to ``max`` jobs, waiting up to ``wait`` s for one
``POST   /v1/jobs/<p>/heartbeat``           extend leases, report ``progress``; lists leases lost
``POST   /v1/jobs/<p>/complete``            ``{"results": [{id, output}], "claim": k}``: per-item outcome (+ k new jobs)
``POST   /v1/jobs/<p>/jobs/<id>/complete``  ``{"output": ...}``; 409 if the lease was lost
``POST   /v1/jobs/<p>/jobs/<id>/fail``      ``{"error": "..."}``: retried, or failed after max attempts
``POST   /v1/jobs/<p>/jobs/<id>/flag``      the job's input is bad (rolls back after enough flags)
``POST   /v1/jobs/<p>/bye``                 unregister, releasing held jobs at once
``GET    /v1/jobs/<p>/stats``               progress, rates, ETA, throughput, failures (the dashboard's data)
``GET    /v1/jobs/<p>/leaderboard``         per user and per worker, per stage, all time and 24 h (``?offset=&limit=``)
``GET    /v1/jobs/<p>/results``             last stage's outputs as JSON lines (``?after=&limit=&input=1``)
``GET    /v1/jobs/<p>/failures``            recent failures
``GET    /v1/jobs/<p>/events``              server-sent ``stats`` events as things change
==========================================  ==========================================================
"""

from __future__ import annotations

import json
import operator
from typing import Any
from collections.abc import AsyncIterator

import trio
from quart import Blueprint, Response, current_app, jsonify, request

from .. import strictjson
from ..errors import BadRequest, JobsError, NotFound
from ..web.errors import exception_response
from . import views
from .edge import http_error
from .intake import decode_inputs
from .tracker import Tracker

blueprint = Blueprint("jobs", __name__)


@blueprint.app_errorhandler(JobsError)
async def jobs_error(exc: JobsError) -> Response:
    """The tracker's domain errors, in the gateway's JSON shape with the status :mod:`ocf.jobs.edge` gives."""
    return exception_response(http_error(exc))


#: Where a worker's token travels when the request crosses the network (see :func:`token_from`).
WORKER_TOKEN_HEADER = "X-OCF-Worker-Token"
EVENTS_MIN_INTERVAL = 0.5
EVENTS_KEEPALIVE = 15.0
RESULTS_PAGE = 1000


#: Where the node puts this node's :class:`Tracker` (or None without ``--jobs``) in the app's extensions.
TRACKER_EXTENSION = "ocf.jobs"


def hosted_tracker() -> Tracker | None:
    """This node's tracker, or None if it hosts none."""
    found: Tracker | None = current_app.extensions.get(TRACKER_EXTENSION)
    return found


def tracker() -> Tracker:
    found = hosted_tracker()
    if found is None:
        raise NotFound("this node does not host a job tracker (start it with --jobs)", code="no_tracker")
    return found


def parse_json(raw: bytes) -> Any:
    """``raw`` as JSON, or :class:`BadRequest` saying why not."""
    if not raw:
        raise BadRequest("request body must be JSON", code="bad_json")
    try:
        return strictjson.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="bad_json") from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object (an empty body is ``{}``), or :class:`BadRequest`."""
    body = parse_json(raw) if raw else {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="bad_json")
    return body


def token_from(authorization: str | None, body: dict[str, Any], worker_header: str | None = None) -> Any:
    """The worker's token: ``X-OCF-Worker-Token``, ``Authorization: Bearer <token>``, else the body's ``token``.

    Gateways never forward a client's ``Authorization`` to another node, so a
    worker reaching the tracker through the network (``/v1/service/jobs``)
    sends its token in ``X-OCF-Worker-Token`` (or the body) instead.
    """
    if worker_header:
        return worker_header.strip()
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return body.get("token")


def parse_number(value: Any, field: str, lo: float, hi: float, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise BadRequest(f"{field} must be a number in {lo:g}..{hi:g}", code=f"bad_{field}")
    return value


async def _body() -> bytes:
    return await request.get_data(cache=True, as_text=False, parse_form_data=False)


async def json_body() -> Any:
    return parse_json(await _body())


async def json_object() -> dict[str, Any]:
    return parse_json_object(await _body())


def token_of(body: dict[str, Any]) -> Any:
    return token_from(request.headers.get("Authorization"), body, request.headers.get(WORKER_TOKEN_HEADER))


# --- projects ---------------------------------------------------------------------------


@blueprint.get("/v1/jobs")
async def list_projects():  # type: ignore[no-untyped-def]
    t = tracker()
    now = t.clock()
    out = []
    listing = await t.read(lambda store: [(p, store.stats(p.name, now)) for p in store.projects()])
    for project, stats in listing:
        out.append(
            {
                **project.to_json(),
                "completion": stats["completion"],
                "eta_seconds": stats["eta_seconds"],
                "results": stats["results"],
            }
        )
    return jsonify(projects=out)


@blueprint.put("/v1/jobs/<project>")
async def create_project(project: str):  # type: ignore[no-untyped-def]
    definition, created = await tracker().create_project(project, await json_body())
    return jsonify(definition.to_json()), 201 if created else 200


@blueprint.get("/v1/jobs/<project>")
async def get_project(project: str):  # type: ignore[no-untyped-def]
    t = tracker()
    definition, counts = await t.read(lambda store: (store.project(project), store.counts(project)))
    out = definition.to_json()
    for stage, c in zip(out["stages"], counts, strict=True):
        stage.update(c)
    return jsonify(out)


# --- jobs -------------------------------------------------------------------------------


@blueprint.post("/v1/jobs/<project>/jobs")
async def add_jobs(project: str):  # type: ignore[no-untyped-def]
    t = tracker()
    await t.project(project)  # 404 before reading a large body
    key = request.headers.get("Idempotency-Key") or None
    if key is not None and len(key) > 200:
        raise BadRequest("Idempotency-Key must be at most 200 characters", code="bad_idempotency_key")
    ndjson = request.mimetype in ("application/x-ndjson", "application/jsonl", "application/jsonlines")
    inputs = await decode_inputs(await _body(), ndjson=ndjson)
    answer = await t.add_jobs(project, inputs, idempotency_key=key)
    return jsonify(answer), 200 if answer.get("repeated") else 201


@blueprint.get("/v1/jobs/<project>/jobs/<int:job_id>")
async def get_job(project: str, job_id: int):  # type: ignore[no-untyped-def]
    return jsonify(await tracker().read(lambda store: store.job(project, job_id)))


# --- workers ----------------------------------------------------------------------------


@blueprint.post("/v1/jobs/<project>/workers")
async def register(project: str):  # type: ignore[no-untyped-def]
    body = await json_object()
    nickname: Any = body.get("nickname", body.get("user"))  # JSON: the tracker checks it is a name
    worker = await tracker().register_worker(
        project, nickname=nickname, user=body.get("user"), stage=body.get("stage", 1)
    )
    stage = (await tracker().project(project)).stages[worker["stage"]]
    return jsonify(
        token=worker["token"],
        name=worker["name"],
        user=worker["user"],
        project=project,
        stage=stage.name,
        lease_timeout=stage.lease_timeout,
    ), 201


def flag_arg(name: str) -> bool:
    """``?all``, ``?all=1``, ``?all=true``: a switch in a query string."""
    value = request.args.get(name)
    return value is not None and value.lower() not in ("0", "false", "no")


@blueprint.get("/v1/jobs/<project>/workers")
async def list_workers(project: str):  # type: ignore[no-untyped-def]
    t = tracker()
    offset = int(parse_number(request.args.get("offset"), "offset", 0, 10**9, 0))
    limit = int(parse_number(request.args.get("limit"), "limit", 1, views.MAX_PAGE, 100))
    stage, include_idle, now = request.args.get("stage") or None, flag_arg("all"), t.clock()
    return jsonify(
        await t.read(
            lambda store: views.list_workers(
                store, project, now, stage=stage, include_idle=include_idle, offset=offset, limit=limit
            )
        )
    )


@blueprint.get("/v1/jobs/<project>/workers/<name>")
async def worker_page(project: str, name: str):  # type: ignore[no-untyped-def]
    t = tracker()
    now = t.clock()
    return jsonify(await t.read(lambda store: store.worker_by_name(project, name, now)))


@blueprint.post("/v1/jobs/<project>/jobs/<int:job_id>/complete")
async def complete_one(project: str, job_id: int):  # type: ignore[no-untyped-def]
    body = await json_object()
    if "output" not in body:
        raise BadRequest("body must have an 'output' field (any JSON value)", code="bad_output")
    return jsonify(await tracker().complete(project, token_of(body), job_id, body["output"]))


@blueprint.post("/v1/jobs/<project>/jobs/<int:job_id>/fail")
async def fail(project: str, job_id: int):  # type: ignore[no-untyped-def]
    body = await json_object()
    return jsonify(await tracker().fail(project, token_of(body), job_id, body.get("error")))


@blueprint.post("/v1/jobs/<project>/jobs/<int:job_id>/flag")
async def flag(project: str, job_id: int):  # type: ignore[no-untyped-def]
    body = await json_object()
    return jsonify(await tracker().flag(project, token_of(body), job_id, body.get("reason")))


@blueprint.post("/v1/jobs/<project>/bye")
async def bye(project: str):  # type: ignore[no-untyped-def]
    body = await json_object()
    return jsonify(released=await tracker().bye(project, token_of(body)))


# --- reading ----------------------------------------------------------------------------


@blueprint.get("/v1/jobs/<project>/stats")
async def stats(project: str):  # type: ignore[no-untyped-def]
    t = tracker()
    now = t.clock()
    return jsonify(await t.read(lambda store: store.stats(project, now)))


@blueprint.get("/v1/jobs/<project>/leaderboard")
async def leaderboard(project: str):  # type: ignore[no-untyped-def]
    t = tracker()
    limit = int(parse_number(request.args.get("limit"), "limit", 1, 10_000, 50))
    offset = int(parse_number(request.args.get("offset"), "offset", 0, 10**9, 0))
    now = t.clock()
    return jsonify(await t.read(lambda store: store.leaderboard(project, now, limit=limit, offset=offset)))


@blueprint.get("/v1/jobs/<project>/failures")
async def failures(project: str):  # type: ignore[no-untyped-def]
    limit = int(parse_number(request.args.get("limit"), "limit", 1, 1000, 100))
    return jsonify(failures=await tracker().read(lambda store: store.failures(project, limit=limit)))


@blueprint.get("/v1/jobs/<project>/results")
async def results(project: str):  # type: ignore[no-untyped-def]
    """JSON lines, streamed page by page so a million results never sit in memory."""
    t = tracker()
    await t.project(project)
    after = int(parse_number(request.args.get("after"), "after", 0, 2**63, 0))
    limit = int(parse_number(request.args.get("limit"), "limit", 1, 2**63, 2**63))
    with_input = flag_arg("input")

    async def lines() -> AsyncIterator[bytes]:
        nonlocal after
        sent = 0
        while sent < limit:
            size = min(RESULTS_PAGE, limit - sent)
            page = await t.read(
                operator.methodcaller("results", project, after=after, limit=size, with_input=with_input)
            )
            if not page:
                return
            yield b"".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for r in page)
            after = page[-1]["seq"]
            sent += len(page)
            await trio.lowlevel.checkpoint()

    response = Response(lines(), mimetype="application/x-ndjson")
    response.headers["Content-Disposition"] = f'attachment; filename="{project}-results.jsonl"'
    return response


@blueprint.get("/v1/jobs/<project>/events")
async def events(project: str):  # type: ignore[no-untyped-def]
    """Server-sent events: a ``stats`` event now and after changes (at most two a second)."""
    t = tracker()
    await t.project(project)

    async def stream() -> AsyncIterator[bytes]:
        while True:
            version = t.version
            now = t.clock()
            stats = await t.read(operator.methodcaller("stats", project, now))
            payload = json.dumps(stats, separators=(",", ":"))
            yield f"event: stats\ndata: {payload}\n\n".encode()
            with trio.move_on_after(EVENTS_KEEPALIVE) as scope:
                await t.wait_changed(version)
            if scope.cancelled_caught:
                yield b": keepalive\n\n"
            await trio.sleep(EVENTS_MIN_INTERVAL)

    response = Response(stream(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response
