"""The distributed job tracker: multi-stage projects, leases, leaderboard, dashboard.

``--jobs`` makes a node host it (``open_tracker``); its HTTP API lives under
``/v1/jobs`` and is also registered as the ``jobs`` service so workers reach
it through any node as ``/v1/service/jobs/...``.
"""

from .host import open_tracker
from .tracker import Tracker

__all__ = ["Tracker", "open_tracker"]
