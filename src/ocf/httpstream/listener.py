"""Serve an ASGI app on TCP with our own HTTP/1.1 connection handler.

The gateway's port used to be served by Hypercorn. With a trivial ASGI app
Hypercorn's Trio worker spent more than twice the CPU per keep-alive request
of :func:`~ocf.httpstream.server.serve_stream`, which already serves every
``/libp2p-http`` stream from other peers, and answered correspondingly fewer
requests per second (``python benchmarks/gateway.py`` shows the effect on the
real routes). One HTTP engine for both doors also means one set of
behaviours: malformed requests get the same JSON errors, a client that
leaves cancels its request the same way.

What Hypercorn did that we keep:

- the ASGI lifespan protocol (startup before the first connection is
  accepted, shutdown after the last one ends), which Quart uses;
- graceful shutdown: stop accepting, close idle keep-alive connections at
  once, let requests in flight finish for ``graceful_timeout`` seconds, then
  cancel them (long-lived event streams must not hold up shutdown);
- keep-alive idle timeout and request head size limit (per connection, in
  :func:`serve_stream`), ``client``/``server`` in the scope, TCP_NODELAY
  (Trio sets it on accepted sockets).

What it adds for hostile clients: a connection cap with a reserve for health
checks (:mod:`ocf.httpstream.admission`), deadlines for heads, bodies and
writes (:mod:`ocf.httpstream.deadlines`), and an accept loop of its own:
when the process runs out of descriptors (EMFILE, ENFILE) it closes an idle
connection, backs off and logs once per interval with a count, where
``trio.serve_listeners`` logged a traceback every 0.1 s.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
from typing import Any
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from .. import log as logfmt
from ..directsocket import DirectSocketStream
from ..errors import OcfError
from .admission import (
    NORMAL,
    REFUSE,
    RESERVE,
    ConnectionGate,
    ConnectionLimits,
    Draining,
    ServerStats,
    fit_descriptor_limit,
)
from .bridge import DEFAULT_MAX_HEADER_SIZE
from .deadlines import Timeouts
from .server import ASGIApp, serve_stream

log = logging.getLogger("ocf.httpstream")

LIFESPAN_STARTUP_TIMEOUT = 60.0
LIFESPAN_SHUTDOWN_TIMEOUT = 10.0

#: accept() errors that mean "out of descriptors or memory for now": back off, do not die.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF_MIN = 0.01
ACCEPT_BACKOFF_MAX = 1.0
#: Seconds between two log lines about refused connections or failing accepts (each line has a count).
REFUSAL_LOG_INTERVAL = 10.0


class LifespanError(OcfError):
    """The application refused to start (``lifespan.startup.failed``)."""


async def serve_http(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
    idle_timeout: float = 75.0,
    graceful_timeout: float = 1.0,
    timeouts: Timeouts | None = None,
    limits: ConnectionLimits | None = None,
    stats: ServerStats | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until ``shutdown_trigger()`` returns.

    ``task_status.started`` gets the bound addresses as URLs
    (``["http://127.0.0.1:8092"]``), so port 0 reports the real port.
    Binding errors (``OSError``) propagate before anything is started.
    ``limits`` caps the connections of all bound addresses together;
    ``stats`` is filled with what the connections met (for ``/metrics``).
    """
    limits = limits or ConnectionLimits()
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    urls = [_url(listener.socket.getsockname()) for listener in listeners]
    cap = fit_descriptor_limit(limits.max_connections, limits.reserve, log)
    stats = stats if stats is not None else ServerStats()
    stats.gate = ConnectionGate(cap, limits.reserve)
    server = _Server(
        app,
        Draining(stats.refusals),
        stats.gate,
        limits.reserved_paths,
        max_header_size,
        idle_timeout,
        timeouts or Timeouts(),
    )
    try:
        async with _lifespan(app), trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                # Connections run in their own nursery, which outlives accepting:
                # at shutdown we stop accepting first, then drain them.
                for listener in listeners:
                    accepting.start_soon(server.accept_loop, listener, connections)
                task_status.started(urls)
                await shutdown_trigger()
                accepting.cancel_scope.cancel()
            log.debug("http server stopped accepting; draining open connections")
            server.drain()
            connections.cancel_scope.deadline = trio.current_time() + graceful_timeout
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


class _Server:
    """One server's accept loops and connections: the cap, the reserve, the refusal logs."""

    def __init__(
        self,
        app: ASGIApp,
        draining: Draining,
        gate: ConnectionGate,
        reserved_paths: frozenset[str],
        max_header_size: int,
        idle_timeout: float,
        timeouts: Timeouts,
    ) -> None:
        self.app = app
        self.reserve_app = _reserve_only(app, reserved_paths)
        self.draining = draining
        # Reserve connections drain apart: evicting one must not make room for a normal one.
        self.reserve_draining = Draining(draining.refusals)
        self.gate = gate
        self.max_header_size = max_header_size
        self.idle_timeout = idle_timeout
        self.timeouts = timeouts
        # Refusals and accept failures come in storms: one line per kind and interval, counting the rest.
        self.refusal_log = logfmt.RateLimitedLog(log, REFUSAL_LOG_INTERVAL, clock=trio.current_time)

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        backoff = ACCEPT_BACKOFF_MIN
        gate, draining = self.gate, self.draining
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    gate.accept_errors += 1
                    self.refusal_log.log(
                        logging.ERROR,
                        "accept",
                        "http accept failing, backing off",
                        error=errno.errorcode.get(exc.errno or 0, exc.errno),
                        failures=gate.accept_errors,
                        open=gate.open + gate.reserve_open,
                    )
                    draining.evict_oldest()  # frees a descriptor as soon as that connection's task runs
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, ACCEPT_BACKOFF_MAX)
                    continue
                backoff = ACCEPT_BACKOFF_MIN
                kind = gate.admit(draining.evict_oldest)
                if kind == REFUSE:
                    self.refusal_log.warning(
                        "refused",
                        "http connections refused: every connection is busy and the reserve is full",
                        cap=gate.cap,
                    )
                    stream.socket.close()  # at once: costs nothing, and a refused client cannot hold it
                    continue
                nursery.start_soon(self.serve_connection, stream, kind)

    def drain(self) -> None:
        self.draining.drain()
        self.reserve_draining.drain()

    async def serve_connection(self, stream: trio.SocketStream, kind: str) -> None:
        try:
            await serve_stream(
                DirectSocketStream(stream),
                self.app if kind == NORMAL else self.reserve_app,
                client=_address(stream.socket.getpeername()),
                server=_address(stream.socket.getsockname()),
                max_header_size=self.max_header_size,
                idle_timeout=self.idle_timeout,
                draining=self.draining if kind == NORMAL else self.reserve_draining,
                date_header=True,
                timeouts=self.timeouts,
                single_request=kind == RESERVE,
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("http connection ended exc=%r", exc)
        except Exception as exc:  # noqa: BLE001 - one connection must never take the server down
            log.error("http connection failed exc=%r", exc, exc_info=True)
        finally:
            self.gate.closed(kind)
            await trio.aclose_forcefully(stream)


def _reserve_only(app: ASGIApp, paths: frozenset[str]) -> ASGIApp:
    """``app`` for the reserved paths only; 503 for the rest (a connection over the cap)."""
    body = json.dumps(
        {
            "error": {
                "message": "the server is at its connection limit; retry shortly",
                "type": "server_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
    ]

    async def reserved(
        scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable[[dict], Awaitable[None]]
    ) -> None:
        if scope.get("path") in paths:
            await app(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return reserved


def _address(sockaddr: Any) -> tuple[str, int] | None:
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return str(sockaddr[0]), int(sockaddr[1])
    return None


def _url(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def _lifespan(app: ASGIApp) -> AsyncIterator[None]:
    """The ASGI lifespan protocol around serving: startup first, shutdown last.

    An app that does not speak it (raises on the ``lifespan`` scope) is
    served anyway, as the ASGI spec asks of servers.
    """
    to_app, inbox = trio.open_memory_channel[dict](2)
    outbox, from_app = trio.open_memory_channel[dict](2)

    async def run() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}

        async def send(message: dict) -> None:
            await outbox.send(message)

        try:
            await app(scope, inbox.receive, send)
        except Exception as exc:  # noqa: BLE001 - per the ASGI spec: the app has no lifespan support
            log.debug("application does not support lifespan: %r", exc)
        finally:
            outbox.close()

    async def ask(event: str) -> dict | None:
        """Send a lifespan event; the app's answer, or None if it does not speak lifespan."""
        try:
            await to_app.send({"type": event})
            return await from_app.receive()
        except (trio.EndOfChannel, trio.BrokenResourceError):
            return None  # the app returned: no lifespan support

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        with trio.move_on_after(LIFESPAN_STARTUP_TIMEOUT) as waited:
            reply = await ask("lifespan.startup")
        if waited.cancelled_caught:
            raise LifespanError(f"the application did not answer lifespan.startup within {LIFESPAN_STARTUP_TIMEOUT:g}s")
        if reply is not None and reply["type"] == "lifespan.startup.failed":
            raise LifespanError(f"the application failed to start: {reply.get('message', '')}")
        try:
            yield
        finally:
            reply = None
            with trio.CancelScope(shield=True), trio.move_on_after(LIFESPAN_SHUTDOWN_TIMEOUT) as waited:
                reply = await ask("lifespan.shutdown")
            if waited.cancelled_caught:
                log.warning("the application did not answer lifespan.shutdown within %gs", LIFESPAN_SHUTDOWN_TIMEOUT)
            if reply is not None and reply["type"] == "lifespan.shutdown.failed":
                log.warning("the application failed to shut down cleanly: %s", reply.get("message", ""))
            nursery.cancel_scope.cancel()
