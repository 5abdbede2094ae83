"""The part every byte-transforming stream layer shares: what it adds nothing to goes straight down.

Noise (:mod:`.secure`), the private-network cipher (:mod:`.pnet`) and the
sniffed-prefix replay (:mod:`.tcp`) each change what bytes look like, but none
has flow control, a half-close or a close of its own: those are the carrier's.
One base keeps the three from each writing the same delegation, and keeps it
the same everywhere (a layer whose carrier cannot half-close closes it whole,
so the peer still sees the end instead of waiting on a stream nobody writes).
"""

from __future__ import annotations

import trio


class LayeredStream(trio.abc.HalfCloseableStream):
    """A stream over ``transport``; subclasses implement ``send_all`` and ``receive_some``."""

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Close the carrier's write side if it has one, else the carrier."""
        if isinstance(self.transport, trio.abc.HalfCloseableStream):
            await self.transport.send_eof()
        else:
            await self.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()
