"""Error answers in OpenAI's shape, for Quart routes and raw ASGI alike.

Every error the gateway sends looks like OpenAI's, so OpenAI client
libraries raise their usual typed exceptions (``NotFoundError``,
``APIStatusError``...) with our message::

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "model_not_found"}}

The status code is always the honest one (OCF answered errors as 200 with
an "ERROR: ..." body). ``X-OCF-Error-Code`` repeats the code as a header so
another gateway relaying the answer can tell our own refusals (e.g. a
worker's backend being down) from an application's errors without parsing
the body.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from quart import Response

from ..errors import GatewayRequestError

ERROR_CODE_HEADER = "X-OCF-Error-Code"
#: The same header as a raw ASGI/HTTP name (lower-case bytes).
ERROR_CODE_NAME = ERROR_CODE_HEADER.lower().encode()


def error_type(status: int) -> str:
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status < 500:
        return "invalid_request_error"
    return "server_error"


def error_payload(status: int, message: str, code: str, kind: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind or error_type(status), "param": None, "code": code}},
        ensure_ascii=False,
    ).encode()


def error_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> Response:
    """A Quart response carrying an OpenAI-shaped error."""
    response = Response(error_payload(status, message, code), status=status, content_type="application/json")
    response.headers[ERROR_CODE_HEADER] = code
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def exception_response(exc: GatewayRequestError) -> Response:
    return error_response(exc.status, exc.message, exc.code, exc.headers)


def asgi_error(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """``(status, headers, body)`` of an error for raw ASGI senders."""
    body = error_payload(status, message, code)
    out = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (ERROR_CODE_NAME, code.encode()),
    ]
    out.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items())
    return status, out, body


async def send_asgi_error(send: Callable[[dict], Awaitable[None]], exc: GatewayRequestError) -> None:
    status, headers, body = asgi_error(exc.status, exc.message, exc.code, exc.headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
