"""The tracker's three hot routes as raw ASGI: claim, complete and heartbeat.

A worker fleet spends nearly all of its requests on these three, and they
are small JSON in, small JSON out. Through Quart each one paid for framework
work (request and app contexts, URL matching, two tasks per request,
response objects) of the same order as the LMDB commit behind it; mounted
as raw ASGI (:class:`~ocf.ports.HttpMount`), served in front of Quart by
the gateway's ASGI layer after its router, they cost only what they do.
CORS, metrics and the remote-peer policy still apply: that layer wraps
these routes as it wraps every other. Everything else under ``/v1/jobs``
stays in :mod:`ocf.jobs.http`, whose docstring lists the whole API.

Behaviour matches the Quart routes': errors in the gateway's JSON shape,
the gateway's body size limit (413) and body timeout, and a long-polling
claim whose client hangs up is cancelled before it leases anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any
from collections.abc import Awaitable, Callable

import trio

from .. import log as logfmt
from ..errors import GatewayRequestError, JobsError, MethodNotAllowed, NotFound, RequestTimeout
from ..web.asgi import ClientGone, RequestBody, Responder
from ..web.errors import send_asgi_error
from ..httpstream.bridge import get_header
from .edge import http_error, item_answers
from .http import parse_json_object, parse_number, token_from

if TYPE_CHECKING:
    from ..ports import RoutedRequest
    from .tracker import Tracker

log = logging.getLogger("ocf.jobs")

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

ALLOW = b"POST, OPTIONS"


class HotRoutes:
    """``POST /v1/jobs/<project>/{claim,complete,heartbeat}`` for one node's gateway.

    ``tracker`` is None on a node without ``--jobs``: the routes then say so (404).
    """

    def __init__(self, tracker: Tracker | None, *, max_body_size: int, request_timeout: float) -> None:
        self.tracker = tracker
        self.max_body_size = max_body_size
        self.request_timeout = request_timeout

    async def __call__(self, route: RoutedRequest, scope: dict, receive: Receive, send: Send) -> None:
        await self.serve(route, scope, receive, send)

    async def serve(self, route: RoutedRequest, scope: dict, receive: Receive, send: Send) -> None:
        """Serve a request the gateway's router classified as a hot route (it parsed the path)."""
        responder = Responder(send)
        project, action = route.param("project"), route.action
        method = scope["method"]
        try:
            if method != "POST":
                await _not_post(responder, method, scope["path"])
                return
            tracker = self.tracker
            if tracker is None:
                raise NotFound("this node does not host a job tracker (start it with --jobs)", code="no_tracker")
            body = RequestBody(receive, scope, self.max_body_size)
            with trio.fail_after(self.request_timeout):
                raw = await body.read_all()
            request = parse_json_object(raw)
            authorization = get_header(scope["headers"], b"authorization")
            worker = get_header(scope["headers"], b"x-ocf-worker-token")
            token = token_from(
                authorization.decode("latin-1") if authorization is not None else None,
                request,
                worker.decode("latin-1") if worker is not None else None,
            )
            if action == "claim":
                answer = await self._claim(tracker, project, token, request)
            elif action == "complete":
                items = request.get("results")
                if items is None and "id" in request:
                    items = [{"id": request["id"], "output": request.get("output")}]
                results, jobs = await tracker.complete_many(
                    project, token, items if items is not None else [], claim=request.get("claim", 0)
                )
                answer = {"results": item_answers(results), "jobs": jobs}
            else:
                answer = await tracker.heartbeat(
                    project, token, progress=request.get("progress"), jobs=request.get("jobs")
                )
        except JobsError as exc:
            await _send_error(responder, http_error(exc))
            return
        except GatewayRequestError as exc:
            await _send_error(responder, exc)
            return
        except trio.TooSlowError:
            await _send_error(responder, RequestTimeout(f"request body not received within {self.request_timeout:g} s"))
            return
        except ClientGone:
            return
        except Exception:
            log.exception("job tracker request failed %s", logfmt.kv(path=scope["path"]))
            await _send_error(responder, GatewayRequestError("internal error in the job tracker (see the node's log)"))
            return
        await _send_json(responder, answer)

    async def _claim(self, tracker: Tracker, project: str, token: Any, request: dict[str, Any]) -> dict[str, Any]:
        wait = parse_number(request.get("wait"), "wait", 0, 60, 0.0)
        limit, stage = request.get("max", 1), request.get("stage")
        # A long poll whose client leaves is cancelled by the server (the
        # tracker then drops the waiting claim: nothing is leased).
        return {"jobs": await tracker.claim(project, token, limit=limit, stage=stage, wait=wait)}


async def _send_json(responder: Responder, payload: dict[str, Any]) -> None:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    await responder(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await responder({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(responder: Responder, exc: GatewayRequestError) -> None:
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):  # the client is gone
        await send_asgi_error(responder, exc)


async def _not_post(responder: Responder, method: str, path: str) -> None:
    if method == "OPTIONS":
        await responder({"type": "http.response.start", "status": 204, "headers": [(b"allow", ALLOW)]})
        await responder({"type": "http.response.body", "body": b"", "more_body": False})
        return
    await _send_error(
        responder, MethodNotAllowed(f"method {method} is not allowed on {path}", headers={"Allow": ALLOW.decode()})
    )
