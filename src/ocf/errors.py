"""Typed exceptions for every failure a caller may want to tell apart.

Every error raised on purpose by ocf derives from :class:`OcfError`, so a
caller (the CLI, the gateway, a test) can catch "anything ocf refused" in one
place and still react to the specific kind when it matters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class OcfError(Exception):
    """Base class of all errors ocf raises on purpose."""


class ConfigError(OcfError):
    """A setting has a bad value; ``setting`` names the flag (e.g. ``--tcpport``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class IdentityError(OcfError):
    """A key, peer ID or signature is malformed or does not verify."""


class MultiaddrError(OcfError):
    """A multiaddr string or binary encoding is malformed or unsupported."""


class StoreError(OcfError):
    """The LMDB store cannot be used."""


class DataDirLocked(StoreError):
    """Another process (or node in this process) already holds the data directory."""


class StoreCorrupt(StoreError):
    """The store exists but cannot be read; start again with ``--cleanslate``."""


# --- transport -----------------------------------------------------------------------


class TransportError(OcfError):
    """A peer connection or stream failed."""


class ProtocolError(TransportError):
    """The peer broke a wire protocol (malformed multistream, Noise or yamux bytes)."""


class HandshakeError(TransportError):
    """The security handshake failed (bad message, bad signature, timeout)."""


class PeerIdMismatch(HandshakeError):
    """The peer authenticated as a different peer ID than the one dialed."""


class PrivateNetworkRefused(HandshakeError):
    """The peer does not hold this private network's key (or runs outside any private network)."""


class ProtocolNotSupported(TransportError):
    """The peer supports none of the protocols we proposed."""


class PeerUnreachable(TransportError):
    """No connection to the peer could be made (no address, refused, timed out)."""


class StreamReset(TransportError):
    """The stream was reset (by the peer, locally, or because its connection closed)."""


class ResourceLimitExceeded(TransportError):
    """A transport budget (connections, streams, buffered bytes, handshakes) refused a reservation."""

    def __init__(self, message: str, *, resource: str = "") -> None:
        super().__init__(message)
        self.resource = resource


def find_in_group(
    exc: BaseException, types: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first exception of ``types`` in ``exc`` or, recursively, inside exception groups.

    Trio nurseries wrap errors in ``ExceptionGroup``; callers that report a
    single clear error (the CLI, startup code) use this to find it.
    """
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_in_group(inner, types)
            if found is not None:
                return found
    return None


def single_leaf(exc: BaseException) -> BaseException:
    """If ``exc`` is a (nested) group holding exactly one exception, that exception; else ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@contextlib.contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise a lone exception out of the exception group a Trio nursery wraps it in.

    Callers of our context managers want ``except UpstreamError``, not
    ``except*``; groups with several real errors pass through unchanged.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaf = single_leaf(group)
        if leaf is group:
            raise
        raise leaf from leaf.__cause__


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions in ``exc`` with every (nested) exception group flattened away."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def transport_failure(exc: BaseException) -> TransportError | None:
    """The :class:`TransportError` that ``exc`` amounts to, or None.

    ``exc`` itself if it is one; for an exception group (a nursery's wrapping)
    whose every leaf is a transport failure, the first of them. A group that
    also holds a cancellation, an interrupt or a bug is not a transport
    failure: it must travel on unchanged.
    """
    found = leaves(exc)
    if found and all(isinstance(leaf, TransportError) for leaf in found):
        first = found[0]
        assert isinstance(first, TransportError)
        return first
    return None


@contextlib.contextmanager
def transport_errors_unwrapped() -> Iterator[None]:
    """Let a nursery's group of transport failures out as the plain :class:`TransportError`.

    Every ``except TransportError`` in ocf relies on this at the places where
    transport code runs nurseries (dials, WebSocket connections), so a
    failure raised inside a nursery reaches callers as the typed error they
    catch, not as an ``ExceptionGroup`` that slips past them.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        failure = transport_failure(group)
        if failure is None:
            raise
        raise failure from failure.__cause__


# --- gateway and services --------------------------------------------------------------


class GatewayRequestError(OcfError):
    """A request the gateway refuses or cannot complete.

    Carries the HTTP answer (status, OpenAI-style error ``type`` and
    ``code``, extra headers) so the place that detects the problem decides
    what the client is told, and the ASGI layer only renders it.
    """

    status = 500
    code = "internal_error"
    type = "server_error"

    def __init__(self, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class BadRequest(GatewayRequestError):
    """The request is malformed (bad peer ID, unreadable body...)."""

    status = 400
    code = "bad_request"
    type = "invalid_request_error"


class NoRoutableIdentity(BadRequest):
    """The service routes by identity (e.g. ``model``) but the request names none."""

    code = "no_routable_identity"


class Unauthorized(GatewayRequestError):
    """The route needs a credential (admin token, API key) that is missing or wrong.

    Always carries ``WWW-Authenticate`` (a 401 without it is not HTTP).
    """

    status = 401
    code = "unauthorized"
    type = "invalid_request_error"

    def __init__(self, message: str, *, code: str | None = None, realm: str = "ocf") -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})


class Forbidden(GatewayRequestError):
    """The route may not be used this way (e.g. a remote peer editing our entry)."""

    status = 403
    code = "forbidden"
    type = "permission_error"


class NotFound(GatewayRequestError):
    """Unknown service, model or peer; the message lists what exists."""

    status = 404
    code = "not_found"
    type = "invalid_request_error"


class MethodNotAllowed(GatewayRequestError):
    """The route exists but not for this method (``headers`` carries ``Allow``)."""

    status = 405
    code = "method_not_allowed"
    type = "invalid_request_error"


class RequestTimeout(GatewayRequestError):
    """The client did not send its request body within ``request_timeout``."""

    status = 408
    code = "body_timeout"
    type = "invalid_request_error"


class UnsupportedMediaType(GatewayRequestError):
    """A JSON route got a body of another type (e.g. a browser form's text/plain)."""

    status = 415
    code = "unsupported_media_type"
    type = "invalid_request_error"


class TooManyRequests(GatewayRequestError):
    """A per-client rate limit was hit; ``Retry-After`` says when to come back."""

    status = 429
    code = "rate_limited"
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: str, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": retry_after})


class Conflict(GatewayRequestError):
    """The request contradicts current state (a late worker completing a job leased to another)."""

    status = 409
    code = "conflict"
    type = "invalid_request_error"


class PayloadTooLarge(GatewayRequestError):
    """The request body exceeds ``max_body_size``."""

    status = 413
    code = "body_too_large"
    type = "invalid_request_error"


class ProviderFailed(GatewayRequestError):
    """The chosen provider (peer or local backend) failed before answering."""

    status = 502
    code = "provider_failed"


class NoProviderAvailable(GatewayRequestError):
    """Providers exist but none is connected, healthy or has capacity right now."""

    status = 503
    code = "no_provider_available"

    def __init__(self, message: str, *, retry_after: int = 5, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class ServiceUnavailable(GatewayRequestError):
    """This node cannot serve the request now (its tracker's database is down); ``Retry-After`` says when to retry."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 2, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class ForwardTimeout(GatewayRequestError):
    """The provider did not answer within ``request_timeout``."""

    status = 504
    code = "timeout"


class LoopDetected(GatewayRequestError):
    """A request bounced between gateways more often than any route needs."""

    status = 508
    code = "loop_detected"


# --- job tracker (domain errors: the HTTP edge maps them to a status, see ocf.jobs.edge) -------


class JobsError(OcfError):
    """The job tracker refuses an operation.

    Domain code raises these, never an HTTP status: the tracker is driven by
    HTTP routes, by PostgreSQL or LMDB stores and by tests alike, and only the
    edge (:mod:`ocf.jobs.edge`) decides what a client is told. ``kind`` is the
    category the edge maps (one table); ``code`` is the stable machine-readable
    reason clients see (``unknown_job``, ``lease_lost``...).
    """

    kind = "invalid"
    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidJobRequest(JobsError):
    """An argument is malformed or out of range (a bad job id, limit, stage or project definition)."""


class ProjectNotFound(JobsError):
    """No project of that name (the message does not list the others)."""

    kind = "not_found"
    code = "unknown_project"


class JobNotFound(JobsError):
    """The project has no job with that id."""

    kind = "not_found"
    code = "unknown_job"


class WorkerNotFound(JobsError):
    """The worker token (or name) is unknown, or the worker timed out and must register again."""

    kind = "not_found"
    code = "unknown_worker"


class JobsConflict(JobsError):
    """The operation contradicts the tracker's current state."""

    kind = "conflict"
    code = "conflict"


class ProjectExists(JobsConflict):
    """A project of that name exists with a different definition."""

    code = "project_exists"


class LeaseNotHeld(JobsConflict):
    """The worker no longer holds the job's lease (expired, completed by another, rolled back)."""

    code = "lease_lost"


class JobsPayloadTooLarge(JobsError):
    """An input or output exceeds the tracker's payload limit (or a fan-out has too many elements)."""

    kind = "too_large"
    code = "payload_too_large"


class StoreUnavailable(JobsError):
    """The tracker's database cannot be reached (down, restarting): the edge answers 503 with ``Retry-After``.

    Never a 404 or a 500: the worker's token and jobs are still valid, and the
    same request succeeds once the database is back.
    """

    kind = "unavailable"
    code = "store_unavailable"

    def __init__(self, message: str, *, retry_after: int = 2, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class BridgeError(OcfError):
    """Malformed or unexpected HTTP/1.1 on a forwarded stream or backend connection."""


class RequestRefused(BridgeError):
    """A request the HTTP engine answers itself, before any application sees it.

    ``status`` and ``code`` are what the client is told; plain
    :class:`BridgeError` from a client's bytes means 400.
    """

    status = 400
    code = "bad_request"


class MethodNotImplemented(RequestRefused):
    """A method token this server does not serve (methods are case-sensitive: ``get`` is not GET)."""

    status = 501
    code = "method_not_implemented"


class VersionNotSupported(RequestRefused):
    """A request line naming an HTTP version other than 1.0 or 1.1."""

    status = 505
    code = "http_version_not_supported"


class HeadTimeout(RequestRefused):
    """The client did not finish its request head within the head timeout."""

    status = 408
    code = "head_timeout"


class BodyTimeout(RequestRefused):
    """The client's request body stalled (or trickled below the minimum rate) past its deadline."""

    status = 408
    code = "body_timeout"


class UpstreamError(BridgeError):
    """An exchange with an upstream (peer stream or backend connection) broke off.

    ``response_started`` tells the caller whether any of the response was
    seen: before that, the request can be retried elsewhere if its body can
    be replayed; after it, the client has to be told the answer is cut short.
    """

    def __init__(self, message: str, *, response_started: bool) -> None:
        super().__init__(message)
        self.response_started = response_started


class ServiceRegistrationError(OcfError):
    """A service cannot be registered (bad name, duplicate internal service)."""


class ValidationError(OcfError):
    """Input (an HTTP body, a node table record from a peer) is malformed or not allowed."""


class RelayRefused(PeerUnreachable):
    """A circuit relay refused a reservation or a relayed connection, with the relay's status as the reason.

    A subclass of :class:`PeerUnreachable` so that dialing code treats it as
    one more unreachable address; the gateway tells it apart to answer 503
    with the relay's reason (the peer is there, the relay's limits are not).
    """

    def __init__(self, message: str, *, status: str = "") -> None:
        super().__init__(message)
        self.status = status
