"""The gateway's Quart-Trio application: routes from every subsystem.

Each subsystem contributes a blueprint; this module only assembles them and
installs what all routes share (JSON errors, CORS, body limits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import jsonify
from quart_trio import QuartTrio

from .health import blueprint as health_blueprint

if TYPE_CHECKING:
    from ..node import Node


def create_app(node: "Node") -> QuartTrio:
    app = QuartTrio("ocf.gateway")
    app.config["MAX_CONTENT_LENGTH"] = node.config.max_body_size
    app.config["BODY_TIMEOUT"] = node.config.request_timeout
    app.config["RESPONSE_TIMEOUT"] = None  # streamed responses may run long; forwards enforce their own timeout
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.extensions["ocf.node"] = node
    app.register_blueprint(health_blueprint)

    @app.errorhandler(404)
    async def not_found(_exc: Exception):  # type: ignore[no-untyped-def]
        return jsonify(error={"message": "no such route", "type": "invalid_request_error", "code": "not_found"}), 404

    @app.errorhandler(405)
    async def bad_method(_exc: Exception):  # type: ignore[no-untyped-def]
        return jsonify(error={"message": "method not allowed on this route", "type": "invalid_request_error", "code": "method_not_allowed"}), 405

    @app.errorhandler(413)
    async def too_large(_exc: Exception):  # type: ignore[no-untyped-def]
        return jsonify(error={"message": f"request body exceeds {node.config.max_body_size} bytes", "type": "invalid_request_error", "code": "body_too_large"}), 413

    return app
