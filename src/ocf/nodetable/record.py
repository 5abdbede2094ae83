"""Owner documents and their signed records — the heart of owner-only writes.

Each peer's entry is its own small Automerge document, written only by that
peer (actor ID = its peer ID bytes). What travels between nodes is a
:class:`Record`: the saved document plus a sequence number and the owner's
Ed25519 signature over ``(owner, seq, sha256(document bytes))``. Signing the
bytes rather than anything read out of the document means the signature is
checked *before* the document is parsed: only the owner can make a node load
its document at all. The key is embedded in the owner's peer ID, so the
signature stays valid however many nodes relay it, and nobody but the owner
can produce a newer record.

Verification (:meth:`Record.verify`) is pure: bytes in, verdict out. What
even a valid owner can make a node do is bounded by :mod:`.docguard`.
"""

from __future__ import annotations

import hashlib
import json
import marshal
import struct
import zlib
from collections.abc import Callable
from typing import Any

import attrs
import automerge.core as am

from .. import strictjson
from ..errors import IdentityError, ValidationError
from ..identity import Identity, PeerId
from . import docguard
from .docguard import DEFAULT_LIMITS, DocLimits

# v2 signs the document bytes; v1 signed the heads, which could only be read by loading
# the document first. A v1 signature never verifies as v2, so old records are refused.
DOMAIN = b"ocf-nodetable-record-v2\0"
MAX_SEQ = (1 << 64) - 1  # seq is signed and stored as 8 bytes
# Fields stored as JSON text (explicit Str scalars) rather than nested Automerge objects:
# an entry has one writer, so per-field last-writer-wins is all we need.
JSON_FIELDS = {"role", "addrs", "service", "hardware"}
# An entry has about a dozen fields. Reading one costs the binding tens of microseconds, so
# a document of a thousand keys would cost a node tens of milliseconds to read: refuse it
# after counting its keys, before reading any value.
MAX_FIELDS = 64


# --- packing a frozen entry's fields --------------------------------------------------------
# Entries of one network are alike: the same keys, software version, roles, often the same
# hardware and models. So packed fields are deflated against a preset dictionary of typical
# entries (zlib's zdict), and most of an entry becomes back-references into it: measured, an
# 8-GPU node with two LLM services packs to 209 bytes instead of 945, a CPU-only worker to
# about 35 instead of about 220. Inflating costs about 2 µs. Raw deflate (negative wbits): no
# header or checksum, as only this process ever reads what it packed. The 2 KiB window holds
# the whole dictionary (deflate cannot reach back further than its window).


def _typical(role: str, addrs: list[str], services: list[dict[str, Any]], gpus: list[dict[str, Any]]) -> bytes:
    fields = {
        "addrs": addrs,
        "hardware": {"cpus": 64, "gpus": gpus, "host_memory": 540_000_000_000, "host_memory_used": 12_000_000_000},
        "owner": "",
        "public_address": "",
        "role": [role],
        "service": services,
        "status": "online",
        "version": "0.1.0",
    }
    # Keys in the order a read entry has them (sorted: Automerge keys, JSON written sorted).
    fields = json.loads(json.dumps(fields, sort_keys=True))
    return marshal.dumps((fields, True, tuple(range(len(addrs)))))


_LLM = {
    "hardware": {},
    "host": "localhost",
    "identity_group": ["model=meta-llama/Llama-3.1-8B-Instruct"],
    "name": "llm",
    "port": "8080",
    "status": "healthy",
}
_GPU = {"name": "NVIDIA A100-SXM4-80GB", "total_memory": 81920, "used_memory": 1024}
PACK_DICTIONARY = _typical("worker", ["/ip4/10.0.0.1/tcp/43905", "/ip4/127.0.0.1/tcp/43905"], [], []) + _typical(
    "dispatcher", ["/ip4/10.0.0.1/tcp/43905", "/ip6/::1/tcp/43905"], [_LLM], [_GPU, _GPU]
)
_WBITS = -11


def pack_fields(packed: Any) -> bytes:
    """:mod:`marshal`, deflated against :data:`PACK_DICTIONARY`."""
    c = zlib.compressobj(6, zlib.DEFLATED, _WBITS, 8, zlib.Z_DEFAULT_STRATEGY, PACK_DICTIONARY)
    return c.compress(marshal.dumps(packed)) + c.flush()


def unpack_fields(data: bytes) -> Any:
    """The inverse of :func:`pack_fields`; only ever given bytes this process packed."""
    return marshal.loads(zlib.decompressobj(_WBITS, zdict=PACK_DICTIONARY).decompress(data))  # noqa: S302


def signing_bytes(owner: PeerId, seq: int, doc: bytes) -> bytes:
    return DOMAIN + owner.raw + struct.pack(">Q", seq) + hashlib.sha256(doc).digest()


class OwnerDoc:
    """The Automerge document of one entry, as its owner edits it, or as others read it.

    Only the owner ever edits its document, so a verified copy of anyone
    else's is *read only*: :meth:`Record.verify` reads its fields and history
    length once, keeps the fields packed (:func:`pack_fields`: a quarter of
    their JSON or less) and drops the native document (:meth:`freeze`). A
    native Automerge document costs about 11 KB of native heap even for a
    small entry, and the fields as Python objects about 2.5 KB; packed, a
    GPU node's entry with an LLM service is about 160 bytes and unpacks in
    about 7 µs. A node that knows 1,000 peers holds 1,000 of these. Only
    bytes this process packed are ever unpacked.
    """

    __slots__ = ("owner", "doc", "_fields", "_packed", "_changes", "size", "seq", "seen")

    def __init__(self, owner: PeerId, doc: am.Document | None = None) -> None:
        self.owner = owner
        if doc is None:
            doc = am.Document()
        # A loaded document gets a random actor; the owner's edits must carry its own.
        doc.set_actor(owner.raw)
        self.doc: am.Document | None = doc
        # to_dict() of the current content, read once: reading a document walks the native one
        # every time. The content only changes through update() (a remote change arrives as a new OwnerDoc).
        self._fields: dict[str, Any] | None = None
        # A frozen copy: the fields packed, and the history length.
        self._packed: bytes | None = None
        self._changes = 0
        # Bytes of the signed document the node table holds for this entry (its stats sum them).
        self.size = 0
        # The node table's row for this owner (see NodeTable.records and .last_seen): the seq of
        # the record it holds (0 before the first), and when the owner was last seen (None: never).
        # Kept here, not in two more dicts by owner: about 75 bytes a peer at 1,000 peers.
        self.seq = 0
        self.seen: float | None = None

    def freeze(self) -> OwnerDoc:
        """Keep the fields (packed) and the history length, drop the native document; returns self.

        Raises :class:`ValidationError` when the fields cannot be read.
        """
        if self.doc is not None:
            fields = self._fields if self._fields is not None else self._read()
            self._packed = pack_fields(self._without_own_id(fields))
            self._changes = len(self.doc.get_changes([]))
            self._fields = None
            self.doc = None
        return self

    @property
    def frozen(self) -> bool:
        return self.doc is None

    def update(self, fields: dict[str, Any]) -> bool:
        """Write changed fields in one transaction; returns False when nothing changed."""
        current = self.to_dict()
        changed = {k: v for k, v in fields.items() if current.get(k) != v}
        if not changed:
            return False
        if self.doc is None:
            raise TypeError(f"the entry of {self.owner.short()} is a read-only copy (see OwnerDoc.compacted)")
        with self.doc.transaction() as tx:
            for key, value in changed.items():
                if key in JSON_FIELDS:
                    tx.put(am.ROOT, key, am.ScalarType.Str, json.dumps(value, sort_keys=True, separators=(",", ":")))
                elif isinstance(value, bool):
                    tx.put(am.ROOT, key, am.ScalarType.Boolean, value)
                elif isinstance(value, int):
                    tx.put(am.ROOT, key, am.ScalarType.Int, value)
                elif isinstance(value, float):
                    tx.put(am.ROOT, key, am.ScalarType.F64, value)
                else:
                    tx.put(am.ROOT, key, am.ScalarType.Str, "" if value is None else str(value))
        self._fields = None
        return True

    def to_dict(self) -> dict[str, Any]:
        """The entry's fields, a new dict on each call; nested values (lists, objects) may be shared: read only."""
        if self._packed is not None:
            return self._with_own_id(unpack_fields(self._packed))
        if self._fields is None:
            self._fields = self._read()
        return dict(self._fields)

    # The owner's peer ID text (52 characters) is most of what is not unique to an entry: it is the
    # "id" field and ends every address (".../p2p/<id>"). Packed, it is left out and put back from
    # the owner on unpacking: a third of a typical packed entry. (fields, id left out, the indexes
    # of the addresses whose /p2p/ suffix was) is what is packed.

    def _without_own_id(self, fields: dict[str, Any]) -> tuple[dict[str, Any], bool, tuple[int, ...]]:
        text = str(self.owner)
        out = dict(fields)
        dropped_id = out.get("id") == text
        if dropped_id:
            del out["id"]
        suffix = "/p2p/" + text
        addrs = out.get("addrs")
        cut: tuple[int, ...] = ()
        if isinstance(addrs, list):
            cut = tuple(i for i, a in enumerate(addrs) if isinstance(a, str) and a.endswith(suffix))
            if cut:
                out["addrs"] = [a[: -len(suffix)] if i in cut else a for i, a in enumerate(addrs)]
        return out, dropped_id, cut

    def _with_own_id(self, packed: tuple[dict[str, Any], bool, tuple[int, ...]]) -> dict[str, Any]:
        fields, dropped_id, cut = packed
        text = str(self.owner)
        if dropped_id:
            fields["id"] = text
        if cut:
            addrs = fields["addrs"]
            for i in cut:
                addrs[i] += "/p2p/" + text
        return fields

    def _read(self) -> dict[str, Any]:
        assert self.doc is not None, "a frozen document keeps its fields"
        out: dict[str, Any] = {}
        keys = self.doc.keys(am.ROOT)
        if len(keys) > MAX_FIELDS:
            raise ValidationError(f"entry of {self.owner.short()} has {len(keys)} fields (max {MAX_FIELDS})")
        for key in keys:
            got = self.doc.get(am.ROOT, key)
            if got is None:
                continue
            value = got[0][1] if isinstance(got[0], tuple) else got[0]
            value = value[1] if isinstance(value, tuple) else value
            if not isinstance(value, (str, bool, int, float)):
                continue  # an object or an exotic scalar: never written by an owner, so not a field
            if key in JSON_FIELDS and isinstance(value, str):
                try:
                    value = strictjson.loads(value)  # what the served table could not encode is no field either
                except ValueError:
                    continue
            out[key] = value
        return out

    def change_count(self) -> int:
        return self._changes if self.doc is None else len(self.doc.get_changes([]))

    def compacted(self) -> OwnerDoc:
        """A fresh, editable document with the same content and a one-change history.

        Safe because records replace each other by ``seq``, never by merging:
        the owner may drop its history whenever it likes (bounded size). This
        is also how an owner gets its own entry back into an editable document
        after a restart loaded it, frozen, from the store.
        """
        fresh = OwnerDoc(self.owner)
        fresh.update(self.to_dict())
        fresh.seq, fresh.seen = self.seq, self.seen
        return fresh


@attrs.frozen
class Record:
    """A signed, replicable snapshot of one owner's entry."""

    owner: PeerId
    seq: int
    doc: bytes
    signature: bytes

    @classmethod
    def create(cls, identity: Identity, seq: int, owner_doc: OwnerDoc) -> Record:
        if owner_doc.doc is None:
            raise TypeError("a frozen entry has no document to sign: use its compacted() copy")
        doc = owner_doc.doc.save()
        return cls(identity.peer_id, seq, doc, identity.sign(signing_bytes(identity.peer_id, seq, doc)))

    def verify(self, limits: DocLimits = DEFAULT_LIMITS) -> OwnerDoc:
        """Check size, signature, shape and authorship; return the document's fields (a frozen OwnerDoc).

        Raises :class:`ValidationError` naming what is wrong. The order is the
        point: the cheap size check, then the signature over the exact bytes,
        then :mod:`.docguard`'s pure-Python bounds, and only then the native
        loader. The document's actor table may name only the owner and every
        actor reference must be to it (checked before loading), so a document
        the owner signed cannot smuggle in someone else's history either.
        """
        if len(self.doc) > limits.max_doc_bytes:
            raise ValidationError(
                f"record of {self.owner.short()} is {len(self.doc)} bytes (max {limits.max_doc_bytes})"
            )
        if not 0 <= self.seq <= MAX_SEQ:
            raise ValidationError(f"record of {self.owner.short()} has seq {self.seq} outside 0..2^64-1")
        try:
            self.owner.public_key()
        except IdentityError:
            raise ValidationError(f"owner {self.owner} has no Ed25519 key to verify with") from None
        if not self.owner.verify(signing_bytes(self.owner, self.seq, self.doc), self.signature):
            raise ValidationError(f"record claiming owner {self.owner.short()} is not signed by that peer")
        try:
            doc, _ = docguard.load(self.doc, limits, actor=self.owner.raw)
        except ValidationError as exc:
            raise ValidationError(f"record of {self.owner.short()}: {exc}") from None
        owner_doc = OwnerDoc(self.owner, doc)
        try:
            size = len(json.dumps(owner_doc.to_dict(), separators=(",", ":")))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ValidationError(f"entry of {self.owner.short()} is not JSON: {exc}") from None
        if size > limits.max_entry_bytes:
            raise ValidationError(
                f"entry of {self.owner.short()} is {size} bytes as JSON (max {limits.max_entry_bytes})"
            )
        return owner_doc.freeze()

    # --- binary form (LMDB value and wire) -------------------------------------------

    def to_bytes(self) -> bytes:
        return struct.pack(">QH", self.seq, len(self.signature)) + self.signature + self.doc

    @classmethod
    def from_bytes(cls, owner: PeerId, data: bytes) -> Record:
        if len(data) < 10:
            raise ValidationError("truncated record")
        seq, sig_len = struct.unpack_from(">QH", data)
        if sig_len != 64 or len(data) < 10 + sig_len:
            raise ValidationError("record has a malformed signature")
        return cls(owner, seq, bytes(data[10 + sig_len :]), bytes(data[10 : 10 + sig_len]))

    def to_wire(self) -> dict[str, Any]:
        return {"owner": str(self.owner), "seq": self.seq, "doc": self.doc.hex(), "sig": self.signature.hex()}

    @classmethod
    def from_wire(cls, obj: Any, known: Callable[[str], PeerId | None] | None = None) -> Record:
        """Parse the wire form; ``known`` gives the PeerId already held for an owner text (one object per owner)."""
        try:
            text = obj["owner"]
            owner = known(text) if known is not None and isinstance(text, str) else None
            record = cls(
                owner or PeerId.from_string(text), int(obj["seq"]), bytes.fromhex(obj["doc"]), bytes.fromhex(obj["sig"])
            )
        except (KeyError, TypeError, ValueError, IdentityError) as exc:
            raise ValidationError(f"malformed record: {exc}") from None
        if not 0 <= record.seq <= MAX_SEQ:
            raise ValidationError(f"malformed record: seq {record.seq} outside 0..2^64-1")
        return record
