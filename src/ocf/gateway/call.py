"""One forwarding request as it arrived, and the small readings every route makes of it.

Kept apart from :mod:`ocf.gateway.forward` (the orchestration) so that what
a request *is* (its scope, its hop count, its path under a prefix, its body
read as JSON for routing) reads in one place.
"""

from __future__ import annotations

from typing import Any

import attrs

from .. import strictjson
from ..errors import BadRequest
from ..httpstream.bridge import get_header
from ..web.asgi import Receive, Responder
from .exchange import HOPS_HEADER


@attrs.define(slots=True, eq=False)
class Call:
    """One forwarding request as it arrived: what every step of it needs."""

    scope: dict
    receive: Receive
    responder: Responder
    hops: int  # gateways it already crossed

    def query(self) -> bytes:
        query = self.scope.get("query_string")
        return b"?" + query if query else b""


def join(prefix: str, rest: bytes) -> bytes:
    """``/v1/jobs`` + ``b"x/y"`` -> ``b"/v1/jobs/x/y"``; an empty rest names the prefix itself."""
    return prefix.encode() + (b"/" + rest if rest else b"")


def hops_of(scope: dict) -> int:
    """Gateways the request already crossed (its hop header; a missing or garbled one counts as none)."""
    value = get_header(scope["headers"], HOPS_HEADER)
    try:
        return max(0, int(value)) if value is not None else 0
    except ValueError:
        return 0


def parse_json(data: bytes) -> Any:
    """The body as JSON, for routing by the model it names; 400 if it is not JSON."""
    if not data:
        return None
    try:
        return strictjson.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(
            f"the request body is not valid JSON ({exc}), so it names no model;"
            " send JSON or an X-OCF-Identity-Group: key=value header",
            code="no_routable_identity",
        ) from None
