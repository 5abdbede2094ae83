"""The small interfaces one subsystem needs from another, so none imports the other.

``ocf.node`` is the composition root: it builds every subsystem with the few
things that subsystem uses. Where such a thing comes from another subsystem
(the gateway needs "who provides a service" from the node table and "a
stream to a peer" from the transport), its type is a Protocol here, in a leaf
module that imports no subsystem. The layer rules this keeps true are
checked by ``tests/test_layering.py``.
"""

from __future__ import annotations

from typing import Protocol


class RoutedRequest(Protocol):
    """A request the gateway's router classified: its path parameters and what it does."""

    @property
    def action(self) -> str: ...

    def param(self, name: str) -> str: ...
