"""Node table records on disk: a few deflated shelves, not one LMDB key per record.

A node keeps every peer's signed record in LMDB, so that a restart knows the
network at once and so that records are sent on from disk, not from memory.
One key per record cost about 0.95 KB of file pages per 0.53 KB record at
1,000 peers, all of them resident (LMDB reads through its map): B-tree leaves
filled to two thirds by random keys, plus the pages recent transactions freed.
That was a quarter of a node's memory.

Records of one network are alike (the same software, fields, models, often
the same hardware), so they are grouped on :data:`SHELVES` shelves and each
shelf is deflated as a whole: what repeats between records is stored once
per shelf, and a shelf fills its pages. Measured, 1,000 records written in
pages of 400 as a joiner gets them:

- records of GPU nodes with an LLM service (592 bytes; Automerge already
  deflates their long values): 705 bytes of file per record, against 1,204
  with one key per record;
- the records of a 300-node simulation, 1,000 of them written three times
  over: 0.43 MiB of file pages and 0.01 MiB of LMDB heap per node, against
  1.04 and 0.07.

The cost is a rewrite of the whole shelf (about 32 records at 1,000 peers,
17 KB before deflating; 128 at the default ``--nodetable.max-entries``) for
any change on it, done off the Trio thread when the store syncs, and a shelf
inflated to read one record back (the table keeps the last one read: sending
records sorted by shelf inflates each shelf once).

Which shelf holds a record is a keyed hash of the owner's peer ID, with a
random salt kept in the store: a peer cannot grind keys to pile records on
one shelf and make every change on it expensive.

Format of a shelf: :data:`VERSION`, then the zlib stream of its entries
sorted by key, each ``key length (1 byte) | value length (4 bytes, big
endian) | key | value``. Keys of older builds (a record per raw peer ID) are
read and moved onto shelves at start.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from collections.abc import Callable, Mapping

from ..errors import ValidationError

SHELVES = 32
#: A transaction rewrites at most this many shelves: LMDB keeps (until the store closes) the
#: pages its largest write transaction dirtied, and each commit is one fsync.
SHELVES_PER_TXN = 2
PREFIX = b"shelf/"
SALT_KEY = b"shelf-salt"
VERSION = b"\x01"
LEVEL = 6
#: An inflated shelf larger than this is damage, not records (4,096 entries of 64 KiB each).
MAX_INFLATED = 256 << 20
_HEAD = struct.Struct(">BI")

Entries = dict[bytes, bytes]


def new_salt() -> bytes:
    return os.urandom(16)


def index(raw: bytes, salt: bytes) -> int:
    """The shelf of the record keyed ``raw`` (an owner's raw peer ID)."""
    return hashlib.blake2b(raw, digest_size=2, key=salt).digest()[1] % SHELVES


def key(i: int) -> bytes:
    return PREFIX + bytes([i])


def is_shelf(k: bytes) -> bool:
    return k.startswith(PREFIX)


def encode(entries: Mapping[bytes, bytes]) -> bytes:
    out = bytearray()
    for k in sorted(entries):
        v = entries[k]
        out += _HEAD.pack(len(k), len(v))
        out += k
        out += v
    return VERSION + zlib.compress(bytes(out), LEVEL)


def decode(data: bytes) -> Entries:
    """The entries of a shelf; raises :class:`ValidationError` for anything that is not a whole one."""
    if data[:1] != VERSION:
        raise ValidationError("not a node table shelf (unknown version)")
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data[1:], MAX_INFLATED)
    except zlib.error as exc:
        raise ValidationError(f"damaged node table shelf: {exc}") from None
    if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise ValidationError("damaged node table shelf: truncated, too large or trailing bytes")
    entries: Entries = {}
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < _HEAD.size:
            raise ValidationError("damaged node table shelf: truncated entry")
        klen, vlen = _HEAD.unpack_from(body, pos)
        pos += _HEAD.size
        if end - pos < klen + vlen:
            raise ValidationError("damaged node table shelf: truncated entry")
        entries[body[pos : pos + klen]] = body[pos + klen : pos + klen + vlen]
        pos += klen + vlen
    return entries


def updater(
    changes: Mapping[bytes, bytes | None], damaged: Callable[[ValidationError], None]
) -> Callable[[bytes | None], bytes | None]:
    """What :meth:`Store.update` calls with a shelf's stored bytes: the shelf with ``changes`` made.

    A value of None removes that entry; an empty shelf is deleted. A damaged
    shelf is reported to ``damaged`` and rewritten from ``changes`` alone
    (what it held was unreadable anyway; its owners resend it).
    """

    def apply(old: bytes | None) -> bytes | None:
        held: Entries = {}
        if old is not None:
            try:
                held = decode(old)
            except ValidationError as exc:
                damaged(exc)
        for k, v in changes.items():
            if v is None:
                held.pop(k, None)
            else:
                held[k] = v
        return encode(held) if held else None

    return apply
