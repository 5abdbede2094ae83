"""What web pages may do with this gateway: CORS and the browser write guard.

A gateway usually runs next to a browser (the operator's), so a page from
anywhere must not be able to change the node. By default:

* reads (GET/HEAD) of public routes are open to any origin (``*``, no
  credentials): the dashboard's data and the model list are no secret;
* anything else needs the page's origin in ``--cors-origins``: the preflight
  only allows listed origins, and a write that arrives with a foreign
  ``Origin`` (a form post or a "simple" fetch, which skip the preflight) is
  refused with 403 before it runs. The gateway's own pages (same origin as
  the ``Host`` the browser sent) always may.
"""

from __future__ import annotations

from ..errors import Forbidden
from .router import FORWARDING, Policy, Route

EXPOSE = b"X-Computing-Node, Retry-After, X-OCF-Error-Code"
#: Request headers a listed origin's page may send (a preflight asking for others is refused).
ALLOWED_HEADERS = (
    b"authorization",
    b"content-type",
    b"idempotency-key",
    b"x-ocf-admin-token",
    b"x-ocf-identity-group",
    b"x-ocf-worker-token",
    b"openai-organization",
    b"openai-project",
    b"x-stainless-lang",
)
READS = frozenset({"GET", "HEAD"})


class Cors:
    """``origins``: comma-separated allowlist (``*`` for any) for everything that is not a public read."""

    def __init__(self, origins: str | None) -> None:
        items = [o.strip().rstrip("/") for o in (origins or "").split(",") if o.strip()]
        self.any = "*" in items
        self.allowed = {o.encode() for o in items if o != "*"}

    def listed(self, origin: bytes | None) -> bool:
        return origin is not None and (self.any or origin in self.allowed)

    @staticmethod
    def same_origin(origin: bytes, host: bytes | None) -> bool:
        return host is not None and origin in (b"http://" + host, b"https://" + host)

    @staticmethod
    def open_read(route: Route, method: str) -> bool:
        return method in READS and (route.policy is Policy.PUBLIC or route.family in FORWARDING)

    def headers(self, route: Route, method: str, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        """Headers for an actual response (none without an ``Origin``)."""
        if origin is None:
            return []
        if self.listed(origin):
            value = b"*" if self.any else origin
        elif self.open_read(route, method):
            value = b"*"
        else:
            return []
        out = [(b"access-control-allow-origin", value), (b"access-control-expose-headers", EXPOSE)]
        if value != b"*":
            out.append((b"vary", b"Origin"))
        return out

    def check_write(self, method: str, origin: bytes | None, host: bytes | None) -> None:
        """Refuse a state-changing request sent by a page of a foreign origin."""
        if origin is None or method in READS or method == "OPTIONS":
            return
        if self.listed(origin) or self.same_origin(origin, host):
            return
        raise Forbidden(
            f"pages from {origin.decode('latin-1')} may not call this gateway (see --cors-origins)",
            code="origin_not_allowed",
        )

    def preflight(
        self, route: Route, origin: bytes | None, method: bytes | None, requested: bytes | None
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """``(status, headers)`` for a preflight: 204 with what is allowed, or 403 with no CORS headers."""
        want = (method or b"").decode("latin-1").upper()
        names = [h.strip().lower() for h in (requested or b"").split(b",") if h.strip()]
        if origin is None or want not in route.methods:
            return 403, []
        if self.listed(origin):
            allow_origin = b"*" if self.any else origin
            if any(n not in ALLOWED_HEADERS for n in names):
                return 403, []
            methods = b", ".join(sorted(m.encode() for m in route.methods))
        elif (
            want in READS
            and self.open_read(route, want)
            and all(n in (b"authorization", b"x-ocf-identity-group") for n in names)
        ):
            allow_origin, methods = b"*", b"GET, HEAD, OPTIONS"
        else:
            return 403, []
        headers = [
            (b"access-control-allow-origin", allow_origin),
            (b"access-control-allow-methods", methods),
            (b"access-control-max-age", b"600"),
        ]
        if names:
            headers.append((b"access-control-allow-headers", b", ".join(names)))
        if allow_origin != b"*":
            headers.append((b"vary", b"Origin"))
        return 204, headers
