"""The untrusted-input boundary in front of Automerge's native loader.

``automerge.core.Document.load`` is Rust behind pyo3: it can panic on crafted
bytes (pyo3 raises ``PanicException``, a ``BaseException`` that no
``except Exception`` stops), and it faithfully expands whatever a valid
document describes: deflate-compressed columns and run-length-encoded rows
let a 1 KB document hold a million-character text or 100 MB of values.
A signature only proves who wrote a document, not that it is reasonable, so
even an owner's document passes through here first.

:func:`inspect` is a small pure-Python reader of the Automerge binary
*document chunk* (magic, checksum, chunk type, LEB128 lengths, column
metadata, column data; see the Automerge storage format specification). It
inflates compressed columns with a bounded ``decompressobj`` (never more
than the decoded budget), counts the rows of every run-length, delta and
boolean column *without* expanding them, and refuses anything over the
limits, before the native parser sees a byte. It is total: any input gives
a :class:`DocShape` or a :class:`ValidationError`, in time and memory
proportional to the (bounded) decoded size.

:func:`load` is the one place the native loader is called for untrusted
bytes, and the one place its panics are contained.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable

import attrs
import automerge.core as am

from ..config import Config
from ..errors import ValidationError

MAGIC = b"\x85\x6f\x4a\x83"
CHUNK_DOCUMENT = 0
# Column types (low three bits of a column specification).
GROUP, ACTOR, INTEGER, DELTA, BOOLEAN, STRING, VALUE_META, VALUE = range(8)
DEFLATE_BIT = 0x08
# The ops columns that say what an op does and what kind of value it holds. A node-table
# entry is a flat map of scalars written with "set": no objects (maps, lists, texts), no
# counters, timestamps or byte strings, which the binding reads back unevenly (some panic).
OP_ACTION = 0x42
OP_VALUE_META = 0x56
ACTION_SET = 1
VALUE_TYPES = frozenset({0, 1, 2, 4, 5, 6})  # null, false, true, signed int, float, UTF-8 string
MAX_LEB_BYTES = 10  # a u64 needs at most ten 7-bit groups
# The format defines 9 change columns and 16 op columns; room to spare, but not thousands.
MAX_COLUMNS = 32
# Rows of all columns together, in units of --max-record-ops: each row costs the
# pre-parser a little Python, so the sum (not only each column) must be bounded.
TOTAL_ROWS_FACTOR = 16
MAX_U64 = (1 << 64) - 1


@attrs.frozen
class DocLimits:
    """What a node lets any one document make it do (the ``max-record-*`` settings)."""

    max_doc_bytes: int
    max_decoded_bytes: int
    max_ops: int
    max_changes: int
    max_entry_bytes: int

    @classmethod
    def from_config(cls, config: Config) -> DocLimits:
        return cls(
            max_doc_bytes=config.nodetable_max_doc_bytes,
            max_decoded_bytes=config.nodetable_max_decoded_bytes,
            max_ops=config.nodetable_max_ops,
            max_changes=config.nodetable_max_changes,
            max_entry_bytes=config.nodetable_max_entry_bytes,
        )


DEFAULT_LIMITS = DocLimits.from_config(Config())


@attrs.frozen
class DocShape:
    """What :func:`inspect` learned without loading: enough to refuse early and to test."""

    actors: tuple[bytes, ...]
    heads: int
    decoded_bytes: int
    max_rows: int
    total_rows: int
    deflated_columns: int


class _Reader:
    """A cursor over bytes whose every read is bounds-checked (raises ValidationError)."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise ValidationError("document: truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def _leb(self) -> tuple[int, int, int]:
        """The bits of a multi-byte LEB128 as (value, bits read, last byte); signedness is the caller's."""
        value = shift = 0
        for _ in range(MAX_LEB_BYTES):
            if self.pos >= self.end:
                raise ValidationError("document: truncated LEB128")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, shift, byte
        raise ValidationError("document: LEB128 too long")

    def uleb(self) -> int:
        pos = self.pos
        if pos < self.end and self.data[pos] < 0x80:  # most values fit in one byte
            self.pos = pos + 1
            return self.data[pos]
        value, _, _ = self._leb()
        if value > MAX_U64:
            raise ValidationError("document: LEB128 overflows 64 bits")
        return value

    def sleb(self) -> int:
        pos = self.pos
        if pos < self.end and self.data[pos] < 0x80:
            self.pos = pos + 1
            byte = self.data[pos]
            return byte - 0x80 if byte & 0x40 else byte
        value, shift, byte = self._leb()
        if byte & 0x40:
            value -= 1 << shift
        if not -(1 << 63) <= value <= (1 << 63) - 1:
            raise ValidationError("document: LEB128 overflows 64 bits")
        return value


def _inflate(raw: bytes, budget: int) -> bytes:
    """Raw DEFLATE (as Automerge writes it), refusing output beyond ``budget`` bytes."""
    if budget <= 0:
        raise ValidationError("document decodes beyond the decoded-size limit")
    inflater = zlib.decompressobj(wbits=-15)
    try:
        out = inflater.decompress(raw, budget + 1)
    except zlib.error as exc:
        raise ValidationError(f"document: bad compressed column ({exc})") from None
    if len(out) > budget or inflater.unconsumed_tail:
        raise ValidationError("document: a compressed column expands beyond the decoded-size limit")
    if not inflater.eof or inflater.unused_data:
        raise ValidationError("document: a compressed column is truncated or has trailing bytes")
    return out


def _rle_rows(
    data: bytes, col_type: int, max_rows: int, check: Callable[[int], None] | None = None
) -> tuple[int, int, int]:
    """Rows in a run-length column, the bytes its repeated values expand to, and its total.

    Runs: a positive count repeats the next value, zero starts a run of nulls
    (its length follows), a negative count is that many literal values. With
    ``check``, every (integer) value is passed to it (it raises). The total is what other
    columns must agree with: for a group column the sum of its values (rows
    of the grouped columns), for value metadata the sum of the value lengths
    (bytes of the raw value column).
    """
    reader = _Reader(data)
    rows = expanded = total = 0
    while reader.left():
        count = reader.sleb()
        if count > 0:
            size, weight = _value(reader, col_type, check)
            expanded += (count - 1) * size
            total += count * weight
        elif count == 0:
            count = reader.uleb()
            if not count:
                raise ValidationError("document: an empty run (Automerge never writes one)")
        else:
            count = -count
            if count > max_rows:
                raise ValidationError(f"document: a column has more than {max_rows} rows")
            for _ in range(count):
                total += _value(reader, col_type, check)[1]
        rows += count
        if rows > max_rows:
            raise ValidationError(f"document: a column has more than {max_rows} rows")
    return rows, expanded, total


def _value(reader: _Reader, col_type: int, check: Callable[[int], None] | None) -> tuple[int, int]:
    """Skip one value of a run-length column; return its byte size and its weight in the total."""
    if col_type == STRING:
        length = reader.uleb()
        reader.take(length)
        return length, 0
    value = reader.sleb() if col_type == DELTA else reader.uleb()
    if check is not None:
        check(value)
    if col_type == GROUP:
        return 8, value
    if col_type == VALUE_META:
        return 8, value >> 4
    return 8, 0


def _boolean_rows(data: bytes, max_rows: int) -> int:
    """Alternating run lengths, falses first: only that first run may be empty."""
    reader = _Reader(data)
    rows = 0
    first = True
    while reader.left():
        count = reader.uleb()
        if not count and not first:
            raise ValidationError("document: an empty run (Automerge never writes one)")
        first = False
        rows += count
        if rows > max_rows:
            raise ValidationError(f"document: a column has more than {max_rows} rows")
    return rows


def _consistent(columns: list[tuple[int, int, int]]) -> None:
    """Columns that describe each other must agree: (specification, rows, total) per column.

    A group column's total is the row count of the columns grouped under it; a
    value-metadata column's total is the byte length of its raw value column.
    Disagreement is what makes the native decoder slice past a column's end.
    """
    by_id: dict[int, list[tuple[int, int, int]]] = {}
    for spec, rows, total in columns:
        by_id.setdefault(spec >> 4, []).append((spec & 0x07, rows, total))
    for group in by_id.values():
        kinds = [kind for kind, _, _ in group]
        if kinds[0] == GROUP:
            expected = group[0][2]
            for kind, rows, _ in group[1:]:
                if kind != VALUE and rows != expected:
                    raise ValidationError("document: a group column disagrees with its grouped columns")
        if VALUE_META in kinds:
            declared = next(total for kind, _, total in group if kind == VALUE_META)
            actual = sum(total for kind, _, total in group if kind == VALUE)
            if declared != actual:
                raise ValidationError("document: value lengths disagree with the value column")


def _check_action(action: int) -> None:
    if action != ACTION_SET:
        raise ValidationError("document holds an object or an op a node-table entry never has")


def _check_value_meta(meta: int) -> None:
    if meta & 0x0F not in VALUE_TYPES:
        raise ValidationError("document holds a value kind a node-table entry never has")


def _columns(reader: _Reader) -> list[tuple[int, int]]:
    """Column metadata: (specification, byte length) pairs, in the order their data follows."""
    count = reader.uleb()
    if count > MAX_COLUMNS:
        raise ValidationError(f"document has {count} columns in one set (max {MAX_COLUMNS})")
    out = []
    for _ in range(count):
        spec = reader.uleb()
        if spec > 0xFFFFFFFF:
            raise ValidationError("document: column specification overflows 32 bits")
        out.append((spec, reader.uleb()))
    normalized = [spec & ~DEFLATE_BIT for spec, _ in out]
    if normalized != sorted(normalized):
        raise ValidationError("document: columns are not in normal order")
    return out


def inspect(data: bytes, limits: DocLimits = DEFAULT_LIMITS, actor: bytes | None = None) -> DocShape:
    """Check ``data`` is one Automerge document chunk within ``limits``; never loads it.

    With ``actor``, the actor table may name only that actor (a node-table
    document has a single writer): checked before any column is decoded.
    """
    if len(data) > limits.max_doc_bytes:
        raise ValidationError(f"document is {len(data)} bytes (max {limits.max_doc_bytes})")
    reader = _Reader(bytes(data))
    _header(reader)
    actors = _actors(reader, actor)
    head_count = reader.uleb()
    if head_count * 32 > reader.left():
        raise ValidationError("document: head count exceeds the data")
    reader.take(32 * head_count)
    change_cols = _columns(reader)
    op_cols = _columns(reader)
    shape = _Tally(decoded=reader.pos)
    # Changes cost the loader most (it rebuilds and hashes each one), so they have their own cap.
    shape.add(reader, change_cols, limits, len(actors), {}, min(limits.max_changes, limits.max_ops))
    shape.add(
        reader,
        op_cols,
        limits,
        len(actors),
        {OP_ACTION: _check_action, OP_VALUE_META: _check_value_meta},
        limits.max_ops,
    )
    for _ in range(head_count if reader.left() else 0):  # head indices; absent in old saves
        reader.uleb()
    if reader.left():
        raise ValidationError("document: trailing bytes after the head indices")
    return DocShape(
        actors=actors,
        heads=head_count,
        decoded_bytes=shape.decoded,
        max_rows=shape.max_rows,
        total_rows=shape.total_rows,
        deflated_columns=shape.deflated,
    )


def _header(reader: _Reader) -> None:
    """Magic, checksum, chunk type and length: exactly one document chunk, nothing after it."""
    if reader.take(4) != MAGIC:
        raise ValidationError("document: not an Automerge chunk (bad magic)")
    checksum = reader.take(4)
    type_at = reader.pos
    if reader.take(1)[0] != CHUNK_DOCUMENT:
        raise ValidationError("document: only a single document chunk is accepted")
    if reader.uleb() != reader.left():
        raise ValidationError("document: chunk length does not match the data (one chunk, nothing after it)")
    if hashlib.sha256(reader.data[type_at:]).digest()[:4] != checksum:
        raise ValidationError("document: chunk checksum mismatch")


def _actors(reader: _Reader, actor: bytes | None) -> tuple[bytes, ...]:
    count = reader.uleb()
    if count > reader.left():
        raise ValidationError("document: actor count exceeds the data")
    listed = []
    for _ in range(count):
        listed.append(reader.take(reader.uleb()))
        if actor is not None and listed[-1] != actor:  # refuse at once, not after reading them all
            raise ValidationError("document names another actor besides its owner")
    return tuple(listed)


@attrs.define
class _Tally:
    """What the column data adds up to so far, checked against the limits as it grows."""

    decoded: int
    max_rows: int = 0
    total_rows: int = 0
    deflated: int = 0

    def add(
        self,
        reader: _Reader,
        columns: list[tuple[int, int]],
        limits: DocLimits,
        actor_count: int,
        checks: dict[int, Callable[[int], None]],
        max_rows: int,
    ) -> None:
        """Decode one set of columns (changes or ops) within the budgets."""

        def known_actor(index: int) -> None:
            if index >= actor_count:
                raise ValidationError("document refers to an actor it does not list")

        budget, row_budget = limits.max_decoded_bytes, TOTAL_ROWS_FACTOR * limits.max_ops
        seen: list[tuple[int, int, int]] = []
        for spec, size in columns:
            col_type = spec & 0x07
            check = known_actor if col_type == ACTOR else checks.get(spec & ~DEFLATE_BIT)
            raw = reader.take(size)
            if spec & DEFLATE_BIT:
                self.deflated += 1
                raw = _inflate(raw, budget - self.decoded)
            self.decoded += len(raw)
            total = 0
            if col_type == BOOLEAN:
                rows = _boolean_rows(raw, max_rows)
            elif col_type == VALUE:
                rows, total = 0, len(raw)
            else:
                rows, expanded, total = _rle_rows(raw, col_type, max_rows, check)
                self.decoded += expanded
            seen.append((spec, rows, total))
            self.max_rows = max(self.max_rows, rows)
            self.total_rows += rows
            if self.total_rows > row_budget:
                raise ValidationError(f"document has more than {row_budget} rows in all its columns")
            if self.decoded > budget:
                raise ValidationError(f"document decodes to more than {budget} bytes")
        _consistent(seen)


def _is_panic(exc: BaseException) -> bool:
    """pyo3's PanicException: not importable by name, recognised by its home module."""
    kind = type(exc)
    return kind.__name__ == "PanicException" and kind.__module__ == "pyo3_runtime"


def load(data: bytes, limits: DocLimits = DEFAULT_LIMITS, actor: bytes | None = None) -> tuple[am.Document, DocShape]:
    """Inspect, then load with the binding; every failure, a panic included, is a ValidationError."""
    shape = inspect(data, limits, actor)
    try:
        doc = am.Document.load(bytes(data))
    except Exception as exc:  # noqa: BLE001 - the binding raises plain exceptions for bad bytes
        raise ValidationError(f"document does not load: {exc}") from None
    except BaseException as exc:
        # The only BaseException swallowed anywhere: a Rust panic in the loader is a bad
        # document, not a reason to stop the node. Cancellation and interrupts pass.
        if not _is_panic(exc):
            raise
        raise ValidationError(f"document makes the Automerge loader panic: {exc}") from None
    return doc, shape
