"""Who may call what: the admin token, API keys and per-client limits, applied to a :class:`Route`.

On by default: the first start writes a random admin token into the data
directory (``admin.token``, mode 0600) and every state-changing admin route
needs it, as ``X-OCF-Admin-Token: <token>`` or ``Authorization: Bearer
<token>`` (the header the CLI has always sent); the CLI reads the file, so a
local operator never types it. Requests that arrive from another node over
``/libp2p-http`` never reach admin routes, whatever token they carry.

API keys (``--api-key``, ``--api-key-file``) guard the routes that use the
network's providers (``/v1/service``, ``/v1/p2p``) and, for local clients,
``/v1/_service``; clients send them as OpenAI's ``Authorization: Bearer``.
Keys are kept as SHA-256 digests, so checking one costs one hash and a set
lookup and leaks nothing through timing about the keys that exist.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Callable

from .. import log as logfmt
from ..errors import ConfigError, Forbidden, TooManyRequests, Unauthorized
from ..httpstream.bridge import get_header
from .ratelimit import RateLimiter, retry_after
from .router import Policy, Route

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("ocf.gateway")

ADMIN_TOKEN_FILE = "admin.token"
ADMIN_TOKEN_HEADER = b"x-ocf-admin-token"
#: Request headers that carry a client's credentials: consumed by the entry gateway, never forwarded.
CLIENT_CREDENTIALS = frozenset({b"authorization", b"cookie", b"proxy-authorization", ADMIN_TOKEN_HEADER})


def load_or_create_admin_token(data_dir: Path, configured: str | None = None) -> str:
    """The configured token, else the one in ``data_dir/admin.token``, created (0600) on first start."""
    if configured:
        return configured
    path = data_dir / ADMIN_TOKEN_FILE
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise ConfigError("--data-dir", f"cannot write the admin token to {path}: {exc}") from None
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.chmod(path, 0o600)  # also when the file existed empty with looser bits
    log.info("admin token created %s", logfmt.kv(file=path))
    return token


def read_api_keys(config: Config) -> frozenset[bytes]:
    """SHA-256 digests of every configured API key."""
    keys = list(config.api_keys)
    if config.api_key_file is not None:
        try:
            text = config.api_key_file.read_text()
        except OSError as exc:
            raise ConfigError("--api-key-file", f"cannot read {config.api_key_file}: {exc}") from None
        keys += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return frozenset(_digest(k.encode()) for k in keys)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    value = get_header(headers, b"authorization")
    if value is None or value[:7].lower() != b"bearer ":
        return None
    return value[7:].strip()


class Access:
    """Applies a route's policy to one request (raises the error to answer with)."""

    def __init__(self, config: Config, admin_token: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.admin_token = admin_token.encode()
        self.api_keys = read_api_keys(config)
        self.admin_limit = RateLimiter(config.admin_rate, config.admin_burst)
        self.register_limit = RateLimiter(config.register_rate, config.register_burst)
        self.clock = clock

    def check(self, route: Route, scope: dict) -> None:
        policy = route.policy
        remote = scope.get("extensions", {}).get("ocf.remote_peer")
        if policy is Policy.LOCAL_ADMIN:
            if remote is not None:
                raise Forbidden("another node may not use this node's admin routes", code="remote_forbidden")
            self._limit(self.admin_limit, scope, "admin calls")
            self._check_admin(scope["headers"])
        elif (policy is Policy.API_KEY or (policy is Policy.REMOTE_PEER and remote is None)) and self.api_keys:
            self._check_api_key(scope["headers"])
        if route.action == "register":
            self._limit(self.register_limit, scope, "worker registrations")

    def is_admin(self, headers: list[tuple[bytes, bytes]]) -> bool:
        given = get_header(headers, ADMIN_TOKEN_HEADER)
        if given is None:
            given = bearer(headers)
        return given is not None and hmac.compare_digest(given.strip(), self.admin_token)

    def _check_admin(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self.is_admin(headers):
            return
        given = get_header(headers, ADMIN_TOKEN_HEADER) or bearer(headers)
        if given is None:
            raise Unauthorized(
                "this route needs the node's admin token (X-OCF-Admin-Token or Authorization: Bearer; it is in "
                "<data-dir>/admin.token)",
                code="admin_token_required",
                realm="ocf-admin",
            )
        raise Unauthorized("the admin token is not valid for this node", code="invalid_admin_token", realm="ocf-admin")

    def _check_api_key(self, headers: list[tuple[bytes, bytes]]) -> None:
        key = bearer(headers)
        if key is None:
            raise Unauthorized(
                "you must provide an API key (Authorization: Bearer <key>)", code="missing_api_key", realm="ocf"
            )
        if _digest(key) not in self.api_keys:
            raise Unauthorized("incorrect API key provided", code="invalid_api_key", realm="ocf")

    def _limit(self, limiter: RateLimiter, scope: dict, what: str) -> None:
        client = scope.get("client")
        key = str(client[0]) if client else "-"
        wait = limiter.take(key, self.clock())
        if wait > 0:
            raise TooManyRequests(
                f"too many {what} from this address; retry later", retry_after=retry_after(wait), code="rate_limited"
            )


def strip_credentials(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The request's headers without the client's credentials (names are lower-case, as ASGI has them)."""
    return [(k, v) for k, v in headers if k not in CLIENT_CREDENTIALS]
