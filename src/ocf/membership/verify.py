"""Owner-signature checks for membership updates, with a bounded cache of what was checked.

An Ed25519 check costs about as much as everything else a node does with an
update, and gossip delivers the same signed update several times (once per
neighbour that relays it, again in anti-entropy pages), so what verified
once is remembered (by a hash of key, data and signature; never by peer
alone, so a forged variant is always checked). The cache is bounded; an
in-process simulation of many nodes may share one, which its report says.
"""

from __future__ import annotations

import collections
import hashlib

from ..errors import IdentityError
from ..identity import PeerId

#: Entries a node keeps, about 130 bytes each. A node checks a signed update only when it beats the
#: state held for its member (:meth:`Swim.apply` compares first), so a repeat of what was applied
#: never reaches the cache; what does is a proof seen again after its member was forgotten, or a
#: race between relays. 8,192 entries cost 1 MiB per node for those few hits.
DEFAULT_SIZE = 1024


class SignatureCache:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self.size = size
        self._ok: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self.checks = 0
        self.hits = 0

    def __call__(self, peer: str, data: bytes, signature: bytes) -> bool:
        key = hashlib.blake2b(peer.encode() + b"\0" + data + signature, digest_size=16).digest()
        if key in self._ok:
            self._ok.move_to_end(key)
            self.hits += 1
            return True
        self.checks += 1
        try:
            ok = PeerId.from_string(peer).verify(data, signature)
        except IdentityError:
            return False
        if ok:
            self._ok[key] = None
            if len(self._ok) > self.size:
                self._ok.popitem(last=False)
        return ok
