"""The gateway's Quart-Trio application: routes from every subsystem.

Each subsystem contributes a blueprint; this module only assembles them and
installs what all routes share (JSON errors, CORS, body limits).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..errors import GatewayRequestError
from ..web.errors import error_response, exception_response
from .health import blueprint as health_blueprint

if TYPE_CHECKING:
    from ..node import Node


class _RoutedAdapter:
    """A URL adapter whose ``match`` answers from the router's :class:`~ocf.gateway.router.Route`.

    The gateway's router already matched the raw target; Quart is handed the
    Werkzeug rule with the same template and the route's parameters instead
    of matching the path again (building URLs still goes to Werkzeug).
    """

    def __init__(self, inner: Any, rule: Any, args: dict[str, Any]) -> None:
        self._inner, self._rule, self._args = inner, rule, args

    def match(self, *_args: Any, return_rule: bool = False, **_kwargs: Any) -> tuple[Any, dict[str, Any]]:
        return (self._rule if return_rule else self._rule.endpoint), dict(self._args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class GatewayApp(QuartTrio):
    """QuartTrio dispatching from the route the gateway's router gave each request."""

    def create_url_adapter(self, request: Any) -> Any:
        adapter = super().create_url_adapter(request)
        route = request.scope.get("ocf.route") if request is not None else None
        if adapter is None or route is None:
            return adapter
        rules = self.extensions.get("ocf.rules")
        if rules is None:
            rules = self.extensions["ocf.rules"] = {
                (rule.rule, m): rule for rule in self.url_map.iter_rules() for m in rule.methods or ()
            }
        rule = rules.get((route.label, request.method))
        if rule is None:
            return adapter  # not a Quart route (the router answers those itself): let Werkzeug say 404/405
        args: dict[str, Any] = {}
        for name, value in route.params:
            args[name] = int(value) if f"<int:{name}>" in route.label else value
        return _RoutedAdapter(adapter, rule, args)


def create_app(node: Node) -> QuartTrio:
    app = GatewayApp("ocf.gateway")
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

    # --- gateway: JSON errors, metrics, forwarding routes ---------------------------------
    install_gateway_layer(app, node)
    # ---------------------------------------------------------------------------------------

    return app


def install_gateway_layer(app: QuartTrio, node: Node) -> None:
    """JSON errors in OpenAI's shape, ``/metrics``, and the ASGI layer serving the forwarding routes.

    The forwarding routes (``/v1/_service``, ``/v1/service``, ``/v1/p2p``) are
    raw ASGI in front of Quart (see :mod:`ocf.gateway.forward` for why), as
    are the job tracker's three hot routes (:mod:`ocf.jobs.hot`); the router,
    the access policy, CORS and request metrics wrap every route
    (:mod:`ocf.gateway.asgi`). The admin token is created here on first start.
    """
    from ..jobs.hot import HotRoutes
    from .access import Access, load_or_create_admin_token
    from .asgi import GatewayASGI
    from .cors import Cors
    from .forward import Forwarder
    from .metrics import GatewayMetrics
    from .metrics import blueprint as metrics_blueprint

    metrics = GatewayMetrics(node)
    forwarder = Forwarder(node, metrics)
    app.extensions["ocf.metrics"] = metrics
    app.extensions["ocf.forwarder"] = forwarder
    app.register_blueprint(metrics_blueprint)
    node.admin_token = load_or_create_admin_token(node.config.data_dir, node.config.admin_token)
    access = Access(node.config, node.admin_token)
    app.extensions["ocf.access"] = access
    app.asgi_app = GatewayASGI(
        app.asgi_app, forwarder, metrics, Cors(node.config.cors_origins), HotRoutes(node), access
    )  # type: ignore[method-assign]

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
