"""``/dashboard``: the tracker's live page.

The page is HTML + vanilla JS + CSS shipped as package data in
``ocf/jobs/static/`` (no build step, no CDN, nothing fetched from another
host). Its first view (summary, stages, live workers, and the same data as
an embedded JSON block) is filled in by the server
(:mod:`ocf.jobs.firstview`, escaping every user-provided string), so the
page shows data at first paint; the script then renders from the public JSON
API (``/v1/jobs/<p>/stats``, ``/leaderboard``, ``/workers``) and stays live
on the server-sent ``/v1/jobs/<p>/events`` stream. The script only ever
writes data with ``textContent``, and the Content-Security-Policy below
forbids inline and foreign scripts as a second line of defence.

Routes:

- ``GET /dashboard[?project=NAME]``: the page. ``404`` (same page, which then
  explains why) when this node hosts no tracker or ``NAME`` is no project, so
  a link checker or script sees an honest status.
- ``GET /dashboard/static/<file>``: the page's assets, a fixed allow-list.
"""

from __future__ import annotations

from importlib import resources

from quart import Blueprint, Response, request

from ..errors import NotFound, ProjectNotFound
from . import firstview
from .http import hosted_tracker

blueprint = Blueprint("jobs_dashboard", __name__)

ASSETS: dict[str, str] = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
PAGE = "index.html"

# Everything comes from this origin; canvas/SVG need nothing more.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def read_asset(name: str) -> bytes:
    """An asset's bytes from the installed package (works from a wheel or an editable install)."""
    return resources.files("ocf.jobs").joinpath("static", name).read_bytes()


async def page_status() -> int:
    """200 if the page has something to show, 404 if it can only explain why not."""
    tracker = hosted_tracker()
    if tracker is None:
        return 404
    name = request.args.get("project")
    if name:
        try:
            await tracker.project(name)
        except ProjectNotFound:
            return 404
    return 200


def asset_response(name: str, content_type: str, status: int = 200) -> Response:
    response = Response(read_asset(name), status=status, content_type=content_type)
    response.headers.update(SECURITY_HEADERS)
    # Small files; revalidating each load keeps an upgraded node's page in step with its API.
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/dashboard")
async def dashboard() -> Response:
    status = await page_status()
    tracker = hosted_tracker()
    template, wanted = read_asset(PAGE).decode(), request.args.get("project") or None
    if tracker is None:
        page = firstview.render(template, None, wanted)
    else:
        page = await tracker.read(lambda store: firstview.render(template, tracker, wanted))
    response = Response(page, status=status, content_type="text/html; charset=utf-8")
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/dashboard/static/<name>")
async def dashboard_asset(name: str) -> Response:
    content_type = ASSETS.get(name)
    if content_type is None:
        raise NotFound(f"no dashboard asset {name!r}", code="not_found")
    return asset_response(name, content_type)
