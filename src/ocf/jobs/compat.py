"""The original tracker's worker API, so ``distcompute-client`` works unchanged.

Point the client at ``http://<node>:8092/v1/jobs/<project>`` (or at
``/v1/service/jobs/<project>`` on any node of the network). Routes, bodies,
plain-text answers and status codes are the original's (400 bad stage, 403
no job / not yours, 404 unknown or timed-out worker); stages are letters
``a``..``e``; non-string values travel as ``"<!json!>"``-prefixed JSON.

What is deliberately *not* copied: stage N's output reaches stage N+1 (the
original wrote ``data_a`` and stage b read ``data_b``); expired leases are
reclaimed (its reclaim task died on a typo); a job is completed once, by
its lease holder; counters cannot lose concurrent updates; and progress
updates for unknown workers answer 404, not 200.
"""

from __future__ import annotations

import html
import json
from typing import Any

from quart import Blueprint, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import strictjson
from ..errors import BadRequest, GatewayRequestError, JobsError, LeaseNotHeld
from .edge import http_status
from .http import json_object, tracker
from .model import STAGE_LETTERS

blueprint = Blueprint("jobs_compat", __name__)
JSON_PREFIX = "<!json!>"
BASE = "/v1/jobs/<project>"


def _text(body: str, status: int = 200) -> Response:
    return Response(body, status=status, content_type="text/plain; charset=utf-8")


@blueprint.errorhandler(GatewayRequestError)
async def plain_error(exc: GatewayRequestError) -> Response:
    # The original answered errors as plain text; the client shows it in its exceptions.
    return _text(exc.message, exc.status)


@blueprint.errorhandler(JobsError)
async def plain_jobs_error(exc: JobsError) -> Response:
    return _text(exc.message, http_status(exc))


@blueprint.errorhandler(RequestEntityTooLarge)
async def plain_too_large(exc: RequestEntityTooLarge) -> Response:
    # Raised by the body reader inside these routes: keep the original's plain text, not the gateway's JSON.
    return _text("The request body is too large.", 413)


def _json(value: dict[str, Any]) -> Response:
    """A JSON answer without the trailing newline Quart's jsonify adds (the original had none)."""
    return Response(json.dumps(value, ensure_ascii=False, separators=(", ", ": ")), content_type="application/json")


def _token(body: dict[str, Any]) -> str:
    """The worker's token; a missing one is the caller's mistake (400), not an unknown worker (404)."""
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise BadRequest("A worker token is required: call /api/new first and send its token.", code="missing_token")
    return token


def encode_data(value: Any) -> str:
    return value if isinstance(value, str) else JSON_PREFIX + json.dumps(value, ensure_ascii=False)


def decode_data(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(JSON_PREFIX):
        try:
            return strictjson.loads(value[len(JSON_PREFIX) :])
        except ValueError:
            raise BadRequest("data starts with <!json!> but is not valid JSON", code="bad_data") from None
    return value


async def _letter(project: str, stage: Any) -> int:
    """The original only knew letters; anything else is its 400 'Invalid worker stage'."""
    if not isinstance(stage, str) or len(stage) != 1 or stage not in STAGE_LETTERS[:5]:
        raise BadRequest(f"Invalid worker stage: '{stage}'. Choose from 'a'/'b'/'c'/'d'/'e'.", code="unknown_stage")
    definition = await tracker().project(project)
    index = STAGE_LETTERS.index(stage)
    if index >= len(definition.stages):
        raise BadRequest(f"The worker stage '{stage}' is disabled.", code="unknown_stage")
    return index


@blueprint.get(BASE + "/api/new")
async def new(project: str) -> Any:
    index = await _letter(project, request.args.get("stage"))
    nickname = request.args.get("nickname", "anonymous")
    worker = await tracker().register_worker(project, nickname=nickname, stage=index + 1)
    stage_name = (await tracker().project(project)).stages[index].name
    return _json(
        {"token": worker["token"], "display_name": worker["name"], "project": project, "stage_name": stage_name}
    )


@blueprint.post(BASE + "/api/validateWorker")
async def validate_worker(project: str) -> Response:
    body = await json_object()
    t = tracker()
    token, now = _token(body), t.clock()
    return _text(str(await t.read(lambda store: store.validate_worker(project, token, now))))


@blueprint.post(BASE + "/api/newJob")
async def new_job(project: str) -> Any:
    body = await json_object()
    # As the original: asking for a new job gives back the one held (another worker may take it).
    jobs = await tracker().claim(project, _token(body), limit=1, release_held=True)
    if not jobs:
        return _text(
            "Either there are no new jobs available, or there was an error whilst finding a job. "
            "Keep retrying, as jobs are dynamically created.",
            403,
        )
    return _json({"data": encode_data(jobs[0]["input"]), "number": jobs[0]["id"]})


@blueprint.get(BASE + "/api/jobCount")
async def job_count(project: str) -> Response:
    index = await _letter(project, request.args.get("stage"))
    return _text(str(await tracker().read(lambda store: store.pending_count(project, index + 1))))


@blueprint.post(BASE + "/api/updateProgress")
async def update_progress(project: str) -> Response:
    body = await json_object()
    progress = body.get("progress")
    await tracker().heartbeat(project, _token(body), progress=progress if isinstance(progress, str) else None)
    return _text("200 OK")


async def _current_job(project: str, token: str, *, for_completion: bool = False) -> int | None:
    """The job a compat call refers to: the original's API never names it.

    For a completion that is the job the worker was last given, even when
    its lease has since expired: then the tracker refuses it (403) instead
    of matching it to an older job it already completed and answering 200
    for a result it throws away.
    """
    t = tracker()
    now = t.clock()
    held, last_claimed = await t.read(lambda store: store.held_jobs(project, token, now))
    if held:
        return held[0]
    return last_claimed if for_completion else None


@blueprint.post(BASE + "/api/completeJob")
async def complete_job(project: str) -> Response:
    body = await json_object()
    token = _token(body)
    data = body.get("data")
    if not isinstance(data, str):
        # The client always sends a string (JSON travels "<!json!>"-prefixed); a bare number is a bug.
        return _text("The worker did not submit valid data.", 400)
    job_id = await _current_job(project, token, for_completion=True)
    if job_id is None:
        return _text("You do not have an open job.", 403)
    try:
        # A retry of a completion that already landed answers 200 and counts nothing twice.
        await tracker().complete(project, token, job_id, decode_data(data))
    except LeaseNotHeld as exc:
        return _text(exc.message, 403)
    return _text("200 OK")


@blueprint.post(BASE + "/api/flagInvalidData")
async def flag_invalid_data(project: str) -> Response:
    body = await json_object()
    token = _token(body)
    job_id = await _current_job(project, token)
    if job_id is None:
        return _text("This worker is not currently working on a job.", 403)
    try:
        await tracker().flag(project, token, job_id)
    except LeaseNotHeld as exc:
        return _text(exc.message, 403)
    return _text("200 OK")


@blueprint.post(BASE + "/api/bye")
async def bye(project: str) -> Response:
    body = await json_object()
    await tracker().bye(project, _token(body))
    return _text("200 OK")


@blueprint.get(BASE + "/worker/<stage>/<name>")
async def worker_page(project: str, stage: str, name: str) -> Response:
    """A worker's page, as the URL the client logs at start-up promises."""
    t = tracker()
    now = t.clock()
    definition, info = await t.read(lambda store: (store.project(project), store.worker_by_name(project, name, now)))
    if stage.lower() not in (info["stage_letter"], info["stage"].lower()):
        return _text(f"Worker {name} works on stage {info['stage_letter']}, not {stage}.", 404)
    e = html.escape
    rows = "".join(
        f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in info.items() if k != "completed_by_stage"
    )
    per_stage = "".join(f"<li>{e(s)}: {n}</li>" for s, n in info["completed_by_stage"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(name)} · {e(definition.name)}</title>
<style>body{{font:15px system-ui,sans-serif;margin:2em;max-width:50em}}
th{{text-align:left;padding-right:1em}}</style></head>
<body><h1>{e(name)}</h1><p>Worker of <a href="/dashboard?project={e(project)}">{e(project)}</a>.</p>
<table>{rows}</table><h2>Completed by stage</h2><ul>{per_stage}</ul></body></html>"""
    return Response(page, content_type="text/html; charset=utf-8")
