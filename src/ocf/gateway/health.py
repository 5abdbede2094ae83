"""``GET /v1/health``: is this node up, who is it, how long has it run."""

from __future__ import annotations

from quart import Blueprint, current_app, jsonify

blueprint = Blueprint("health", __name__)


@blueprint.get("/v1/health")
async def health():  # type: ignore[no-untyped-def]
    node = current_app.extensions["ocf.node"]
    return jsonify(
        status="ok",
        peer_id=str(node.peer_id),
        version=node.version,
        mode=node.config.mode,
        uptime=round(node.uptime, 3),
        reachability=node.nat.reachability if node.nat is not None else "unknown",
    )
