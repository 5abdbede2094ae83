"""libp2p's connection upgrade: the security step and protocol negotiation.

A raw connection becomes a peer connection in three steps: multistream-select
``/noise``, the Noise XX handshake (which authenticates the peer ID), and
multistream-select ``/yamux/1.0.0``. In a private network (``--network-key``)
the pnet cipher (:mod:`ocf.transport.pnet`) goes under all three, and a peer
without the key is refused on its first bytes. The host takes an
:class:`Upgrader` so that tests and the attack harness can swap the steps.
"""

from __future__ import annotations

from typing import Protocol
from collections.abc import Sequence

import trio

from ..config import Config
from ..errors import PrivateNetworkRefused
from ..identity import Identity, PeerId
from . import pnet, secure


class Upgrader(Protocol):
    """Security and protocol negotiation; the default is libp2p's (see :class:`Libp2pUpgrader`)."""

    async def secure(
        self, stream: trio.abc.Stream, *, initiator: bool, expected: PeerId | None
    ) -> tuple[trio.abc.Stream, PeerId]: ...

    async def select(self, stream: trio.abc.Stream, protocols: Sequence[str]) -> str: ...

    async def handle(self, stream: trio.abc.Stream, protocols: Sequence[str]) -> str: ...


NOISE = "/noise"
YAMUX = "/yamux/1.0.0"


def default_upgrader(identity: Identity, config: Config | None = None) -> Upgrader:
    """libp2p's upgrade: multistream ``/noise`` -> Noise XX -> multistream ``/yamux/1.0.0``,
    behind the private network's cipher when ``config.network_key`` is set."""
    key = config.network_key if config is not None else None
    return Libp2pUpgrader(identity, pnet.protector_for(key) if key is not None else None)


class Libp2pUpgrader:
    """The security step and protocol negotiation, as one object (see :class:`Upgrader`)."""

    def __init__(self, identity: Identity, protector: pnet.Protector | None = None) -> None:
        self.identity = identity
        self.protector = protector

    async def secure(
        self, stream: trio.abc.Stream, *, initiator: bool, expected: PeerId | None
    ) -> tuple[trio.abc.Stream, PeerId]:
        if self.protector is not None:
            # The private network's cipher goes under everything, multistream included.
            try:
                return await self._secure(
                    await self.protector.protect(stream, initiator=initiator), initiator=initiator, expected=expected
                )
            except PrivateNetworkRefused as exc:
                self.protector.refused(exc, inbound=not initiator)
                raise
        return await self._secure(stream, initiator=initiator, expected=expected)

    async def _secure(
        self, stream: trio.abc.Stream, *, initiator: bool, expected: PeerId | None
    ) -> tuple[trio.abc.Stream, PeerId]:
        if initiator:
            await secure.negotiate(stream, [NOISE], initiator=True)
            conn = await secure.secure_outbound(stream, self.identity, expected)
            await secure.negotiate(conn, [YAMUX], initiator=True)
        else:
            await secure.negotiate(stream, [NOISE], initiator=False)
            conn = await secure.secure_inbound(stream, self.identity)
            await secure.negotiate(conn, [YAMUX], initiator=False)
        return conn, conn.remote_peer

    async def select(self, stream: trio.abc.Stream, protocols: Sequence[str]) -> str:
        return await secure.negotiate(stream, protocols, initiator=True)

    async def handle(self, stream: trio.abc.Stream, protocols: Sequence[str]) -> str:
        return await secure.negotiate(stream, protocols, initiator=False)
