"""The shared delegation of the stream layers (Noise, pnet, the sniffed-prefix replay)."""

from __future__ import annotations

import trio
import trio.testing

from ocf.transport.layered import LayeredStream


class Plain(LayeredStream):
    """A layer that changes nothing: only the shared part is under test."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.transport.receive_some(max_bytes)


class WholeOnly(trio.abc.Stream):
    """A carrier that cannot half-close (it has no ``send_eof``)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream) -> None:
        self.inner = inner
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()


async def test_send_eof_half_closes_a_carrier_that_can():
    a, b = trio.testing.memory_stream_pair()
    layer = Plain(a)
    await layer.send_all(b"bye")
    await layer.send_eof()
    assert await b.receive_some() == b"bye" and await b.receive_some() == b""
    await b.send_all(b"still open")  # the other direction lives on
    assert await layer.receive_some() == b"still open"


async def test_send_eof_closes_a_carrier_that_cannot_half_close():
    a, b = trio.testing.memory_stream_pair()
    carrier = WholeOnly(a)
    await Plain(carrier).send_eof()
    assert carrier.closed and await b.receive_some() == b""  # the peer sees the end, not silence
