"""TEMPORARY stand-in upgrader (NO ENCRYPTION, NO AUTHENTICATION) until the
Noise/multistream layer (``ocf.transport.secure``) lands.

Minimal multistream-select 1.0 plus an unauthenticated public-key exchange, so
the Host and everything above it can be built and tested meanwhile. The host
logs a warning whenever it falls back to this. Delete once ``secure`` exists.
"""

from __future__ import annotations

import trio

from ocf.errors import HandshakeError, PeerIdMismatch, ProtocolError, ProtocolNotSupported
from ocf.identity import Identity, PeerId, varint

HEADER = "/multistream/1.0.0"


class _Buffered(trio.abc.HalfCloseableStream):
    def __init__(self, stream):
        self.stream = stream
        self.buf = b""

    async def receive_some(self, max_bytes=None):
        if self.buf:
            await trio.lowlevel.checkpoint()
            n = len(self.buf) if max_bytes is None else max_bytes
            data, self.buf = self.buf[:n], self.buf[n:]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data):
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self):
        await self.stream.send_eof()

    async def aclose(self):
        await self.stream.aclose()

    def __getattr__(self, name):
        return getattr(self.stream, name)


async def _read_line(stream) -> str:
    # byte-at-a-time: simple and never over-reads
    buf = b""
    while True:
        parsed = varint.decode(buf)
        if parsed is not None:
            break
        b = await stream.receive_some(1)
        if not b:
            raise ProtocolError("eof")
        buf += b
    n, _ = parsed
    body = b""
    while len(body) < n:
        b = await stream.receive_some(n - len(body))
        if not b:
            raise ProtocolError("eof")
        body += b
    return body.decode().rstrip("\n")


def _line(s: str) -> bytes:
    data = (s + "\n").encode()
    return varint.encode(len(data)) + data


async def select(stream, protocols):
    await stream.send_all(_line(HEADER))
    if await _read_line(stream) != HEADER:
        raise ProtocolError("bad header")
    for p in protocols:
        await stream.send_all(_line(p))
        if await _read_line(stream) == p:
            return p
    raise ProtocolNotSupported(f"none of {protocols}")


async def handle(stream, protocols):
    if await _read_line(stream) != HEADER:
        raise ProtocolError("bad header")
    await stream.send_all(_line(HEADER))
    while True:
        p = await _read_line(stream)
        if p in protocols:
            await stream.send_all(_line(p))
            return p
        await stream.send_all(_line("na"))


class PlainUpgrader:
    def __init__(self, identity: Identity):
        self.identity = identity

    async def secure(self, stream, *, initiator, expected):
        if initiator:
            await select(stream, ["/plain-test"])
        else:
            await handle(stream, ["/plain-test"])
        key = self.identity.public_key_proto
        await stream.send_all(bytes([len(key)]) + key)
        hdr = await stream.receive_some(1)
        if not hdr:
            raise HandshakeError("eof")
        n = hdr[0]
        body = b""
        while len(body) < n:
            b = await stream.receive_some(n - len(body))
            if not b:
                raise HandshakeError("eof")
            body += b
        remote = PeerId.from_key_proto(body)
        if expected is not None and remote != expected:
            raise PeerIdMismatch("mismatch")
        return stream, remote

    async def select(self, stream, protocols):
        return await select(stream, protocols)

    async def handle(self, stream, protocols):
        return await handle(stream, protocols)
