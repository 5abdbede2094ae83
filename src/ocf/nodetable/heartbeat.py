"""Owner-signed heartbeats: liveness that a relay can carry but never extend.

Every node signs ``(owner, time in ms)`` with its identity once per
verification round. Relays pass the latest heartbeat they hold along with
the owner's record; a receiver believes a peer was alive at time T only if
the peer itself signed T. A relay can withhold or replay a heartbeat, which
never makes an entry look younger than the owner last said it was.

Checking an Ed25519 signature is a receiver's costliest step, so it verifies a
heartbeat only when it is newer than the one it holds (which it then caches),
refuses ones dated beyond a small clock skew into the future, and charges
each verification to the sending peer's budget (:class:`TokenBucket`).
"""

from __future__ import annotations

import struct
from typing import Any

import attrs

from ..errors import IdentityError, ValidationError
from ..identity import Identity, PeerId

DOMAIN = b"ocf-nodetable-heartbeat-v1\0"
#: How far ahead of our clock a heartbeat may be dated (clock skew between honest nodes).
FUTURE_SKEW_MS = 30_000


def signing_bytes(owner: PeerId, ms: int) -> bytes:
    return DOMAIN + owner.raw + struct.pack(">Q", ms)


@attrs.frozen
class Heartbeat:
    owner: PeerId
    ms: int
    signature: bytes

    @classmethod
    def create(cls, identity: Identity, ms: int) -> Heartbeat:
        owner = identity.peer_id  # derived from the key on each access
        return cls(owner, ms, identity.sign(signing_bytes(owner, ms)))

    @property
    def seconds(self) -> float:
        return self.ms / 1000.0

    def verify(self) -> bool:
        try:
            return self.owner.verify(signing_bytes(self.owner, self.ms), self.signature)
        except IdentityError:
            return False

    def to_wire(self) -> list[Any]:
        return [self.ms, self.signature.hex()]

    @classmethod
    def from_wire(cls, owner: PeerId, obj: Any) -> Heartbeat:
        try:
            ms, sig = obj
            if (
                not isinstance(ms, int)
                or isinstance(ms, bool)
                or not 0 <= ms < 1 << 63
                or not isinstance(sig, str)
                or len(sig) != 128
            ):
                raise ValueError("bad heartbeat")
            return cls(owner, ms, bytes.fromhex(sig))
        except (TypeError, ValueError):
            raise ValidationError("malformed heartbeat") from None


@attrs.define
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` spends one if there is one."""

    rate: float
    burst: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def take(self, now: float, n: float = 1.0) -> bool:
        self.refill(now)
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


#: The node-wide signature budget's burst, in seconds of its rate: a joiner checks a whole table at once.
TOTAL_VERIFY_BURST = 4.0


def take_both(own: TokenBucket, total: TokenBucket, now: float) -> bool:
    """Spend a token of a peer's bucket and of the node's, or of neither (a refusal costs the peer nothing)."""
    own.refill(now)
    total.refill(now)
    if own.tokens < 1.0 or total.tokens < 1.0:
        return False
    own.tokens -= 1.0
    total.tokens -= 1.0
    return True
