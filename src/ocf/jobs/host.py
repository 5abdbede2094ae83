"""Hosting the tracker on a node: open the store ``--jobs.store`` names, run the tracker's tasks.

The embedded LMDB store (the default) lives in the node's own data dir. A
``postgresql://`` URL instead opens the shared store several nodes serve
together; the node then also LISTENs for the other nodes' commits. A bad URL
or wrong credentials stop the node at start with one line (a
:class:`~ocf.errors.ConfigError` naming ``--jobs.store``), before anything is
served.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING
from collections.abc import AsyncIterator

import trio

from .. import log as logfmt
from .store import JobStore
from .tracker import Tracker, TrackerStore

if TYPE_CHECKING:
    from ..config import Config
    from ..ports import InternalServices
    from ..store import Store

log = logging.getLogger("ocf.jobs")


def _settings(config: Config) -> dict[str, object]:
    return dict(
        max_stages=config.jobs_max_stages,
        max_attempts=config.jobs_max_attempts,
        flag_threshold=config.jobs_flag_threshold,
        flag_per_worker=config.jobs_flag_per_worker,
        max_payload=config.jobs_max_payload,
        default_lease=config.jobs_lease_timeout,
        worker_timeout=config.jobs_worker_timeout,
    )


@contextlib.asynccontextmanager
async def open_tracker(
    config: Config, store: Store, services: InternalServices | None = None, *, node_id: str = "local"
) -> AsyncIterator[Tracker]:
    """Host the tracker: open the store ``--jobs.store`` names (else in ``store``), run its reaper and
    writer, register the ``jobs`` service with ``services``. ``node_id`` names this node to the others
    that share a PostgreSQL store."""
    url = config.jobs_store
    with contextlib.ExitStack() as closing:
        jobs_store: TrackerStore
        if url:
            from .pg import PgJobStore, redact
            from .pg.notify import Listener

            pg = await trio.to_thread.run_sync(
                lambda: PgJobStore(url, node=node_id, **_settings(config))  # type: ignore[arg-type]
            )
            closing.callback(pg.close)
            jobs_store = pg
            where = redact(url)
        else:
            jobs_store = JobStore(store, **_settings(config))  # type: ignore[arg-type]
            where = "lmdb"
        tracker = Tracker(jobs_store, create_chunk=config.jobs_create_chunk)
        # Leases that ran out while the node (or, with PostgreSQL, every node) was down.
        expired = await tracker.expire_at_start()
        projects = await tracker.read(lambda s: len(s.projects()))
        log.info("job tracker started %s", logfmt.kv(store=where, projects=projects, expired_while_down=len(expired)))
        async with trio.open_nursery() as nursery:
            await nursery.start(tracker.run_committer)
            nursery.start_soon(tracker.run_reaper)
            if url:
                listener = Listener(url, node_id, tracker.remote_changed, trio.lowlevel.current_trio_token())
                listener.start()
                closing.callback(listener.close)
                nursery.start_soon(tracker.run_snapshots)
            if services is not None:
                services.register_internal("jobs", "/v1/jobs")
            try:
                yield tracker
            finally:
                if services is not None:
                    services.unregister_internal("jobs")
                nursery.cancel_scope.cancel()
