"""The one watchdog task per served connection: keep-alive idling and the deadlines of :mod:`.deadlines`.

One sleeping task per connection, woken about once per shortest timeout,
rather than a cancel scope entered and left around every read, write and
request (which would cost every request; this costs a wake-up every few
seconds per connection). A deadline set while it sleeps is at least that
far away, so waking that often never oversleeps one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..errors import BodyTimeout, HeadTimeout
from . import deadlines

if TYPE_CHECKING:
    from .server import _Connection

log = logging.getLogger("ocf.httpstream")


async def watch(conn: _Connection) -> None:
    """End ``conn`` when it idles too long between requests or one of its deadlines passes."""
    timeout, clock, bridge = conn.idle_timeout, conn.clock, conn.bridge
    step = min(timeout, clock.timeouts.shortest)
    while True:
        now = trio.current_time()
        since = conn._idle_since
        if since is not None and now - since >= timeout:
            conn.end_idle()
            return
        phase = bridge.receive_phase
        expired = clock.expired(now, phase)
        if expired is not None:
            expire(conn, expired)
            if expired == deadlines.WRITE:
                return
            clock.stop_reading()  # the connection is ending; only its last write is still timed
            continue
        wake = min(now + step, clock.next_deadline(phase), since + timeout if since is not None else now + step)
        await trio.sleep_until(wake)


def expire(conn: _Connection, what: str) -> None:
    t = conn.clock.timeouts
    if what == deadlines.WRITE:
        log.debug("http client did not read its response within %gs: closing", t.write)
        if conn.draining is not None:
            conn.draining.refusals["write_timeout"] += 1
        conn.gone = True
        if conn._scope is not None:
            conn._scope.cancel()  # the stuck write, and the app producing what it would write
    elif what == deadlines.HEAD_UNSTARTED:
        log.debug("http client sent no request within %gs: closing", t.head)
        conn.end_idle()
    elif what == deadlines.HEAD:
        conn._refuse(HeadTimeout(f"the request head did not arrive within {t.head:g} seconds"))
    else:
        conn._refuse(
            BodyTimeout(
                f"the request body stalled for {t.body:g} seconds or came slower than {t.min_body_rate:g} bytes/s"
            )
        )
