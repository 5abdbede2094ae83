"""The tracker's stores for the tests: ``jobs_store`` runs a test once on LMDB and once on PostgreSQL.

PostgreSQL is a real server (``tests/pgcluster.py``), one throwaway cluster
for the session with a fresh database per test. A machine without PostgreSQL
fails these tests with the reason; it never skips them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ocf.jobs.store import JobStore
from ocf.store import Store
from tests.pgcluster import Cluster

_databases = itertools.count()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    # Its own temp dir: pytest's is private to root, and the server runs as an unprivileged user.
    cluster = Cluster()
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return pg_cluster.create_database(f"t{next(_databases)}")


class StoreFactory:
    """Opens the tracker's store of one kind over one place (a data dir, a database), as often as asked."""

    def __init__(self, kind: str, tmp_path: Path, pg_cluster: Cluster | None) -> None:
        self.kind = kind
        self.path = tmp_path / "data"
        self._cluster = pg_cluster
        self._url: str | None = None
        self._stack = contextlib.ExitStack()

    @property
    def url(self) -> str:
        if self._url is None:
            assert self._cluster is not None
            self._url = self._cluster.create_database(f"t{next(_databases)}")
        return self._url

    def __call__(self, **settings: Any) -> Any:
        if self.kind == "lmdb":
            raw = self._stack.enter_context(Store.open(self.path))
            return JobStore(raw, **settings)
        from ocf.jobs.pg import PgJobStore

        store = PgJobStore(self.url, **settings)
        self._stack.callback(store.close)
        return store

    def close(self) -> None:
        """Close every store opened so far (LMDB's data dir can then be opened again)."""
        self._stack.close()
        self._stack = contextlib.ExitStack()


@pytest.fixture(params=["lmdb", "postgresql"])
def jobs_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    cluster = request.getfixturevalue("pg_cluster") if request.param == "postgresql" else None
    factory = StoreFactory(request.param, tmp_path, cluster)
    try:
        yield factory
    finally:
        factory.close()
