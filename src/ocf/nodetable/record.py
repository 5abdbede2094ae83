"""Owner documents and their signed records — the heart of owner-only writes.

Each peer's entry is its own small Automerge document, written only by that
peer (actor ID = its peer ID bytes). What travels between nodes is a
:class:`Record`: the saved document plus a sequence number and the owner's
Ed25519 signature over ``(owner, seq, heads)``. Change hashes chain the whole
history, so signing the heads signs every change; the signature is checked
with the key embedded in the owner's peer ID, so it stays valid however many
nodes relay it, and nobody but the owner can produce a newer record.

Verification (:meth:`Record.verify`) is pure: bytes in, verdict out.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import attrs
import automerge.core as am

from ..errors import IdentityError, ValidationError
from ..identity import Identity, PeerId

DOMAIN = b"ocf-nodetable-record-v1\0"
MAX_DOC = 256 * 1024
# Fields stored as JSON text (explicit Str scalars) rather than nested Automerge objects:
# an entry has one writer, so per-field last-writer-wins is all we need.
JSON_FIELDS = {"role", "addrs", "service", "hardware"}


def signing_bytes(owner: PeerId, seq: int, heads: list[bytes]) -> bytes:
    return DOMAIN + owner.raw + struct.pack(">Q", seq) + hashlib.sha256(b"".join(sorted(heads))).digest()


class OwnerDoc:
    """The Automerge document of one entry, as its owner edits it."""

    def __init__(self, owner: PeerId, doc: am.Document | None = None) -> None:
        self.owner = owner
        if doc is None:
            doc = am.Document()
        # A loaded document gets a random actor; the owner's edits must carry its own.
        doc.set_actor(owner.raw)
        self.doc = doc
        # to_dict() of the current content, read once: the routing layer asks for every entry
        # again and again, and reading a document costs about 40 µs. The content only changes
        # through update() (a remote change arrives as a new OwnerDoc).
        self._fields: dict[str, Any] | None = None

    def update(self, fields: dict[str, Any]) -> bool:
        """Write changed fields in one transaction; returns False when nothing changed."""
        current = self.to_dict()
        changed = {k: v for k, v in fields.items() if current.get(k) != v}
        if not changed:
            return False
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
        """The entry's fields: a new dict on each call, whose nested values (lists, objects) are shared: read them only."""
        if self._fields is None:
            self._fields = self._read()
        return dict(self._fields)

    def _read(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.doc.keys(am.ROOT):
            got = self.doc.get(am.ROOT, key)
            if got is None:
                continue
            value = got[0][1] if isinstance(got[0], tuple) else got[0]
            value = value[1] if isinstance(value, tuple) else value
            if key in JSON_FIELDS and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    continue
            out[key] = value
        return out

    def change_count(self) -> int:
        return len(self.doc.get_changes([]))

    def compacted(self) -> "OwnerDoc":
        """A fresh document with the same content and a one-change history.

        Safe because records replace each other by ``seq``, never by merging:
        the owner may drop its history whenever it likes (bounded size).
        """
        fresh = OwnerDoc(self.owner)
        fresh.update(self.to_dict())
        return fresh


@attrs.frozen
class Record:
    """A signed, replicable snapshot of one owner's entry."""

    owner: PeerId
    seq: int
    doc: bytes
    signature: bytes

    @classmethod
    def create(cls, identity: Identity, seq: int, owner_doc: OwnerDoc) -> "Record":
        doc = owner_doc.doc.save()
        heads = owner_doc.doc.get_heads()
        return cls(identity.peer_id, seq, doc, identity.sign(signing_bytes(identity.peer_id, seq, heads)))

    def verify(self) -> OwnerDoc:
        """Check size, signature and authorship; return the loaded document.

        Raises :class:`ValidationError` naming what is wrong. Every change in
        the document must be by the owner's actor, and the signed heads must be
        the document's heads, so a relay cannot add, drop or alter anything.
        """
        if len(self.doc) > MAX_DOC:
            raise ValidationError(f"record of {self.owner.short()} is {len(self.doc)} bytes (max {MAX_DOC})")
        try:
            doc = am.Document.load(self.doc)
        except Exception as exc:  # noqa: BLE001 - the binding raises plain exceptions for bad bytes
            raise ValidationError(f"record of {self.owner.short()} is not an Automerge document: {exc}") from None
        heads = doc.get_heads()
        try:
            self.owner.public_key()
        except IdentityError:
            raise ValidationError(f"owner {self.owner} has no Ed25519 key to verify with") from None
        if not self.owner.verify(signing_bytes(self.owner, self.seq, heads), self.signature):
            raise ValidationError(f"record claiming owner {self.owner.short()} is not signed by that peer")
        for change in doc.get_changes([]):
            if change.actor_id != self.owner.raw or change.other_actor_ids:
                raise ValidationError(f"record of {self.owner.short()} contains a change by another actor")
        return OwnerDoc(self.owner, doc)

    # --- binary form (LMDB value and wire) -------------------------------------------

    def to_bytes(self) -> bytes:
        return struct.pack(">QH", self.seq, len(self.signature)) + self.signature + self.doc

    @classmethod
    def from_bytes(cls, owner: PeerId, data: bytes) -> "Record":
        if len(data) < 10:
            raise ValidationError("truncated record")
        seq, sig_len = struct.unpack_from(">QH", data)
        if sig_len != 64 or len(data) < 10 + sig_len:
            raise ValidationError("record has a malformed signature")
        return cls(owner, seq, bytes(data[10 + sig_len :]), bytes(data[10 : 10 + sig_len]))

    def to_wire(self) -> dict[str, Any]:
        return {"owner": str(self.owner), "seq": self.seq, "doc": self.doc.hex(), "sig": self.signature.hex()}

    @classmethod
    def from_wire(cls, obj: Any) -> "Record":
        try:
            return cls(PeerId.from_string(obj["owner"]), int(obj["seq"]), bytes.fromhex(obj["doc"]), bytes.fromhex(obj["sig"]))
        except (KeyError, TypeError, ValueError, IdentityError) as exc:
            raise ValidationError(f"malformed record: {exc}") from None
