"""Membership updates: what one node claims about another, and what only the owner may claim.

A member's state is ``(incarnation, status)``. ``alive`` and ``left`` come
only from the owner: they carry its Ed25519 signature over the peer ID, the
incarnation, the status, its published load and its addresses, so a relay
can neither resurrect a dead node nor raise an incarnation to silence its
refutations. ``suspect`` and ``dead`` are anyone's opinion and carry no
signature; a receiver believes them only for an incarnation the owner has
signed (see :mod:`swim`), so a hostile peer cannot declare a node dead at an
incarnation the owner could never refute.

Order between two claims about one member: higher incarnation wins; at equal
incarnation ``left`` > ``dead`` > ``suspect`` > ``alive`` (the SWIM rules).
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import struct
from typing import Any, Protocol


from ..errors import ValidationError
from ..strictjson import encodable

DOMAIN = b"ocf-membership-alive-v1\0"
MAX_ADDRS = 4
MAX_ADDR_LEN = 128
MAX_PEER_TEXT = 64
MAX_INCARNATION = (1 << 63) - 1
MAX_LOAD = (1 << 31) - 1


class Status(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3

    @property
    def gone(self) -> bool:
        return self >= Status.DEAD

    @property
    def signed(self) -> bool:
        """Only the owner may say it is alive or has left."""
        return self in (Status.ALIVE, Status.LEFT)


class Verifier(Protocol):
    """Checks an owner's signature (``peer`` is the base58 peer ID text)."""

    def __call__(self, peer: str, data: bytes, signature: bytes) -> bool: ...


class Signer(Protocol):
    def __call__(self, data: bytes) -> bytes: ...


def signing_bytes(peer: str, incarnation: int, status: Status, load: int, addrs: tuple[str, ...]) -> bytes:
    return (
        DOMAIN + peer.encode() + b"\0" + struct.pack(">QBI", incarnation, int(status), load) + "\n".join(addrs).encode()
    )


class Update:
    """One claim about one member; ``signature`` is empty for suspect and dead.

    Immutable. A node holds one of these, signed, for each member it knows:
    the proof its view rests on, sent on in gossip and anti-entropy pages.
    So the signature and the addresses are kept in one bytes object (``_tail``)
    and read back on use: at 1,000 members a separate signature, tuple and
    string per address cost about 100 bytes more a member on every node.
    """

    __slots__ = ("peer", "incarnation", "status", "load", "_tail")

    peer: str
    incarnation: int
    status: Status
    load: int
    _tail: bytes

    def __init__(
        self,
        peer: str,
        incarnation: int,
        status: Status,
        load: int = 0,
        addrs: tuple[str, ...] = (),
        signature: bytes = b"",
    ) -> None:
        if len(signature) > 255:
            raise ValueError("a membership signature is at most 255 bytes")
        tail = [bytes((len(signature),)), signature]
        for addr in addrs:
            raw = addr.encode()
            tail += [struct.pack(">H", len(raw)), raw]
        setattr_ = object.__setattr__
        setattr_(self, "peer", peer)
        setattr_(self, "incarnation", incarnation)
        setattr_(self, "status", status)
        setattr_(self, "load", load)
        setattr_(self, "_tail", b"".join(tail) if len(tail) > 2 or signature else b"")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Update is immutable (cannot set {name})")

    @property
    def signature(self) -> bytes:
        tail = self._tail
        return tail[1 : 1 + tail[0]] if tail else b""

    @property
    def addrs(self) -> tuple[str, ...]:
        tail = self._tail
        if not tail:
            return ()
        out = []
        i = 1 + tail[0]
        while i < len(tail):
            (n,) = struct.unpack_from(">H", tail, i)
            out.append(tail[i + 2 : i + 2 + n].decode())
            i += 2 + n
        return tuple(out)

    def renamed(self, peer: str) -> Update:
        """The same claim with ``peer`` as its name (an equal text: the one object a node keeps)."""
        other = object.__new__(Update)
        for name in self.__slots__:
            object.__setattr__(other, name, getattr(self, name))
        object.__setattr__(other, "peer", peer)
        return other

    def _key(self) -> tuple[str, int, Status, int, bytes]:
        return (self.peer, self.incarnation, self.status, self.load, self._tail)

    def __eq__(self, other: object) -> bool:
        return other._key() == self._key() if isinstance(other, Update) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Update(peer={self.peer!r}, incarnation={self.incarnation!r}, status={self.status!r}, "
            f"load={self.load!r}, addrs={self.addrs!r}, signature={self.signature!r})"
        )

    @classmethod
    def signed(
        cls, sign: Signer, peer: str, incarnation: int, status: Status, load: int, addrs: tuple[str, ...]
    ) -> Update:
        addrs = tuple(addrs[:MAX_ADDRS])
        return cls(peer, incarnation, status, load, addrs, sign(signing_bytes(peer, incarnation, status, load, addrs)))

    def verify(self, verify: Verifier) -> bool:
        if not self.status.signed:
            return True
        data = signing_bytes(self.peer, self.incarnation, self.status, self.load, self.addrs)
        return verify(self.peer, data, self.signature)

    def beats(self, inc: int, status: Status) -> bool:
        """Does this claim override a member held at ``(inc, status)``?"""
        return self.incarnation > inc or (self.incarnation == inc and self.status > status)

    # --- JSON form: [peer, incarnation, status, load, addrs, signature hex] -------------

    def to_wire(self) -> list[Any]:
        if self.status.signed:
            return [self.peer, self.incarnation, int(self.status), self.load, list(self.addrs), self.signature.hex()]
        return [self.peer, self.incarnation, int(self.status)]

    @classmethod
    def from_wire(cls, obj: Any) -> Update:
        """Parse and bound one update; raises ValidationError (signatures are checked by the caller)."""
        if not isinstance(obj, list) or len(obj) not in (3, 6):
            raise ValidationError("membership update is not a 3- or 6-item list")
        peer, inc, status = obj[0], obj[1], obj[2]
        if not isinstance(peer, str) or not 0 < len(peer) <= MAX_PEER_TEXT or not encodable(peer):
            raise ValidationError("membership update names no peer")
        if not _is_int(inc) or not 0 <= inc <= MAX_INCARNATION:
            raise ValidationError("membership incarnation out of range")
        if not _is_int(status) or status not in (0, 1, 2, 3):
            raise ValidationError("membership status out of range")
        st = Status(status)
        if not st.signed:
            if len(obj) != 3:
                raise ValidationError("suspect/dead updates carry no signature")
            return cls(peer, inc, st)
        if len(obj) != 6:
            raise ValidationError("alive/left updates must be signed")
        load, addrs, sig = obj[3], obj[4], obj[5]
        if not _is_int(load) or not 0 <= load <= MAX_LOAD:
            raise ValidationError("membership load out of range")
        if (
            not isinstance(addrs, list)
            or len(addrs) > MAX_ADDRS
            or not all(isinstance(a, str) and len(a) <= MAX_ADDR_LEN and encodable(a) for a in addrs)
        ):
            raise ValidationError("membership addresses malformed")
        if not isinstance(sig, str) or len(sig) != 128:
            raise ValidationError("membership signature malformed")
        try:
            signature = bytes.fromhex(sig)
        except ValueError:
            raise ValidationError("membership signature is not hex") from None
        return cls(peer, inc, st, load, tuple(addrs), signature)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def state_hash(peer: str, incarnation: int, status: Status) -> int:
    """64-bit hash of one member's state; a bucket's digest is the XOR of its members' (updated in O(1))."""
    h = hashlib.blake2b(f"{peer}\0{incarnation}\0{int(status)}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def bucket_of(peer: str, buckets: int) -> int:
    return hashlib.blake2b(peer.encode(), digest_size=2).digest()[0] % buckets


# A digest bucket's members are kept as a sorted list of peer IDs, not a set: at 1,000 members
# a bucket holds about 16, and a set of 16 strings costs 728 bytes (2,264 from 19 on) where a
# list costs about 200. Pages are sent in sorted order anyway.


def bucket_add(members: list[str], peer: str) -> None:
    """Add ``peer`` to a bucket's sorted member list, unless it is there."""
    i = bisect.bisect_left(members, peer)
    if i == len(members) or members[i] != peer:
        members.insert(i, peer)


def bucket_discard(members: list[str], peer: str) -> None:
    """Remove ``peer`` from a bucket's sorted member list, if it is there."""
    i = bisect.bisect_left(members, peer)
    if i < len(members) and members[i] == peer:
        del members[i]
