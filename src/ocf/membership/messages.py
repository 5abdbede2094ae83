"""SWIM messages and their JSON form (varint-length-prefixed, bounded before parsing).

Kinds (``t``): ``ping`` / ``ack`` (``s`` sequence number), ``preq`` (ask the
receiver to ping ``p`` for us and ack ``s``), ``gsp`` (updates only),
``dig`` (anti-entropy: one 64-bit XOR digest per bucket; ``r`` asks for the
receiver's digest back) and ``page`` (every member of bucket ``b``, each as
its owner-signed proof and, when suspected or dead, the opinion on top).
Every kind but ``dig`` and ``page`` carries at most ``max_piggyback``
updates in ``u``; a page carries at most the members of one bucket, capped
at ``MAX_PAGE`` (a receiver drops the excess and counts it), so no message
grows with the membership.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import ProtocolError, ValidationError
from .update import MAX_PEER_TEXT, Update

PROTOCOL = "/ocf/swim/1.0.0"
KINDS = ("ping", "ack", "preq", "gsp", "dig", "page")
BUCKETS = 64
#: Most members a page may carry (a bucket holds about N/64; past this a page is cut and counted).
MAX_PAGE = 256
#: Most updates a receiver reads from one message (the sender's cap is ``max_piggyback``).
MAX_UPDATES = 64


@attrs.frozen
class Ping:
    seq: int
    updates: tuple[Update, ...] = ()


@attrs.frozen
class Ack:
    seq: int
    updates: tuple[Update, ...] = ()


@attrs.frozen
class PingReq:
    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@attrs.frozen
class Gossip:
    updates: tuple[Update, ...] = ()


@attrs.frozen
class Digest:
    hashes: tuple[int, ...]
    reply: bool = False


@attrs.frozen
class Page:
    bucket: int
    #: (owner-signed proof, opinion on top of it or None)
    members: tuple[tuple[Update, Update | None], ...]


Message = Ping | Ack | PingReq | Gossip | Digest | Page


def to_wire(message: Message) -> dict[str, Any]:
    if isinstance(message, Ping | Ack):
        kind = "ping" if isinstance(message, Ping) else "ack"
        return {"t": kind, "s": message.seq, "u": [u.to_wire() for u in message.updates]}
    if isinstance(message, PingReq):
        return {"t": "preq", "s": message.seq, "p": message.target, "u": [u.to_wire() for u in message.updates]}
    if isinstance(message, Gossip):
        return {"t": "gsp", "u": [u.to_wire() for u in message.updates]}
    if isinstance(message, Digest):
        return {"t": "dig", "d": [format(h, "x") for h in message.hashes], "r": message.reply}
    return {
        "t": "page",
        "b": message.bucket,
        "m": [[p.to_wire()] + ([o.to_wire()] if o is not None else []) for p, o in message.members],
    }


def _seq(obj: dict[str, Any]) -> int:
    seq = obj.get("s")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < 1 << 63:
        raise ProtocolError("swim: bad sequence number")
    return seq


def _updates(obj: dict[str, Any]) -> tuple[tuple[Update, ...], int]:
    """The updates of a message (at most MAX_UPDATES) and how many were malformed or cut."""
    items = obj.get("u", [])
    if not isinstance(items, list):
        raise ProtocolError("swim: updates are not a list")
    out, bad = [], max(0, len(items) - MAX_UPDATES)
    for item in items[:MAX_UPDATES]:
        try:
            out.append(Update.from_wire(item))
        except ValidationError:
            bad += 1
    return tuple(out), bad


def from_wire(obj: dict[str, Any]) -> tuple[Message, int]:
    """A decoded message and how many of its items were dropped (malformed or past a cap).

    Raises ProtocolError when the message itself is malformed.
    """
    kind = obj.get("t")
    if kind in ("ping", "ack"):
        updates, bad = _updates(obj)
        return (Ping if kind == "ping" else Ack)(_seq(obj), updates), bad
    if kind == "preq":
        target = obj.get("p")
        if not isinstance(target, str) or not 0 < len(target) <= MAX_PEER_TEXT:
            raise ProtocolError("swim: ping-req without a target")
        updates, bad = _updates(obj)
        return PingReq(_seq(obj), target, updates), bad
    if kind == "gsp":
        updates, bad = _updates(obj)
        return Gossip(updates), bad
    if kind == "dig":
        hashes = obj.get("d")
        if not isinstance(hashes, list) or len(hashes) != BUCKETS:
            raise ProtocolError("swim: digest must have one hash per bucket")
        try:
            values = tuple(int(h, 16) for h in hashes if isinstance(h, str) and len(h) <= 16)
        except ValueError:
            raise ProtocolError("swim: digest hash is not hex") from None
        if len(values) != BUCKETS:
            raise ProtocolError("swim: digest hash malformed")
        return Digest(values, bool(obj.get("r"))), 0
    if kind == "page":
        bucket, items = obj.get("b"), obj.get("m")
        if not isinstance(bucket, int) or not 0 <= bucket < BUCKETS or not isinstance(items, list):
            raise ProtocolError("swim: malformed page")
        members, bad = [], max(0, len(items) - MAX_PAGE)
        for item in items[:MAX_PAGE]:
            try:
                if not isinstance(item, list) or len(item) not in (1, 2):
                    raise ValidationError("page entry")
                proof = Update.from_wire(item[0])
                opinion = Update.from_wire(item[1]) if len(item) == 2 else None
                if not proof.status.signed or (opinion is not None and opinion.peer != proof.peer):
                    raise ValidationError("page entry")
            except ValidationError:
                bad += 1
                continue
            members.append((proof, opinion))
        return Page(bucket, tuple(members)), bad
    raise ProtocolError("swim: unknown message")
