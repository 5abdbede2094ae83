"""``/dashboard``: the tracker's live page (placeholder until the dashboard lands)."""

from __future__ import annotations

from quart import Blueprint, Response

blueprint = Blueprint("jobs_dashboard", __name__)


@blueprint.get("/dashboard")
async def dashboard() -> Response:
    return Response("<!doctype html><title>ocf dashboard</title><p>dashboard coming", content_type="text/html")
