"""A raw HTTP/1.1 client for router tests: sends the request target byte for byte (httpx normalises it)."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import h11
import trio


async def raw_request(
    base_url: str, method: str, target: bytes, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    url = urlsplit(base_url)
    stream = await trio.open_tcp_stream(url.hostname, url.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", url.netloc), ("Content-Length", str(len(body))), ("Connection", "close")]
        head += list((headers or {}).items())
        request = h11.Request(method=method, target=b"/", headers=head)
        # h11 refuses odd targets on the way out; splice ours into its bytes instead.
        data = (
            conn.send(request).replace(b" / HTTP/1.1", b" " + target + b" HTTP/1.1", 1)
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        await stream.send_all(data)
        response, parts = None, []
        with trio.fail_after(30):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    parts.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
    assert response is not None
    return response.status_code, {k.decode().lower(): v.decode() for k, v in response.headers}, b"".join(parts)


def error_code(body: bytes) -> str:
    return json.loads(body)["error"]["code"]
