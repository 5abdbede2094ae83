"""What the job tracker serves through a node's gateway, as one :class:`~ocf.ports.HttpMount`.

Every node mounts it, with or without ``--jobs``: a node without a tracker
still answers ``/v1/jobs`` and the dashboard, saying it hosts none (404), rather
than pretending the routes do not exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ports import HttpMount
from . import compat, dashboard, http
from .hot import HotRoutes
from .metrics import TrackerCollector

if TYPE_CHECKING:
    from .tracker import Tracker

#: The router family (:mod:`ocf.gateway.router`) of the three raw-ASGI hot routes.
HOT_FAMILY = "jobs-hot"


def jobs_mount(tracker: Tracker | None, *, max_body_size: int, request_timeout: float) -> HttpMount:
    hot = HotRoutes(tracker, max_body_size=max_body_size, request_timeout=request_timeout)
    return HttpMount(
        blueprints=(http.blueprint, compat.blueprint, dashboard.blueprint),
        extensions={http.TRACKER_EXTENSION: tracker},
        raw={HOT_FAMILY: hot},
        collectors=(TrackerCollector(tracker),) if tracker is not None else (),
    )
