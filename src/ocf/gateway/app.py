"""The gateway's Quart-Trio application: routes from every subsystem.

Each subsystem contributes its routes as an :class:`~ocf.ports.HttpMount`
(blueprints, raw-ASGI routes, metrics collectors) that the node hands over;
this module only assembles them and installs what all routes share (JSON
errors, CORS, body limits, the router and the access policy). It imports no
subsystem: what it serves is decided by the composition root (:mod:`ocf.node`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast
from collections.abc import Callable, Mapping, Sequence

import attrs

from quart import request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..errors import GatewayRequestError
from ..web.errors import error_response, exception_response
from .health import HEALTH_EXTENSION
from .health import blueprint as health_blueprint

if TYPE_CHECKING:
    from ..config import Config
    from ..identity import PeerId
    from ..ports import HttpMount, LoadBoard, LocalServices, PeerDialer, ProviderDirectory, RawRoute
    from ..web.asgi import ASGIApp


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


@attrs.frozen
class GatewayParts:
    """What the gateway uses from the rest of the node; the node builds it.

    ``host`` None means no transport (no ``/v1/p2p``, nothing served to
    peers); ``table`` None, no node table (only this node's own services are
    routed); ``health`` gives ``/v1/health`` its fields.
    """

    config: Config
    peer_id: PeerId
    health: Callable[[], Mapping[str, object]]
    host: PeerDialer | None = None
    table: ProviderDirectory | None = None
    services: LocalServices | None = None
    mounts: Sequence[HttpMount] = ()
    load: LoadBoard | None = None  # membership: our load published, peers' load read for routing


def create_app(parts: GatewayParts) -> QuartTrio:
    config = parts.config
    app = GatewayApp("ocf.gateway")
    # Werkzeug would answer "//" in a path with a 308 whose absolute Location names the
    # client's Host header (an open redirect to wherever Host points); no redirects at all.
    # Set before any rule is added: each rule takes the map's value when it is bound.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_size
    app.config["BODY_TIMEOUT"] = config.request_timeout
    app.config["RESPONSE_TIMEOUT"] = None  # streamed responses may run long; forwards enforce their own timeout
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.extensions[HEALTH_EXTENSION] = parts.health
    app.register_blueprint(health_blueprint)
    raw: dict[str, RawRoute] = {}
    for mount in parts.mounts:
        app.extensions.update(mount.extensions)
        for blueprint in mount.blueprints:
            app.register_blueprint(blueprint)
        raw.update(mount.raw)

    # --- gateway: JSON errors, metrics, forwarding routes ---------------------------------
    install_gateway_layer(app, parts, raw)
    # ---------------------------------------------------------------------------------------

    return app


def install_gateway_layer(app: QuartTrio, parts: GatewayParts, raw: Mapping[str, RawRoute]) -> None:
    """JSON errors in OpenAI's shape, ``/metrics``, and the ASGI layer serving the forwarding routes.

    The forwarding routes (``/v1/_service``, ``/v1/service``, ``/v1/p2p``) are
    raw ASGI in front of Quart (see :mod:`ocf.gateway.forward` for why), as
    are the mounts' ``raw`` routes (the tracker's hot routes); the router,
    the access policy, CORS and request metrics wrap every route
    (:mod:`ocf.gateway.asgi`). The admin token is created here on first start.
    """
    from .access import Access, load_or_create_admin_token
    from .asgi import GatewayASGI
    from .cors import Cors
    from .forward import Forwarder
    from .metrics import GatewayMetrics
    from .metrics import blueprint as metrics_blueprint
    from .providers import Providers

    config = parts.config
    metrics = GatewayMetrics()
    for mount in parts.mounts:
        metrics.add_collectors(mount.collectors)
    providers = Providers(config, parts.peer_id, parts.host, parts.table, parts.services)
    forwarder = Forwarder(config, parts.peer_id, providers, parts.services, metrics)
    forwarder.use_load_board(parts.load)
    app.extensions["ocf.metrics"] = metrics
    app.extensions["ocf.forwarder"] = forwarder
    app.register_blueprint(metrics_blueprint)
    admin_token = load_or_create_admin_token(config.data_dir, config.admin_token)
    app.extensions["ocf.admin_token"] = admin_token
    access = Access(config, admin_token)
    app.extensions["ocf.access"] = access
    # Quart types ASGI messages as TypedDicts, our layer as plain dicts: the same objects at run time.
    inner = cast("ASGIApp", app.asgi_app)
    app.asgi_app = GatewayASGI(  # type: ignore[method-assign,assignment]
        inner, forwarder, metrics, Cors(config.cors_origins), raw, access
    )

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
        return error_response(413, f"request body exceeds {config.max_body_size} bytes", "body_too_large")

    @app.errorhandler(HTTPException)
    async def other_http_error(exc: HTTPException):  # type: ignore[no-untyped-def]
        status = exc.code or 500
        return error_response(status, exc.description or exc.name, exc.name.lower().replace(" ", "_"))
