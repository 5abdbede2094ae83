"""Fuzzing the node table's Automerge boundary: any bytes give a document or a ValidationError.

Raw bytes go into the pre-parser; mutations of real saved entries, with their
chunk checksum repaired so they get past the first check and signed by their
owner so they get past the signature, go through the whole Record.verify.
Anything else escaping (a pyo3 PanicException included) fails the test: the
figure is 0 crashes.
"""

import hashlib
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ocf.errors import ValidationError
from ocf.identity import Identity
from ocf.nodetable import docguard
from ocf.nodetable.record import OwnerDoc, Record, signing_bytes

from ..nodetable.test_docguard import document, rle, sleb, uleb

pytestmark = pytest.mark.timeout(300)

ALICE = Identity.from_seed("alice")
FULL = os.environ.get("OCF_TEST_FULL") == "1"


def _samples() -> list[bytes]:
    """Saved entries of the shapes nodes really publish, one with deflated columns."""
    out = []
    doc = OwnerDoc(ALICE.peer_id)
    doc.update(
        {
            "id": str(ALICE.peer_id),
            "status": "online",
            "service": [{"name": "llm", "identity_group": ["model=m"]}],
            "hardware": {"gpus": [], "cpus": 8},
            "role": ["worker"],
            "addrs": ["/ip4/127.0.0.1/tcp/43905"],
        }
    )
    out.append(doc.doc.save())
    for i in range(40):
        doc.update({"status": f"s{i}", "load": i, "hardware": {"gpus": [{"name": "g", "used_memory": i}], "cpus": 8}})
    out.append(doc.doc.save())
    out.append(doc.compacted().doc.save())
    return out


SAMPLES = _samples()


def repair(data: bytes) -> bytes:
    """Fix a chunk's checksum (first 4 bytes of sha256 over type, length and data) when it has a header."""
    if len(data) < 10 or data[:4] != docguard.MAGIC:
        return data
    return data[:4] + hashlib.sha256(data[8:]).digest()[:4] + data[8:]


def chunk(body: bytes) -> bytes:
    """A document chunk header with a correct length and checksum around ``body``."""
    length = bytearray()
    n = len(body)
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return repair(docguard.MAGIC + b"\0\0\0\0" + b"\0" + bytes(length) + body)


def boundary(data: bytes) -> bool:
    """The whole path a peer's record takes, signed by its owner: returns or raises ValidationError.

    What the node does later with an accepted document (read its fields, count
    its changes for /v1/dnt/stats) must not fail either.
    """
    record = Record(ALICE.peer_id, 1, data, ALICE.sign(signing_bytes(ALICE.peer_id, 1, data)))
    try:
        doc = record.verify()
    except ValidationError:
        return False
    doc.to_dict()
    doc.change_count()
    return True


def mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        pos = rng.randrange(8, len(out)) if len(out) > 8 else 0
        if kind < 0.6 and out:
            out[pos] = rng.randrange(256)
        elif kind < 0.75:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind < 0.9:
            del out[pos : pos + rng.randint(1, 8)]
        elif out:
            out[pos] ^= 1 << rng.randrange(8)
    return repair(bytes(out))


def test_samples_cover_compressed_columns():
    shapes = [docguard.inspect(s) for s in SAMPLES]
    assert all(shape.actors == (ALICE.peer_id.raw,) for shape in shapes)
    assert any(shape.deflated_columns for shape in shapes)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_raw_bytes_into_the_preparser(data):
    try:
        shape = docguard.inspect(data)
    except ValidationError:
        return
    assert shape.decoded_bytes <= docguard.DEFAULT_LIMITS.max_decoded_bytes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1024))
def test_checksummed_chunks_into_the_whole_boundary(body):
    boundary(chunk(body))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.integers(0, 2**32 - 1))
def test_mutated_real_documents_into_the_whole_boundary(sample, seed):
    boundary(mutate(random.Random(seed), sample))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6))
def test_pointed_mutations_of_real_documents(sample, edits):
    out = bytearray(sample)
    for pos, value in edits:
        out[8 + pos % (len(out) - 8)] = value
    boundary(repair(bytes(out)))


@pytest.mark.slow
def test_mutation_soak():
    """Many more mutations (CI: 3,000; OCF_TEST_FULL=1: 50,000): still 0 crashes, and loads do happen."""
    rng = random.Random(20261202)
    loaded = 0
    for _ in range(50_000 if FULL else 3_000):
        loaded += boundary(mutate(rng, rng.choice(SAMPLES)))
    assert loaded > 0  # the mutations are not all refused at the first check


REAL_SPECS = [0x01, 0x03, 0x13, 0x23, 0x35, 0x40, 0x43, 0x56, 0x57, 0x15, 0x21, 0x34, 0x42, 0x80, 0x81, 0x83]


@st.composite
def column_sets(draw):
    """Plausible column sets: real or random specs, run-length or raw data, some deflated."""

    def column():
        spec = draw(st.one_of(st.sampled_from(REAL_SPECS), st.integers(0, 0x1FF)))
        if draw(st.booleans()):
            runs = draw(st.lists(st.tuples(st.integers(-3, 6), st.integers(0, 300)), max_size=6))
            data = b"".join(
                sleb(count) + (uleb(value) if count >= 0 else b"".join(uleb(value) for _ in range(-count)))
                for count, value in runs
            ) or rle((1, 1))
        else:
            data = draw(st.binary(max_size=40))
        return spec | (docguard.DEFLATE_BIT if draw(st.integers(0, 4)) == 0 else 0), data

    changes = sorted((column() for _ in range(draw(st.integers(0, 5)))), key=lambda c: c[0] & ~docguard.DEFLATE_BIT)
    ops = sorted((column() for _ in range(draw(st.integers(0, 8)))), key=lambda c: c[0] & ~docguard.DEFLATE_BIT)
    return changes, ops


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(column_sets(), st.integers(0, 2))
def test_structured_documents_into_the_whole_boundary(columns, heads):
    changes, ops = columns
    boundary(document(actors=(ALICE.peer_id.raw,), heads=heads, change_cols=changes, op_cols=ops))
