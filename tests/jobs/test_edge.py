"""The tracker's domain errors and the one table that turns them into HTTP answers."""

from __future__ import annotations

import pytest

from ocf import errors
from ocf.jobs.edge import HTTP_ERRORS, http_error, item_answers


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_every_domain_error_has_a_status_and_none_is_an_http_error():
    for cls in [errors.JobsError, *_subclasses(errors.JobsError)]:
        assert cls.kind in HTTP_ERRORS, cls
        assert not issubclass(cls, errors.GatewayRequestError), cls


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (errors.InvalidJobRequest("max must be 1..1000", code="bad_limit"), 400, "bad_limit"),
        (errors.ProjectNotFound("project 'x' not found"), 404, "unknown_project"),
        (errors.JobNotFound("no job 7"), 404, "unknown_job"),
        (errors.WorkerNotFound("register again"), 404, "unknown_worker"),
        (errors.ProjectExists("different definition"), 409, "project_exists"),
        (errors.LeaseNotHeld("job 7 was already completed"), 409, "lease_lost"),
        (errors.JobsPayloadTooLarge("too big"), 413, "payload_too_large"),
        (errors.JobsPayloadTooLarge("fan-out", code="fanout_too_large"), 413, "fanout_too_large"),
    ],
)
def test_the_edge_keeps_message_and_code_and_picks_the_status(exc, status, code):
    answer = http_error(exc)
    assert (answer.status, answer.code, answer.message, answer.headers) == (status, code, exc.message, {})


def test_batch_items_get_their_http_status_in_the_wire_order():
    done = {"id": 1, "status": "done", "children": []}
    failed = {"id": 2, "status": "error", "kind": "conflict", "code": "lease_lost", "message": "gone"}
    assert item_answers([done]) is not None and item_answers([done]) == [done]
    wire = item_answers([done, failed])
    assert wire[0] is done
    assert list(wire[1].items()) == [
        ("id", 2),
        ("status", "error"),
        ("http_status", 409),
        ("code", "lease_lost"),
        ("message", "gone"),
    ]
