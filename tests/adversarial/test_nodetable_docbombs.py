"""Document bombs against the node table's Automerge boundary (docguard + Record.verify).

A 1.2 KB document can hold a million-character text and a 97 KB one expands
to 100 MB; a crafted one makes the Rust loader panic. Each is refused before
the native parser runs, or (a panic) contained as a ValidationError, with the
peak RSS growth and the time spent at the boundary asserted.
"""

import json
import time
import types

import attrs
import automerge.core as am
import pytest

from ocf.errors import ValidationError
from ocf.identity import Identity
from ocf.nodetable import docguard
from ocf.nodetable.docguard import DEFAULT_LIMITS, DocLimits
from ocf.nodetable.record import OwnerDoc, Record, signing_bytes

pytestmark = pytest.mark.timeout(120)

ALICE, MALLORY = Identity.from_seed("alice"), Identity.from_seed("mallory")
MIB = 1 << 20
# A real saved entry of Alice's with one byte changed and its chunk checksum repaired: it
# passes every structural check, yet the binding's loader panics on it (an assertion in Rust).
PANIC_DOC = bytes.fromhex(
    "856f4a83023cc1f400f5020126002408011220547f74b4f72a9bdc139f0042234733d2acb33590a88b89a2eb2fe2800b8eecfa01"
    "8ef1f7ac8a039c5485aacb445cb077b2e1fecc67350f55bd919e427db8bcd46d0701020302130423024004430456020a15242102"
    "230c34014202560d57990180010a8101028301080b000b017f040a020b007f000a017f0009010b077e0868617264776172650269"
    "640a046c6f61647f07736572766963650b0673746174757318007d047d0509027d6b7f0309021818017ec602c6060a147ed60566"
    "0a267b2263707573223a382c2267707573223a5b5d7d313244334b6f6f5746574438786668684564747379704b55757a41423466"
    "476e774a32535462316d3451637034523678626a7044000102030405060708095b7b226964656e746974795f67726f7570223a5b"
    "226d6f64656c3d6d225d2c226e616d65223a226c6c6d227d5d6f6e6c696e65733073317332733373347335733606377338733902"
    "00090102000a017f0013007f0208027f6d09020a"
)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def peak_growth(fn):
    """Run fn(); return (its peak RSS growth in bytes, CPU seconds, result or exception)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark, so VmHWM is this call's peak
    except OSError:  # pragma: no cover - old kernels: fall back to the RSS after the call
        pass
    base = _status()["VmRSS"]
    start = time.thread_time()  # CPU time of this thread: what the node spends, whatever else runs
    try:
        outcome = fn()
    except BaseException as exc:  # noqa: BLE001 - the outcome is what the test asserts on
        outcome = exc
    elapsed = time.thread_time() - start
    return max(0, _status()["VmHWM"] - base), elapsed, outcome


def signed(identity, data, seq=1):
    return Record(identity.peer_id, seq, data, identity.sign(signing_bytes(identity.peer_id, seq, data)))


@pytest.fixture(scope="module")
def text_bomb():
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        text = tx.put_object(am.ROOT, "status", am.ObjType.Text)
        tx.splice_text(text, 0, 0, "a" * 1_000_000)
    return doc.save()


@pytest.fixture(scope="module")
def memory_bomb():
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        tx.put(am.ROOT, "status", am.ScalarType.Str, "a" * 100_000_000)
    return doc.save()


@pytest.fixture
def load_calls(monkeypatch):
    """Count the calls that reach the native loader (docguard is its only caller)."""
    calls = []
    real = am.Document

    def load(data):
        calls.append(len(data))
        return real.load(data)

    monkeypatch.setattr(docguard, "am", types.SimpleNamespace(Document=types.SimpleNamespace(load=load)))
    return calls


def test_bombs_are_what_the_issue_says(text_bomb, memory_bomb):
    assert len(text_bomb) < 2_000  # a million characters in under 2 KB
    assert len(memory_bomb) < 128 * 1024  # 100 MB of value in under 128 KB


def test_text_bomb_signed_by_its_owner_is_refused_before_loading(text_bomb, load_calls):
    grew, took, outcome = peak_growth(lambda: signed(ALICE, text_bomb).verify())
    assert isinstance(outcome, ValidationError) and ("rows" in str(outcome) or "object" in str(outcome))
    assert load_calls == []
    assert grew < 64 * MIB
    assert took < 0.05


def test_memory_bomb_signed_by_its_owner_is_refused_before_loading(memory_bomb, load_calls):
    # Even with the document-size cap raised past the bomb, the decoded-size budget holds.
    limits = attrs.evolve(DEFAULT_LIMITS, max_doc_bytes=MIB)
    grew, took, outcome = peak_growth(lambda: signed(ALICE, memory_bomb).verify(limits))
    assert isinstance(outcome, ValidationError) and "decoded" in str(outcome)
    assert load_calls == []
    assert grew < 64 * MIB
    assert took < 0.05
    # With the default limits it is refused by size, before its signature is even checked.
    with pytest.raises(ValidationError, match="max"):
        signed(ALICE, memory_bomb).verify()


@pytest.mark.parametrize("who", ["unsigned", "mis-signed", "other owner"])
def test_unsigned_or_missigned_bombs_never_reach_the_loader(text_bomb, memory_bomb, load_calls, who):
    limits = DocLimits(
        max_doc_bytes=MIB, max_decoded_bytes=1 << 30, max_ops=1 << 30, max_changes=1 << 30, max_entry_bytes=1 << 30
    )
    for bomb in (text_bomb, memory_bomb, PANIC_DOC):
        if who == "unsigned":
            record = Record(ALICE.peer_id, 1, bomb, b"\0" * 64)
        elif who == "mis-signed":
            record = Record(ALICE.peer_id, 1, bomb, MALLORY.sign(signing_bytes(ALICE.peer_id, 1, bomb)))
        else:  # Mallory signs a document whose actor is Alice's and publishes it as her own
            record = signed(MALLORY, bomb)
        grew, took, outcome = peak_growth(lambda: record.verify(limits))  # noqa: B023 - called at once
        assert isinstance(outcome, ValidationError), outcome
        assert grew < 64 * MIB and took < 0.05
    assert load_calls == []


def test_a_good_record_does_reach_the_loader(load_calls):
    doc = OwnerDoc(ALICE.peer_id)
    doc.update({"id": str(ALICE.peer_id), "status": "online"})
    assert Record.create(ALICE, 1, doc).verify().to_dict()["status"] == "online"
    assert len(load_calls) == 1


def test_loader_panic_is_contained_at_the_boundary_only():
    shape = docguard.inspect(PANIC_DOC)  # structurally fine: only the native loader objects
    assert shape.actors == (ALICE.peer_id.raw,)
    with pytest.raises(BaseException) as raw:  # noqa: PT011 - the point is that it is not an Exception
        am.Document.load(PANIC_DOC)
    assert not isinstance(raw.value, Exception)
    with pytest.raises(ValidationError, match="panic"):
        signed(ALICE, PANIC_DOC).verify()


def test_boundary_lets_interrupts_and_cancellation_through(monkeypatch):
    def interrupted(data):
        raise KeyboardInterrupt

    monkeypatch.setattr(docguard, "am", types.SimpleNamespace(Document=types.SimpleNamespace(load=interrupted)))
    doc = OwnerDoc(ALICE.peer_id)
    doc.update({"status": "online"})
    with pytest.raises(KeyboardInterrupt):
        Record.create(ALICE, 1, doc).verify()


def test_huge_entry_after_load_is_refused():
    """A compressible 1 MB string fits the document and decoded caps but not the entry cap."""
    doc = OwnerDoc(ALICE.peer_id)
    doc.update({"id": str(ALICE.peer_id), "status": "online", "owner": "x" * 600_000})
    record = Record.create(ALICE, 1, doc)
    assert len(record.doc) < DEFAULT_LIMITS.max_doc_bytes
    with pytest.raises(ValidationError, match="as JSON"):
        record.verify()
    small = OwnerDoc(ALICE.peer_id)
    small.update({"id": str(ALICE.peer_id), "owner": "x" * 20_000})
    assert len(json.dumps(Record.create(ALICE, 1, small).verify().to_dict())) < DEFAULT_LIMITS.max_entry_bytes


def test_long_history_is_refused_by_its_change_count():
    """Changes cost the loader most; a history far beyond compaction is refused before loading."""
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    for i in range(DEFAULT_LIMITS.max_changes + 1):
        with doc.transaction() as tx:
            tx.put(am.ROOT, "load", am.ScalarType.Int, i)
    grew, took, outcome = peak_growth(lambda: signed(ALICE, doc.save()).verify())
    assert isinstance(outcome, ValidationError) and "rows" in str(outcome)
    assert took < 0.05


def test_many_ops_are_refused_by_rows():
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        for i in range(DEFAULT_LIMITS.max_ops + 10):
            tx.put(am.ROOT, "load", am.ScalarType.Int, i)
    with pytest.raises(ValidationError, match="rows"):
        signed(ALICE, doc.save()).verify()


def test_real_entries_stay_far_below_the_limits():
    """A full entry with a history just short of compaction: the defaults leave ample room."""
    doc = OwnerDoc(ALICE.peer_id)
    gpus = [{"name": "NVIDIA H100 80GB HBM3", "total_memory": 81559, "used_memory": i} for i in range(8)]
    services = [
        {"name": "llm", "host": "localhost", "port": "8080", "identity_group": [f"model=m{i}"]} for i in range(16)
    ]
    doc.update(
        {
            "id": str(ALICE.peer_id),
            "status": "online",
            "role": ["worker"],
            "service": services,
            "addrs": [f"/ip4/10.0.0.{i}/tcp/43905" for i in range(8)],
        }
    )
    for i in range(64):
        doc.update(
            {
                "hardware": {"gpus": gpus, "host_memory": 1 << 40, "host_memory_used": i << 30, "cpus": 128},
                "status": "online" if i % 2 else "maintenance",
            }
        )
    record = Record.create(ALICE, 1, doc)
    shape = docguard.inspect(record.doc)
    assert len(record.doc) * 4 < DEFAULT_LIMITS.max_doc_bytes
    assert shape.decoded_bytes * 4 < DEFAULT_LIMITS.max_decoded_bytes
    assert shape.max_rows * 4 < DEFAULT_LIMITS.max_ops
    assert shape.total_rows * 4 < docguard.TOTAL_ROWS_FACTOR * DEFAULT_LIMITS.max_ops
    assert record.verify().to_dict()["service"] == services


def test_the_largest_history_before_compaction_passes():
    """Every field rewritten in each change, up to the compaction point: still well inside the limits."""
    from ocf.nodetable.table import COMPACT_AFTER

    doc = OwnerDoc(ALICE.peer_id)
    for i in range(COMPACT_AFTER + 1):
        text = {key: f"{key}{i}" for key in ("id", "owner", "status", "version", "public_address")}
        doc.update(text | {"role": [str(i)], "addrs": [str(i)], "service": [{"name": str(i)}], "hardware": {"i": i}})
    record = Record.create(ALICE, 1, doc)
    shape = docguard.inspect(record.doc)
    assert shape.max_rows * 1.5 < DEFAULT_LIMITS.max_ops
    assert DEFAULT_LIMITS.max_changes > (COMPACT_AFTER + 1) * 3
    assert shape.total_rows * 2 < docguard.TOTAL_ROWS_FACTOR * DEFAULT_LIMITS.max_ops
    assert record.verify().to_dict()["status"] == f"status{COMPACT_AFTER}"


def test_preparser_work_is_bounded_for_any_document_within_the_size_cap():
    """Many columns of one-byte literals or one-row runs: refused, and quickly (the sum of rows is bounded)."""
    from ..nodetable.test_docguard import document, sleb, uleb

    literal = sleb(-1023) + b"\x01" * 1023
    single_runs = (sleb(1) + uleb(1)) * 1023
    for column in (literal, single_runs):
        data = document(op_cols=[(0x23 | docguard.DEFLATE_BIT, column)] * 32)
        grew, took, outcome = peak_growth(lambda: signed(ALICE, data).verify())  # noqa: B023 - called at once
        assert isinstance(outcome, ValidationError) and "rows in all" in str(outcome)
        assert took < 0.05


@pytest.mark.parametrize("kind", [am.ObjType.Map, am.ObjType.List, am.ObjType.Text])
def test_objects_are_refused_before_loading(kind, load_calls):
    """An entry is a flat map of scalars: an object in it is refused by the pre-parser."""
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        tx.put(am.ROOT, "status", am.ScalarType.Str, "online")
        tx.put_object(am.ROOT, "service", kind)
    with pytest.raises(ValidationError, match="object"):
        signed(ALICE, doc.save()).verify()
    assert load_calls == []


def test_many_fields_are_refused_before_reading_them():
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        for i in range(500):
            tx.put(am.ROOT, f"k{i}", am.ScalarType.Int, i)
    grew, took, outcome = peak_growth(lambda: signed(ALICE, doc.save()).verify())
    assert isinstance(outcome, ValidationError) and "fields" in str(outcome)
    assert took < 0.05


def test_deeply_nested_json_field_is_dropped_not_a_crash():
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        tx.put(am.ROOT, "status", am.ScalarType.Str, "online")
        tx.put(am.ROOT, "service", am.ScalarType.Str, "[" * 200_000 + "]" * 200_000)
    entry = signed(ALICE, doc.save()).verify().to_dict()
    assert entry == {"status": "online"}


@pytest.mark.parametrize(
    "text",
    [
        "[" * 950 + "]" * 950,  # parses where it is verified; serving it a few frames deeper raised RecursionError
        '["llm\\ud800"]',  # a lone surrogate escape: parses, and no response body can encode it
    ],
)
def test_a_json_field_python_cannot_serve_is_dropped(text):
    """A peer's JSON field that json.loads takes but json.dumps (the served table) cannot: every node's
    /v1/dnt/table would answer 500 while the entry is held. Dropped at verification, like any bad field."""
    doc = am.Document()
    doc.set_actor(ALICE.peer_id.raw)
    with doc.transaction() as tx:
        tx.put(am.ROOT, "status", am.ScalarType.Str, "online")
        tx.put(am.ROOT, "service", am.ScalarType.Str, text)
    entry = signed(ALICE, doc.save()).verify().to_dict()
    assert entry == {"status": "online"}
    json.dumps(entry, ensure_ascii=False).encode()
