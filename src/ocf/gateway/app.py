"""The gateway's Quart-Trio application: routes from every subsystem.

Each subsystem contributes a blueprint; this module only assembles them and
installs what all routes share (JSON errors, CORS, body limits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..errors import GatewayRequestError
from .errors import error_response, exception_response
from .health import blueprint as health_blueprint

if TYPE_CHECKING:
    from ..node import Node


def create_app(node: "Node") -> QuartTrio:
    app = QuartTrio("ocf.gateway")
    # Werkzeug would answer "//" in a path with a 308 whose absolute Location names the
    # client's Host header (an open redirect to wherever Host points); no redirects at all.
    # Set before any rule is added: each rule takes the map's value when it is bound.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = node.config.max_body_size
    app.config["BODY_TIMEOUT"] = node.config.request_timeout
    app.config["RESPONSE_TIMEOUT"] = None  # streamed responses may run long; forwards enforce their own timeout
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.extensions["ocf.node"] = node
    app.register_blueprint(health_blueprint)
    from ..nodetable.http import blueprint as nodetable_blueprint

    app.register_blueprint(nodetable_blueprint)
    from ..jobs.compat import blueprint as jobs_compat_blueprint
    from ..jobs.dashboard import blueprint as dashboard_blueprint
    from ..jobs.http import blueprint as jobs_blueprint

    app.register_blueprint(jobs_blueprint)
    app.register_blueprint(jobs_compat_blueprint)
    app.register_blueprint(dashboard_blueprint)

    # --- gateway: JSON errors, metrics, forwarding routes (issue 6) ----------------------
    install_gateway_layer(app, node)
    # ---------------------------------------------------------------------------------------

    return app


def install_gateway_layer(app: QuartTrio, node: "Node") -> None:
    """JSON errors in OpenAI's shape, ``/metrics``, and the ASGI layer serving the forwarding routes.

    The forwarding routes (``/v1/_service``, ``/v1/service``, ``/v1/p2p``) are
    raw ASGI in front of Quart (see :mod:`ocf.gateway.forward` for why), as
    are the job tracker's three hot routes (:mod:`ocf.jobs.hot`); CORS and
    request metrics wrap every route.
    """
    from ..jobs.hot import HotRoutes
    from .asgi import Cors, GatewayASGI
    from .forward import Forwarder
    from .metrics import GatewayMetrics
    from .metrics import blueprint as metrics_blueprint

    metrics = GatewayMetrics(node)
    forwarder = Forwarder(node, metrics)
    app.extensions["ocf.metrics"] = metrics
    app.extensions["ocf.forwarder"] = forwarder
    app.register_blueprint(metrics_blueprint)
    app.asgi_app = GatewayASGI(app.asgi_app, forwarder, metrics, Cors(node.config.cors_origins), HotRoutes(node))  # type: ignore[method-assign]
    forwarder.app = app  # in-process dispatch (internal services, /v1/p2p/<self>) re-enters the whole app

    @app.before_request
    async def label_route() -> None:
        # Metrics count requests by route template (bounded), never by raw path.
        rule = request.url_rule
        request.scope["ocf.route"] = rule.rule if rule is not None else "unmatched"

    @app.errorhandler(GatewayRequestError)
    async def gateway_error(exc: GatewayRequestError):  # type: ignore[no-untyped-def]
        return exception_response(exc)

    @app.errorhandler(404)
    async def not_found(_exc: Exception):  # type: ignore[no-untyped-def]
        return error_response(404, f"no route {request.method} {request.path} on this gateway", "not_found")

    @app.errorhandler(405)
    async def bad_method(_exc: Exception):  # type: ignore[no-untyped-def]
        return error_response(405, f"method {request.method} is not allowed on {request.path}", "method_not_allowed")

    @app.errorhandler(413)
    async def too_large(_exc: Exception):  # type: ignore[no-untyped-def]
        return error_response(413, f"request body exceeds {node.config.max_body_size} bytes", "body_too_large")

    @app.errorhandler(HTTPException)
    async def other_http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        status = exc.code or 500
        return error_response(status, exc.description or exc.name, exc.name.lower().replace(" ", "_"))
