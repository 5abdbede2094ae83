"""The Automerge document pre-parser, rule by rule, on hand-built document chunks."""

import hashlib
import zlib

import pytest
from hypothesis import given, strategies as st

from ocf.errors import ValidationError
from ocf.identity import Identity
from ocf.nodetable import docguard
from ocf.nodetable.docguard import DEFAULT_LIMITS, DocLimits, inspect
from ocf.nodetable.record import OwnerDoc

ALICE = Identity.from_seed("alice")
ACTOR = ALICE.peer_id.raw


def uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        done = (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


def rle(*runs) -> bytes:
    """runs: (count, value) repeats, (0, n) nulls, ("lit", [values]) literals; uLEB values."""
    out = b""
    for count, value in runs:
        if count == "lit":
            out += sleb(-len(value)) + b"".join(uleb(v) for v in value)
        elif count == 0:
            out += sleb(0) + uleb(value)
        else:
            out += sleb(count) + uleb(value)
    return out


def document(
    actors=(ACTOR,), heads=1, change_cols=(), op_cols=(), suffix=None, chunk_type=0, claimed_heads=None
) -> bytes:
    """A document chunk; columns are (spec, raw bytes), deflated when spec has the deflate bit."""
    body = uleb(len(actors)) + b"".join(uleb(len(a)) + a for a in actors)
    body += uleb(heads if claimed_heads is None else claimed_heads) + b"\x11" * 32 * heads
    datas = []
    for cols in (change_cols, op_cols):
        body += uleb(len(cols))
        for spec, raw in cols:
            if spec & docguard.DEFLATE_BIT:
                packer = zlib.compressobj(wbits=-15)
                raw = packer.compress(raw) + packer.flush()
            body += uleb(spec) + uleb(len(raw))
            datas.append(raw)
    body += b"".join(datas)
    body += uleb(0) * heads if suffix is None else suffix
    head = bytes([chunk_type]) + uleb(len(body))
    return docguard.MAGIC + hashlib.sha256(head + body).digest()[:4] + head + body


# One op: set ROOT key "k" to the string "v" (id 1@actor 0), in one change.
CHANGES = [(0x01, rle((1, 0))), (0x03, rle((1, 1))), (0x13, rle((1, 1)))]
OPS = [
    (0x15, sleb(1) + uleb(1) + b"k"),
    (0x21, rle((1, 0))),
    (0x23, rle((1, 1))),
    (0x42, rle((1, 1))),
    (0x56, rle((1, 1 << 4 | 6))),
    (0x57, b"v"),
]


def test_a_minimal_entry_shaped_document_passes():
    shape = inspect(document(change_cols=CHANGES, op_cols=OPS))
    assert shape.actors == (ACTOR,) and shape.heads == 1 and shape.max_rows == 1


def test_real_documents_pass():
    doc = OwnerDoc(ALICE.peer_id)
    doc.update({"id": "x", "status": "online", "load": 3, "hardware": {"gpus": []}, "role": ["worker"]})
    assert inspect(doc.doc.save(), actor=ACTOR).max_rows >= 5


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "truncated"),
        (b"\x85\x6f\x4a\x84" + b"\0" * 20, "magic"),
        (document(change_cols=CHANGES, op_cols=OPS, chunk_type=1), "single document chunk"),
        (document(change_cols=CHANGES, op_cols=OPS) * 2, "one chunk"),
        (document(change_cols=CHANGES, op_cols=OPS)[:-1], "chunk length"),
        (document(claimed_heads=1 << 40), "head count"),
        (document(suffix=b"\x80" * 11), "LEB128 too long"),
        (document(suffix=b"\0\0"), "trailing"),
        (document(op_cols=[(0x23, b""), (0x21, b"")]), "normal order"),
        (document(op_cols=[(0x42, rle((1, 2)))]), "object"),  # makeList
        (document(op_cols=[(0x56, rle((1, 8))), (0x57, b"")]), "value kind"),  # a counter
        (document(op_cols=[(0x56, rle((1, 5 << 4 | 6))), (0x57, b"abc")]), "value lengths"),
        (document(op_cols=[(0x80, rle((1, 2))), (0x81, rle((1, 0)))]), "group"),
        (document(op_cols=[(0x21, rle((1, 1)))]), "does not list"),  # actor index 1 of 1
        (document(op_cols=[(0x23, sleb(2_000_000) + sleb(1))]), "rows"),
        (document(op_cols=[(0x23, sleb(0) + uleb(1 << 62))]), "rows"),
        (document(op_cols=[(0x34, uleb(5000))]), "rows"),  # a boolean column
        (document(op_cols=[(0x15, sleb(1) + uleb(100) + b"k")]), "truncated"),
        (document(op_cols=[(0x57 | 8, b"\0" * (2 << 20))]), "decoded-size"),
        (document(op_cols=[(0x15 | 8, sleb(5) + uleb(400_000) + b"k" * 400_000)]), "decodes to more"),
        (document(op_cols=[(0x57 | 8, b"v")])[:-3] + b"\xff\xff\xff", "compressed"),
        (document(actors=(ACTOR, b"mallory")), "another actor"),
        (document(op_cols=[(0x23, sleb(0) + uleb(0))]), "empty run"),
        (document(op_cols=[(0x34, uleb(0) + uleb(1) + uleb(0))]), "empty run"),
        (document(op_cols=[(0x23, rle((1, 1)))] * 33), "columns in one set"),
        (document(op_cols=[(0x23, sleb(-1000) + b"\x01" * 1000)] * 17), "rows in all"),
        (document(change_cols=[(0x03, sleb(-300) + b"\x01" * 300)]), "more than 256 rows"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_each_rule(data, reason):
    data = data if data[:4] != docguard.MAGIC or reason in ("magic",) else _fix(data)
    with pytest.raises(ValidationError, match=reason):
        inspect(data, actor=ACTOR)


def _fix(data: bytes) -> bytes:
    """Repair the checksum after surgery, so each case meets the rule it is about."""
    return data[:4] + hashlib.sha256(data[8:]).digest()[:4] + data[8:]


def test_bad_checksum_is_refused():
    data = bytearray(document(change_cols=CHANGES, op_cols=OPS))
    data[4] ^= 1
    with pytest.raises(ValidationError, match="checksum"):
        inspect(bytes(data))


def test_size_cap_comes_first():
    with pytest.raises(ValidationError, match="max"):
        inspect(b"\0" * (DEFAULT_LIMITS.max_doc_bytes + 1))


def test_limits_are_settings():
    from ocf.config import load

    cfg = load({"max-record-size": "8K", "max-record-ops": "100", "max-record-changes": "10"}, env={})
    limits = DocLimits.from_config(cfg)
    assert limits.max_doc_bytes == 8192 and limits.max_ops == 100 and limits.max_changes == 10
    assert DEFAULT_LIMITS.max_ops == 1024 and DEFAULT_LIMITS.max_doc_bytes == 64 * 1024


@given(st.integers(0, (1 << 64) - 1), st.integers(-(1 << 63), (1 << 63) - 1))
def test_leb128_reads_what_the_format_writes(unsigned, signed):
    reader = docguard._Reader(uleb(unsigned) + sleb(signed))
    assert reader.uleb() == unsigned and reader.sleb() == signed and reader.left() == 0
