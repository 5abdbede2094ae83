"""The store's typed write scope: a transaction always ends, even when its final counter flush fails."""

from __future__ import annotations

import pytest

from ocf.jobs.store import JobStore
from ocf.jobs.txn import Tx
from ocf.store import Store

T0 = 1_800_000_000.0


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "data") as raw:
        js = JobStore(raw)
        js.create_project("p", {"stages": ["one"]}, T0)
        yield js


def _failing_flush(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = Tx.flush

    def flush(self: Tx) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk full")
        real(self)

    monkeypatch.setattr(Tx, "flush", flush)
    return calls


def test_failed_flush_aborts_and_the_next_write_works(store, monkeypatch):
    calls = _failing_flush(monkeypatch)
    # The error (its traceback, so the transaction's frames) stays referenced: the end must not
    # depend on the garbage collector closing what the scope left open.
    with pytest.raises(OSError) as failed:
        store.add_jobs("p", ["a", "b"], T0)
    # Nothing of the failed transaction is visible, and the writer is free again (not "nested write").
    assert store.counts("p")[0]["pending"] == 0
    assert store.add_jobs("p", ["c"], T0) == {"created": 1, "first_id": 1, "last_id": 1}
    assert store.counts("p")[0]["pending"] == 1 and len(calls) == 2
    assert failed.value.__traceback__ is not None


def test_failed_flush_in_a_batch_rolls_back_that_operation_alone(store, monkeypatch):
    calls = _failing_flush(monkeypatch)
    with store.batch():
        with pytest.raises(OSError) as failed:
            store.add_jobs("p", ["a", "b"], T0)
        store.add_jobs("p", ["c"], T0)
    assert store.counts("p")[0]["pending"] == 1 and len(calls) == 2 and failed.value.__traceback__ is not None
    assert store.job("p", 1)["input"] == "c"
