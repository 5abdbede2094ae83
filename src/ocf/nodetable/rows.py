"""Two columns of the node table's rows, read and written as dicts keyed by owner.

A node keeps one :class:`~ocf.nodetable.record.OwnerDoc` per owner it
holds a record of. The seq of that record and when the owner was last seen
live on it (``seq``, ``seen``) rather than in two more dicts by owner: at
1,000 peers a dict costs about 37 bytes a peer, and every node holds one
row per peer. These views keep the dict-shaped API the table's callers
(sync, intake, tests) were written against.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, TypeVar, overload

if TYPE_CHECKING:
    from ..identity import PeerId
    from .record import OwnerDoc

__all__ = ["LastSeen", "Seqs"]

_T = TypeVar("_T")


class Seqs(Mapping["PeerId", int]):
    """``owner -> seq`` of every record held, exactly the owners in ``docs`` (read only: rows are written by insert)."""

    __slots__ = ("_docs",)

    def __init__(self, docs: dict[PeerId, OwnerDoc]) -> None:
        self._docs = docs

    def __getitem__(self, owner: PeerId) -> int:
        return self._docs[owner].seq

    def __contains__(self, owner: object) -> bool:
        return owner in self._docs

    def __iter__(self) -> Iterator[PeerId]:
        return iter(self._docs)

    def __len__(self) -> int:
        return len(self._docs)

    @overload
    def get(self, owner: PeerId, /) -> int | None: ...
    @overload
    def get(self, owner: PeerId, /, default: int | _T) -> int | _T: ...
    def get(self, owner: PeerId, /, default: object = None) -> object:
        doc = self._docs.get(owner)
        return default if doc is None else doc.seq


class LastSeen(MutableMapping["PeerId", float]):
    """``owner -> when last seen``, for owners held and seen at least once.

    Setting it for an owner the table holds no record of raises KeyError:
    liveness is only ever kept for rows that exist, so unknown IDs cost nothing.
    """

    __slots__ = ("_docs",)

    def __init__(self, docs: dict[PeerId, OwnerDoc]) -> None:
        self._docs = docs

    def __getitem__(self, owner: PeerId) -> float:
        seen = self._docs[owner].seen
        if seen is None:
            raise KeyError(owner)
        return seen

    def __setitem__(self, owner: PeerId, when: float) -> None:
        self._docs[owner].seen = when

    def __delitem__(self, owner: PeerId) -> None:
        doc = self._docs[owner]
        if doc.seen is None:
            raise KeyError(owner)
        doc.seen = None

    def __contains__(self, owner: object) -> bool:
        doc = self._docs.get(owner)  # type: ignore[call-overload]
        return doc is not None and doc.seen is not None

    def __iter__(self) -> Iterator[PeerId]:
        return (owner for owner, doc in self._docs.items() if doc.seen is not None)

    def __len__(self) -> int:
        return sum(1 for doc in self._docs.values() if doc.seen is not None)

    @overload
    def get(self, owner: PeerId, /) -> float | None: ...
    @overload
    def get(self, owner: PeerId, /, default: float | _T) -> float | _T: ...
    def get(self, owner: PeerId, /, default: object = None) -> object:
        doc = self._docs.get(owner)
        if doc is None or doc.seen is None:
            return default
        return doc.seen
