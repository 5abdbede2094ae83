"""Serve an ASGI app on TCP with our own HTTP/1.1 connection handler.

The gateway's port used to be served by Hypercorn. Measured on this 2-core
machine with a trivial ASGI app (``python benchmarks/gateway.py`` shows the
effect on the real routes): Hypercorn's Trio worker spent 0.75-0.9 ms of CPU
per keep-alive request and answered at most ~1,430 requests/s with 64
clients; :func:`~ocf.httpstream.server.serve_stream`, which already serves
every ``/libp2p-http`` stream from other peers, spent 0.35 ms and answered
~3,400 requests/s. One HTTP engine for both doors also means one set of
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
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from ..directsocket import DirectSocketStream
from ..errors import OcfError
from .bridge import DEFAULT_MAX_HEADER_SIZE
from .server import ASGIApp, Draining, serve_stream

log = logging.getLogger("ocf.httpstream")

LIFESPAN_STARTUP_TIMEOUT = 60.0
LIFESPAN_SHUTDOWN_TIMEOUT = 10.0


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
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until ``shutdown_trigger()`` returns.

    ``task_status.started`` gets the bound addresses as URLs
    (``["http://127.0.0.1:8092"]``), so port 0 reports the real port.
    Binding errors (``OSError``) propagate before anything is started.
    """
    listeners = await trio.open_tcp_listeners(port, host=host or None)
    urls = [_url(listener.socket.getsockname()) for listener in listeners]
    draining = Draining()
    try:
        async with _lifespan(app):
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    # Connections run in their own nursery, which outlives accepting:
                    # at shutdown we stop accepting first, then drain them.
                    accepting.start_soon(
                        functools.partial(
                            trio.serve_listeners,
                            lambda stream: _serve_connection(stream, app, draining, max_header_size, idle_timeout),
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    task_status.started(urls)
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
                log.debug("http server stopped accepting; draining open connections")
                draining.drain()
                connections.cancel_scope.deadline = trio.current_time() + graceful_timeout
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)


async def _serve_connection(stream: trio.SocketStream, app: ASGIApp, draining: Draining, max_header_size: int, idle_timeout: float) -> None:
    try:
        client = _address(stream.socket.getpeername())
        server = _address(stream.socket.getsockname())
        await serve_stream(
            DirectSocketStream(stream),
            app,
            client=client,
            server=server,
            max_header_size=max_header_size,
            idle_timeout=idle_timeout,
            draining=draining,
            date_header=True,
        )
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("http connection ended exc=%r", exc)
    except Exception as exc:  # noqa: BLE001 - one connection must never take the server down
        log.error("http connection failed exc=%r", exc, exc_info=True)
    finally:
        await trio.aclose_forcefully(stream)


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

    async def ask(event: str, timeout: float) -> dict | None:
        """Send a lifespan event; the app's answer, or None if it does not speak lifespan."""
        with trio.move_on_after(timeout):
            try:
                await to_app.send({"type": event})
                return await from_app.receive()
            except (trio.EndOfChannel, trio.BrokenResourceError):
                return None  # the app returned: no lifespan support
        raise LifespanError(f"the application did not answer {event} within {timeout:g}s")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        reply = await ask("lifespan.startup", LIFESPAN_STARTUP_TIMEOUT)
        if reply is not None and reply["type"] == "lifespan.startup.failed":
            raise LifespanError(f"the application failed to start: {reply.get('message', '')}")
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                try:
                    reply = await ask("lifespan.shutdown", LIFESPAN_SHUTDOWN_TIMEOUT)
                except LifespanError as exc:
                    log.warning("%s", exc)
                    reply = None
            if reply is not None and reply["type"] == "lifespan.shutdown.failed":
                log.warning("the application failed to shut down cleanly: %s", reply.get("message", ""))
            nursery.cancel_scope.cancel()
