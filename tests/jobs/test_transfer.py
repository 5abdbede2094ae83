"""``ocf jobs export`` / ``import``: a project moves LMDB -> PostgreSQL -> LMDB and keeps working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ocf.cli import main
from ocf.errors import InvalidJobRequest, ProjectExists
from ocf.jobs.pg import PgJobStore
from ocf.jobs.pg.transfer import export_pg, import_pg
from ocf.jobs.store import JobStore
from ocf.jobs.transfer import export_lmdb, import_lmdb, read_lines
from ocf.store import Store

T0 = 1_800_000_000.0


def populate(store: JobStore) -> dict[str, str]:
    """A 2-stage project mid-run: results, failures, a leased job, pending jobs, an idempotency record."""
    store.create_project("crawl", {"stages": [{"name": "crawl", "lease_timeout": 60}, "embed"], "max_attempts": 1}, T0)
    store.add_jobs("crawl", [f"u{i}" for i in range(6)], T0, idempotency_key="k1")
    crawler = store.register_worker("crawl", nickname="alice", stage="crawl", now=T0)["token"]
    embedder = store.register_worker("crawl", nickname="bob", stage="embed", now=T0)["token"]
    jobs = store.claim("crawl", crawler, T0, limit=3)
    store.complete_many("crawl", crawler, [{"id": j["id"], "output": j["input"] + "!"} for j in jobs[:2]], T0)
    store.fail("crawl", crawler, jobs[2]["id"], "boom", T0)
    child = store.claim("crawl", embedder, T0)[0]
    store.complete("crawl", embedder, child["id"], {"vec": [1, 2]}, T0)
    store.claim("crawl", crawler, T0, limit=1)  # stays leased across the move
    return {"crawler": crawler, "embedder": embedder}


def normalized(records):
    """Records in an order that does not depend on a store's key order or a dict's."""
    return sorted(records, key=lambda r: (r["type"], json.dumps(r, sort_keys=True)))


def test_a_project_moves_to_postgresql_and_back_and_keeps_working(tmp_path: Path, pg_url: str):
    with Store.open(tmp_path / "a") as raw:
        tokens = populate(JobStore(raw))
        exported = list(export_lmdb(JobStore(raw), "crawl"))
    source = normalized(exported)
    pg = PgJobStore(pg_url)
    try:
        counts = import_pg(pg, iter(exported), T0)
        assert counts["job"] == 8 and counts["worker"] == 2 and counts["result"] == 1
        with pytest.raises(ProjectExists):
            import_pg(pg, iter(exported), T0)
        assert normalized(export_pg(pg, "crawl")) == source
        assert pg.counts("crawl") == [
            {"pending": 2, "leased": 1, "done": 2, "failed": 1, "superseded": 0},
            {"pending": 1, "leased": 0, "done": 1, "failed": 0, "superseded": 0},
        ]
        # The same workers carry on in the new store: the lease held before the move is still theirs.
        held, _ = pg.held_jobs("crawl", tokens["crawler"], T0)
        assert pg.complete("crawl", tokens["crawler"], held[0], "late but valid", T0)["status"] == "done"
        assert [j["input"] for j in pg.claim("crawl", tokens["crawler"], T0, limit=5)] == ["u4", "u5"]
        assert pg.add_jobs("crawl", ["again"], T0, idempotency_key="k1")["repeated"]
        assert pg.add_jobs("crawl", ["new"], T0)["first_id"] == 10  # 9 is the child of the completion above
        assert pg.leaderboard("crawl", T0)["users"][0]["total"] == 3
        back = list(export_pg(pg, "crawl"))
    finally:
        pg.close()
    with Store.open(tmp_path / "b") as raw:
        lmdb = JobStore(raw)
        import_lmdb(lmdb, iter(back), T0)
        assert normalized(export_lmdb(lmdb, "crawl")) == normalized(back)
        assert lmdb.counts("crawl")[0] == {"pending": 1, "leased": 2, "done": 3, "failed": 1, "superseded": 0}
        assert sorted(lmdb.held_jobs("crawl", tokens["crawler"], T0)[0]) == [5, 6]
        assert lmdb.results("crawl")[0]["output"] == {"vec": [1, 2]}


def test_cli_export_import_and_refusals(tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]):
    with Store.open(tmp_path / "a") as raw:
        populate(JobStore(raw))
    dump = tmp_path / "crawl.jsonl"
    assert main(["jobs", "export", "--store", str(tmp_path / "a"), "crawl", "-o", str(dump)]) == 0
    assert main(["jobs", "import", "--store", pg_url, str(dump)]) == 0
    assert "imported" in capsys.readouterr().err
    assert main(["jobs", "import", "--store", pg_url, str(dump)]) == 1  # the project exists there now
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"type": "job"}\n')
    assert main(["jobs", "import", "--store", pg_url, str(bad)]) == 1
    with pytest.raises(InvalidJobRequest):
        list(read_lines([b"{not json\n"]))
