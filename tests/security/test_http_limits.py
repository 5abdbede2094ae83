"""Hostile clients at the HTTP edge: the connection cap, and deadlines for heads, bodies and writes.

Each test holds the server the way an attacker would and asserts the figure
that shows the defence: a status, a count of connections or log lines, a
bound on how long the server held on.
"""

from __future__ import annotations

import errno
import logging

import trio

from ocf.httpstream.admission import EVICTION_SLACK, ConnectionGate, ConnectionLimits, Draining
from ocf.httpstream.deadlines import Timeouts
from ocf.httpstream.listener import REFUSAL_LOG_INTERVAL, _Server
from tests.waiting import wait_until

from ._http_attacker import EdgeApp, connect, edge_server, get, read_until_close, status_of

HEALTH = frozenset({"/health"})


# --- the connection cap ----------------------------------------------------------------------


async def test_health_answers_while_the_cap_is_full_and_a_connection_past_the_reserve_is_refused():
    app = EdgeApp()
    limits = ConnectionLimits(max_connections=4, reserve=1, reserved_paths=HEALTH)
    async with edge_server(app, limits=limits) as addr:
        busy = [
            await connect(addr, get("/hold", close=True)) for _ in range(4)
        ]  # the cap, all in the middle of a request
        with trio.fail_after(10):
            await wait_until(lambda: app.holding >= 4)
        # Over the cap: the reserve answers the health check, and that connection closes after it.
        reply = await read_until_close(await connect(addr, get("/health")))
        assert status_of(reply) == 200 and b"connection: close" in reply
        # ...and nothing else: a reserve connection asking for another path gets 503.
        reply = await read_until_close(await connect(addr, get("/hold")))
        assert status_of(reply) == 503 and b"retry-after: 1" in reply and app.holding == 4
        # Hold the one reserve slot with half a head; the next connection is refused at once.
        held_reserve = await connect(addr, b"GET /health HTTP/1.1\r\n")
        await trio.sleep(0.1)  # let the server take it (nothing observable to wait on)
        with trio.fail_after(5):
            refused = await read_until_close(await connect(addr, get("/health")))
        assert refused == b""  # closed without a byte
        app.release.set()
        for stream in busy:
            assert status_of(await read_until_close(stream)) == 200
        await held_reserve.aclose()


async def test_idle_connections_make_room_instead_of_filling_the_cap():
    app = EdgeApp()
    limits = ConnectionLimits(max_connections=8, reserve=0, reserved_paths=HEALTH)
    async with edge_server(app, limits=limits) as addr:
        idle = [await connect(addr) for _ in range(40)]  # five times the cap, none sends a byte
        with trio.fail_after(10):
            reply = await read_until_close(
                await connect(addr, b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            )
        assert status_of(reply) == 200
        closed = 0
        for stream in idle:
            with trio.move_on_after(0.2):
                if await read_until_close(stream) == b"":
                    closed += 1
        assert closed >= 40 - 8 + 1  # all but the newest few were closed for newcomers: never more than the cap open


def test_gate_bounds_descriptors_however_fast_connections_arrive():
    gate = ConnectionGate(cap=10, reserve=2)
    kinds = [gate.admit(lambda: True) for _ in range(100)]  # every admission finds an idle one to evict
    assert kinds.count("normal") == 10 + EVICTION_SLACK and kinds.count("reserve") == 2
    assert gate.open + gate.reserve_open == 10 + EVICTION_SLACK + 2  # whatever arrives, before evicted ones close
    for _ in range(EVICTION_SLACK):
        gate.closed("normal")  # the evicted connections' tasks ran and closed them
    assert gate.admit(lambda: True) == "normal"


async def test_running_out_of_descriptors_backs_off_and_logs_once_per_interval(autojump_clock, caplog):
    class OutOfDescriptors:
        attempts = 0

        async def accept(self):
            self.attempts += 1
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EMFILE, "Too many open files")

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return None

    listener = OutOfDescriptors()
    server = _Server(EdgeApp(), Draining(), ConnectionGate(8, 1), HEALTH, 65536, 75.0, Timeouts())
    caplog.set_level(logging.DEBUG, logger="ocf.httpstream")
    with trio.move_on_after(120):  # two virtual minutes out of descriptors
        async with trio.open_nursery() as nursery:
            await server.accept_loop(listener, nursery)
    records = [r for r in caplog.records if r.name == "ocf.httpstream"]
    assert listener.attempts >= 100  # it kept trying (about once a second at most back-off)
    assert len(records) <= 120 / REFUSAL_LOG_INTERVAL + 1  # trio.serve_listeners: a traceback every 0.1 s, 1,200 lines
    assert all(r.exc_info is None for r in records)
    assert "failures=" in records[-1].getMessage()


async def test_refusals_are_counted_in_one_line_per_interval(caplog):
    app = EdgeApp()
    caplog.set_level(logging.DEBUG, logger="ocf.httpstream")
    limits = ConnectionLimits(max_connections=1, reserve=0, reserved_paths=HEALTH)
    async with edge_server(app, limits=limits) as addr:
        busy = await connect(addr, get("/hold", close=True))
        with trio.fail_after(10):
            await wait_until(lambda: app.holding >= 1)
        for _ in range(200):
            assert await read_until_close(await connect(addr)) == b""
        app.release.set()
        await read_until_close(busy)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1  # one line (the first), not 200; the next one would say suppressed=199


# --- deadlines --------------------------------------------------------------------------------


async def test_a_partial_head_gets_408_after_the_head_timeout_not_the_keep_alive_one():
    async with edge_server(EdgeApp(), timeouts=Timeouts(head=0.3), idle_timeout=75.0) as addr:
        start = trio.current_time()
        reply = await read_until_close(await connect(addr, b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: "))
        held = trio.current_time() - start
        assert status_of(reply) == 408 and b'"code": "head_timeout"' in reply
        assert 0.25 <= held < 5  # the head timeout, nowhere near 75 s


async def test_a_silent_connection_is_closed_quietly_after_the_head_timeout():
    async with edge_server(EdgeApp(), timeouts=Timeouts(head=0.3)) as addr:
        start = trio.current_time()
        assert await read_until_close(await connect(addr)) == b""
        assert trio.current_time() - start < 5


async def test_a_trickling_body_gets_408_though_it_never_pauses_long():
    app = EdgeApp()
    async with edge_server(app, timeouts=Timeouts(body=0.5, min_body_rate=1024)) as addr:
        stream = await connect(addr, b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
        start = trio.current_time()
        reply = b""
        with trio.fail_after(10):
            with trio.move_on_after(8):
                for _ in range(1000):  # one byte every 50 ms: never idle for the 0.5 s, at 20 bytes/s
                    try:
                        await stream.send_all(b"x")
                    except trio.BrokenResourceError:
                        break  # the server hung up
                    await trio.sleep(0.05)
            reply = await read_until_close(stream)
        held = trio.current_time() - start
        assert status_of(reply) == 408 and b'"code": "body_timeout"' in reply
        assert held < 5 and app.bodies == []


async def test_a_stalled_body_gets_408():
    async with edge_server(EdgeApp(), timeouts=Timeouts(body=0.3)) as addr:
        reply = await read_until_close(
            await connect(addr, b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
        )
        assert status_of(reply) == 408


async def test_time_the_app_leaves_the_body_unread_is_not_the_clients_fault():
    app = EdgeApp()
    app.delay_body = 1.0  # the app reads nothing for twice the body timeout
    body = b"y" * (1 << 20)
    async with edge_server(app, timeouts=Timeouts(body=0.5, min_body_rate=1e12)) as addr:
        stream = await connect(
            addr, b"POST /upload HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, body)
            reply = await read_until_close(stream)
        assert status_of(reply) == 200 and app.bodies == [len(body)]


async def test_a_client_that_never_reads_is_cut_off_after_the_write_timeout():
    app = EdgeApp()
    async with edge_server(app, timeouts=Timeouts(write=0.5)) as addr:
        stream = await connect(addr, get("/flood"))
        start = trio.current_time()
        with trio.fail_after(10):
            await wait_until(lambda: app.cancelled >= 1)  # the app making the response is cancelled with it
        assert trio.current_time() - start < 8
        await stream.aclose()


async def test_a_chunk_size_line_over_the_head_limit_after_the_head_gets_400():
    async with edge_server(EdgeApp(), max_header_size=65536) as addr:
        stream = await connect(addr, b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        start = trio.current_time()
        with trio.move_on_after(5):
            await stream.send_all(b"1;" + b"e" * 70_000)
        reply = await read_until_close(stream)
        assert status_of(reply) == 400 and b"line longer than 65536" in reply
        assert trio.current_time() - start < 5


async def test_read_ahead_follows_the_configured_head_size():
    # A head larger than the default bound but within the configured one is read whole, not stalled.
    async with edge_server(EdgeApp(), max_header_size=256 << 10) as addr:
        head = b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * (150 << 10) + b"\r\nConnection: close\r\n\r\n"
        stream = await connect(addr)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, head)
            reply = await read_until_close(stream)
        assert status_of(reply) == 200
