"""Where the tracker's domain errors become HTTP answers: one table, used by every route.

The store, the lease machine and the tracker raise :class:`~ocf.errors.JobsError`
subclasses that say what went wrong in the tracker's terms (no such job, the
lease is gone...). Which status a client sees is a decision of the HTTP edge,
made here once, so the Quart routes (:mod:`ocf.jobs.http`), the raw-ASGI hot
routes (:mod:`ocf.jobs.hot`), the plain-text compatibility API
(:mod:`ocf.jobs.compat`) and a batch's per-item answers cannot disagree, and
a second store (PostgreSQL) only has to raise the same domain errors.
"""

from __future__ import annotations

from typing import Any

from ..errors import BadRequest, Conflict, GatewayRequestError, JobsError, NotFound, PayloadTooLarge

#: A domain error's ``kind`` -> the gateway error (status, OpenAI error type) a client is told.
HTTP_ERRORS: dict[str, type[GatewayRequestError]] = {
    "invalid": BadRequest,
    "not_found": NotFound,
    "conflict": Conflict,
    "too_large": PayloadTooLarge,
}


def http_error(exc: JobsError) -> GatewayRequestError:
    """The HTTP answer for ``exc``: same message and code, the status of its kind."""
    return HTTP_ERRORS[exc.kind](exc.message, code=exc.code)


def http_status(exc: JobsError) -> int:
    return HTTP_ERRORS[exc.kind].status


def item_answers(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A batch's per-item answers for the wire: each failed item's domain ``kind`` becomes ``http_status``."""
    if all(item.get("status") != "error" for item in results):
        return results
    return [
        item
        if item.get("status") != "error"
        else {
            "id": item["id"],
            "status": "error",
            "http_status": HTTP_ERRORS[item["kind"]].status,
            "code": item["code"],
            "message": item["message"],
        }
        for item in results
    ]
