"""The gateway's one router: the raw request target in, a typed :class:`Route` out.

Every request is classified here exactly once, on the raw target as it came
off the wire (never on the percent-decoded ``path``), and everything after
dispatches from the :class:`Route`: the ASGI layer's policy checks, CORS and
415, the forwarder, the tracker's hot routes and Quart (which receives the
route's canonical path, so its URL matching cannot disagree with ours). Two
routers reading two forms of the path is how a remote peer once reached this
node's admin routes (a ``//`` that one router kept and the other collapsed)
and how ``%5Fservice`` named a different service than ``_service``.

So a target that is not in canonical form is refused (400) rather than
normalised: empty segments (``//``), dot segments (``.``, ``..``, also
percent-encoded), backslashes, and percent-encoding inside the routing
prefix (the fixed segments and the service or peer name). Only one trailing
slash is tolerated, and it names the same route. Pure and sans-IO: the
tests drive it with vectors and hypothesis.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from urllib.parse import unquote_to_bytes

import attrs

from ..errors import BadRequest


class Policy(enum.Enum):
    """Who may call a route."""

    PUBLIC = "public"  # anyone, remote peers included (reads)
    LOCAL_ADMIN = "local-admin"  # the admin token; never a remote peer
    REMOTE_PEER = (
        "remote-peer-allowed"  # other nodes (their entry gateway checked the client); local clients need an API key
    )
    WORKER = "worker-token"  # the tracker checks the worker's own token
    API_KEY = "api-key"  # an API key when the node has any (--api-key)


# Families (what serves the route).
HEALTH, METRICS, NODETABLE, DASHBOARD = "health", "metrics", "nodetable", "dashboard"
JOBS, JOBS_HOT, JOBS_COMPAT = "jobs", "jobs-hot", "jobs-compat"
FORWARD_SERVICE, OWN_SERVICE, P2P = "forward-service", "own-service", "p2p"
NOT_FOUND, METHOD_NOT_ALLOWED = "not-found", "method-not-allowed"
#: Families served by the forwarder.
FORWARDING = frozenset({FORWARD_SERVICE, OWN_SERVICE, P2P})
#: Body kinds a route accepts (for 415): JSON only, or JSON and JSON lines.
JSON, JSON_OR_LINES = "json", "json+lines"


@attrs.frozen
class Route:
    """One request's route: what serves it, who may call it, how metrics name it."""

    family: str
    label: str  # metrics label: the route template, never the raw path
    policy: Policy = Policy.PUBLIC
    methods: frozenset[str] = frozenset()  # the methods this path allows (Allow, 405, preflight)
    path: str = ""  # canonical, decoded path for Quart (local routes)
    service: str = ""
    peer: str = ""
    rest: bytes = b""  # raw remainder after the routing prefix, without its leading slash (forwarding)
    params: tuple[tuple[str, str], ...] = ()  # decoded path parameters, in order
    body: str = ""  # the request body kind the route accepts ("" = not checked)
    action: str = ""  # what the call does where limits care (e.g. "register")

    def param(self, name: str) -> str:
        for key, value in self.params:
            if key == name:
                return value
        raise KeyError(name)


class NonCanonicalTarget(BadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(message, code="non_canonical_target")


@attrs.frozen
class _Rule:
    method: str
    template: tuple[str, ...]  # "<name>" segments are parameters
    family: str
    policy: Policy
    body: str = ""
    action: str = ""

    @property
    def label(self) -> str:
        return "/" + "/".join(self.template)


def _rules() -> tuple[_Rule, ...]:
    G, P = Policy.PUBLIC, Policy.LOCAL_ADMIN
    W = Policy.WORKER
    out: list[_Rule] = []

    def add(method: str, template: str, family: str, policy: Policy, body: str = "", action: str = "") -> None:
        out.append(_Rule(method, tuple(template.strip("/").split("/")), family, policy, body, action))

    add("GET", "/v1/health", HEALTH, G)
    add("GET", "/metrics", METRICS, G)
    for name in ("table", "peers", "peers_status", "bootstraps", "stats"):
        add("GET", f"/v1/dnt/{name}", NODETABLE, G)
    add("POST", "/v1/dnt/_node", NODETABLE, P, JSON, "admin")
    add("DELETE", "/v1/dnt/_node", NODETABLE, P, JSON, "admin")
    add("GET", "/dashboard", DASHBOARD, G)
    add("GET", "/dashboard/static/<name>", DASHBOARD, G)
    add("GET", "/v1/jobs", JOBS, G)
    add("PUT", "/v1/jobs/<project>", JOBS, P, JSON, "admin")
    add("GET", "/v1/jobs/<project>", JOBS, G)
    add("POST", "/v1/jobs/<project>/jobs", JOBS, P, JSON_OR_LINES, "admin")
    add("GET", "/v1/jobs/<project>/jobs/<int:job_id>", JOBS, G)
    add("POST", "/v1/jobs/<project>/workers", JOBS, W, JSON, "register")
    add("GET", "/v1/jobs/<project>/workers", JOBS, G)
    add("GET", "/v1/jobs/<project>/workers/<name>", JOBS, G)
    for hot in ("claim", "complete", "heartbeat"):
        add("POST", f"/v1/jobs/<project>/{hot}", JOBS_HOT, W, JSON, hot)
    for verb in ("complete", "fail", "flag"):
        add("POST", f"/v1/jobs/<project>/jobs/<int:job_id>/{verb}", JOBS, W, JSON)
    add("POST", "/v1/jobs/<project>/bye", JOBS, W, JSON)
    for name in ("stats", "leaderboard", "results", "failures", "events"):
        add("GET", f"/v1/jobs/<project>/{name}", JOBS, G)
    # The original tracker's worker API (distcompute-client).
    add("GET", "/v1/jobs/<project>/api/new", JOBS_COMPAT, W, action="register")
    for name in ("validateWorker", "newJob", "updateProgress", "completeJob", "flagInvalidData", "bye"):
        add("POST", f"/v1/jobs/<project>/api/{name}", JOBS_COMPAT, W, JSON)
    add("GET", "/v1/jobs/<project>/api/jobCount", JOBS_COMPAT, G)
    add("GET", "/v1/jobs/<project>/worker/<stage>/<name>", JOBS_COMPAT, G)
    return tuple(out)


RULES = _rules()
_BY_LENGTH: dict[int, tuple[_Rule, ...]] = {
    n: tuple(r for r in RULES if len(r.template) == n) for n in {len(r.template) for r in RULES}
}
_FORWARD_PREFIXES = {b"service": FORWARD_SERVICE, b"_service": OWN_SERVICE, b"p2p": P2P}
_FORWARD_LABELS = {
    FORWARD_SERVICE: "/v1/service/<service>/<path>",
    OWN_SERVICE: "/v1/_service/<service>/<path>",
    P2P: "/v1/p2p/<peer>/<path>",
}
_FORWARD_POLICY = {FORWARD_SERVICE: Policy.API_KEY, OWN_SERVICE: Policy.REMOTE_PEER, P2P: Policy.API_KEY}
_SERVICE_NAME = re.compile(rb"[A-Za-z0-9_-]{1,64}\Z")
_PEER_ID = re.compile(rb"[A-Za-z0-9]{1,128}\Z")
#: Characters allowed in a prefix segment as sent (no percent-encoding, nothing to normalise).
_PLAIN_SEGMENT = re.compile(rb"[A-Za-z0-9_.~!$&'()*+,;=:@-]+\Z")
#: A percent-escape of a character that never needs one (RFC 3986 unreserved): a second spelling.
_UNRESERVED_ESCAPE = re.compile(rb"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[DEde]|5[Ff]|7[Ee])")
_INT = re.compile(r"[0-9]{1,19}\Z")
ALL_FORWARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _segments(raw: bytes) -> list[bytes]:
    """The raw target's segments, refusing every non-canonical spelling (see the module docstring)."""
    if not raw.startswith(b"/"):
        raise NonCanonicalTarget("the request target must be an absolute path")
    if b"\\" in raw:
        raise NonCanonicalTarget("backslashes are not allowed in the request target")
    body = raw[1:]
    if body.endswith(b"/"):
        body = body[:-1]  # one trailing slash names the same route
    if not body:
        return []
    parts = body.split(b"/")
    for part in parts:
        if not part:
            raise NonCanonicalTarget("empty path segments ('//') are not allowed")
        decoded = unquote_to_bytes(part) if b"%" in part else part
        if decoded in (b".", b"..") or b"\\" in decoded:
            raise NonCanonicalTarget("dot segments and backslashes are not allowed in the request target")
    return parts


def _prefix_segment(part: bytes) -> None:
    if not _PLAIN_SEGMENT.match(part):
        raise NonCanonicalTarget("the routing prefix must be spelled plainly (no percent-encoding)")


CACHE_SIZE = 2048


class Router:
    """:func:`classify` with a memory of recent answers, one per gateway.

    A worker fleet or an LLM client repeats a few targets, and classifying
    one costs tens of microseconds; routes are frozen, so sharing them is
    safe. The memory is cleared when full, so odd targets cannot grow it.
    """

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._cache: dict[tuple[str, bytes], Route] = {}

    def classify(self, method: str, raw_path: bytes) -> Route:
        key = (method, raw_path)
        route = self._cache.get(key)
        if route is None:
            route = classify(method, raw_path)
            if len(self._cache) >= self.size:
                self._cache.clear()
            self._cache[key] = route
        return route


def classify(method: str, raw_path: bytes) -> Route:
    """The :class:`Route` of ``method raw_path``; raises :class:`NonCanonicalTarget` (400)."""
    parts = _segments(raw_path)
    if len(parts) >= 3 and parts[0] == b"v1" and parts[1] in _FORWARD_PREFIXES:
        return _forwarding(parts, raw_path)
    for part in parts[:2]:
        _prefix_segment(part)
    return _local(method, parts)


def _forwarding(parts: list[bytes], raw_path: bytes) -> Route:
    family = _FORWARD_PREFIXES[parts[1]]
    name = parts[2]
    _prefix_segment(name)
    if not (_PEER_ID if family == P2P else _SERVICE_NAME).match(name):
        what = "peer ID" if family == P2P else "service name"
        raise BadRequest(
            f"'{name.decode('latin-1')}' is not a valid {what}",
            code="bad_peer_id" if family == P2P else "bad_service_name",
        )
    # The remainder keeps its raw spelling (a trailing slash included): it is the provider's target.
    head = b"/v1/" + parts[1] + b"/" + name
    rest = raw_path[len(head) + 1 :]
    text = name.decode("ascii")
    return Route(
        family,
        _FORWARD_LABELS[family],
        _FORWARD_POLICY[family],
        ALL_FORWARD_METHODS,
        service="" if family == P2P else text,
        peer=text if family == P2P else "",
        rest=rest,
    )


def _local(method: str, parts: list[bytes]) -> Route:
    decoded: list[str] = []
    for part in parts:
        if b"%" in part and _UNRESERVED_ESCAPE.search(part):
            raise NonCanonicalTarget("unreserved characters may not be percent-encoded in the request target")
        text = unquote_to_bytes(part).decode("utf-8", "replace") if b"%" in part else part.decode("latin-1")
        if "/" in text or any(ord(c) < 0x20 or c == "\x7f" for c in text):
            raise NonCanonicalTarget("path segments may not encode '/' or control characters")
        decoded.append(text)
    raw = [part.decode("latin-1") for part in parts]
    matches = [
        (rule, params)
        for rule in _BY_LENGTH.get(len(decoded), ())
        if (params := _match(rule.template, decoded, raw)) is not None
    ]
    if not matches:
        return Route(NOT_FOUND, "unmatched")
    methods = frozenset(rule.method for rule, _ in matches) | {"OPTIONS"}
    if "GET" in methods:
        methods |= {"HEAD"}
    path = "/" + "/".join(decoded)
    for rule, params in matches:
        if rule.method == method or (method == "HEAD" and rule.method == "GET"):
            return Route(
                rule.family,
                rule.label,
                rule.policy,
                methods,
                path=path,
                params=params,
                body=rule.body,
                action=rule.action,
            )
    # OPTIONS (answered by the ASGI layer) and wrong methods (405): nothing runs, so nothing to guard.
    rule = matches[0][0]
    family = rule.family if method == "OPTIONS" else METHOD_NOT_ALLOWED
    return Route(family, rule.label, Policy.PUBLIC, methods, path=path, params=matches[0][1])


def _match(template: tuple[str, ...], decoded: list[str], raw: list[str]) -> tuple[tuple[str, str], ...] | None:
    """Parameters may be percent-encoded; fixed segments must be spelled as they are (``%5Fnode`` is not ``_node``)."""
    if len(template) != len(decoded):
        return None
    params = []
    for want, got, spelled in zip(template, decoded, raw, strict=True):
        if want.startswith("<"):
            name = want[1:-1]
            if name.startswith("int:"):
                if not _INT.match(got):
                    return None
                name = name[4:]
            params.append((name, got))
        elif want != spelled:
            return None
    return tuple(params)


def labels() -> Iterable[str]:
    """Every metrics label the router can give (the set /metrics can ever show)."""
    yield from sorted({r.label for r in RULES} | set(_FORWARD_LABELS.values()) | {"unmatched", "invalid", "preflight"})
