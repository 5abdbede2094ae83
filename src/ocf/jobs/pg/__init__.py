"""The job tracker on PostgreSQL: the LMDB store's semantics, shared by several ocf nodes.

:class:`PgJobStore` has the same operations as :class:`ocf.jobs.store.JobStore`
(same arguments, answers and errors), so :class:`ocf.jobs.tracker.Tracker`
drives either. Modules: :mod:`.schema` (tables, why they look so),
:mod:`.tx` (one operation's rows and the batch's deltas), :mod:`.core`
(connections, transactions, projects), :mod:`.machine` (lease transitions),
:mod:`.ops` (operations), :mod:`.reports` (reads), :mod:`.notify` (events
between nodes).
"""

from __future__ import annotations

from .reports import PgReports
from .schema import is_postgres_url, redact


class PgJobStore(PgReports):
    """All tracker state in PostgreSQL; open with the ``postgresql://`` URL (``--jobs.store``)."""


__all__ = ["PgJobStore", "is_postgres_url", "redact"]
