"""``GET /v1/health``: is this node up, who is it, how long has it run."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from quart import Blueprint, Response, current_app, jsonify

blueprint = Blueprint("health", __name__)
#: The app extension holding a callable that returns the fields (the node supplies it).
HEALTH_EXTENSION = "ocf.health"


@blueprint.get("/v1/health")
async def health() -> Response:
    fields: Callable[[], Mapping[str, object]] = current_app.extensions[HEALTH_EXTENSION]
    return jsonify(status="ok", **fields())
