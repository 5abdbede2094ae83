"""serve_http: the gateway's TCP server (lifespan, keep-alive, graceful shutdown, headers)."""

from __future__ import annotations

import functools
import json
import socket

import h11
import pytest
import trio

from ocf.errors import find_in_group
from ocf.httpstream.listener import LifespanError, serve_http
import trio.lowlevel


class App:
    """A small ASGI app that records lifespan events and can hold a request open."""

    def __init__(self, *, lifespan: str = "ok") -> None:
        self.lifespan_mode = lifespan
        self.events: list[str] = []
        self.release = trio.Event()
        self.holding = trio.Event()
        self.cancelled = False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            if self.lifespan_mode == "unsupported":
                raise RuntimeError("no lifespan here")
            while True:
                message = await receive()
                self.events.append(message["type"])
                if message["type"] == "lifespan.startup":
                    if self.lifespan_mode == "fail":
                        await send({"type": "lifespan.startup.failed", "message": "no database"})
                        return
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.events.append(f"request {scope['path']}")
        if scope["path"] == "/hold":
            self.holding.set()
            try:
                await self.release.wait()
            except trio.Cancelled:
                self.cancelled = True
                raise
        if scope["path"] == "/early":  # answers without reading the body
            body = b"too large"
            await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"9")]})
            await send({"type": "http.response.body", "body": body})
            return
        body = b"ok " + scope["path"].encode()
        if scope["path"] == "/dated":
            headers = [(b"content-length", str(len(body)).encode()), (b"date", b"Thu, 01 Jan 1970 00:00:00 GMT")]
        else:
            headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Client:
    """A keep-alive HTTP/1.1 client on one TCP connection, by hand (h11)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, url: str) -> Client:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)))

    async def request(
        self, method: str, path: str, body: bytes = b"", *, send_body: bool = True
    ) -> tuple[int, dict, bytes]:
        headers = [("host", "test"), ("content-length", str(len(body)))]
        await self.stream.send_all(self.h11.send(h11.Request(method=method, target=path, headers=headers)))
        if send_body:
            await self.stream.send_all(self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage()))
        status, head, parts = 0, {}, []
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, head = event.status_code, {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, head, b"".join(parts)

    def next_cycle(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False


async def start(nursery, app, **kw):
    stop = trio.Event()
    urls = await nursery.start(functools.partial(serve_http, app, "127.0.0.1", 0, shutdown_trigger=stop.wait, **kw))
    return urls, stop


async def test_lifespan_wraps_serving_and_requests_keep_alive():
    app = App()
    async with trio.open_nursery() as nursery:
        urls, stop = await start(nursery, app)
        assert urls[0].startswith("http://127.0.0.1:") and not urls[0].endswith(":0")
        assert app.events == ["lifespan.startup"]
        client = await Client.connect(urls[0])
        status, head, body = await client.request("GET", "/a")
        assert (status, body) == (200, b"ok /a")
        assert "date" in head and head["date"].endswith("GMT")  # added, as an origin server should
        assert client.next_cycle()
        status, head, body = await client.request("GET", "/dated")  # same connection
        assert body == b"ok /dated" and head["date"] == "Thu, 01 Jan 1970 00:00:00 GMT"  # the app's own, not twice
        await client.stream.aclose()
        stop.set()
    assert app.events == ["lifespan.startup", "request /a", "request /dated", "lifespan.shutdown"]


async def test_early_answer_closes_the_connection_and_says_so():
    app = App()
    async with trio.open_nursery() as nursery:
        urls, stop = await start(nursery, app)
        client = await Client.connect(urls[0])
        status, head, body = await client.request("POST", "/early", b"x" * 100_000, send_body=False)
        assert status == 413 and head.get("connection") == "close" and body == b"too large"
        stop.set()


async def test_startup_failure_is_an_error():
    with pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            await start(nursery, App(lifespan="fail"))
    error = find_in_group(info.value, LifespanError)
    assert error is not None and "no database" in str(error)


async def test_app_without_lifespan_is_served():
    app = App(lifespan="unsupported")
    async with trio.open_nursery() as nursery:
        urls, stop = await start(nursery, app)
        client = await Client.connect(urls[0])
        assert (await client.request("GET", "/x"))[2] == b"ok /x"
        stop.set()


async def test_shutdown_closes_idle_connections_at_once_and_lets_requests_finish():
    app = App()
    async with trio.open_nursery() as nursery:
        urls, stop = await start(nursery, app, graceful_timeout=60)
        idle = await Client.connect(urls[0])
        assert (await idle.request("GET", "/a"))[0] == 200
        busy = await Client.connect(urls[0])
        answer = {}

        async def held():
            answer["held"] = await busy.request("GET", "/hold")

        nursery.start_soon(held)
        await app.holding.wait()
        stop.set()
        assert await idle.stream.receive_some() == b""  # closed without waiting for the 60 s
        app.release.set()  # the request in flight still gets its answer
    assert answer["held"][2] == b"ok /hold"
    assert answer["held"][1].get("connection") == "close"  # the client learns not to reuse it
    assert app.events[-1] == "lifespan.shutdown" and not app.cancelled


async def test_requests_past_the_graceful_timeout_are_cancelled():
    app = App()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            urls, stop = await start(nursery, app, graceful_timeout=0.05)
            client = await Client.connect(urls[0])

            async def doomed():
                with pytest.raises(h11.RemoteProtocolError):  # the server hung up mid-request
                    await client.request("GET", "/hold")

            nursery.start_soon(doomed)
            await app.holding.wait()
            stop.set()
            await trio.lowlevel.checkpoint()
        # serve_http returned although the app never released the request
    assert app.cancelled


async def test_port_in_use_is_an_os_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await serve_http(App(), "127.0.0.1", port, shutdown_trigger=trio.sleep_forever)


async def test_head_drops_the_body_the_app_sends_and_keeps_the_connection():
    app = App()
    async with trio.open_nursery() as nursery:
        urls, stop = await start(nursery, app)
        client = await Client.connect(urls[0])
        status, head, body = await client.request("HEAD", "/a")
        assert status == 200 and body == b"" and head["content-length"] == "5"
        assert client.next_cycle()
        assert (await client.request("GET", "/a"))[2] == b"ok /a"
        stop.set()


async def test_malformed_request_gets_one_json_400():
    app = App()
    async with trio.open_nursery() as nursery:
        urls, stop = await start(nursery, app)
        host, port = urls[0].removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GARBAGE\r\n\r\n")
        reply = b""
        while chunk := await stream.receive_some():
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"\r\ndate: " in head and b"connection: close" in head
        error = json.loads(body)["error"]
        assert error["code"] == "bad_request" and error["message"].count("malformed HTTP request") == 1
        stop.set()
