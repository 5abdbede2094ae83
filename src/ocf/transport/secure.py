"""Trio drivers for multistream-select and Noise: move bytes, own nothing else.

:func:`negotiate` runs multistream-select on any Trio stream, reading exactly
as many bytes as the negotiation needs, so whatever follows stays in the
stream for the next protocol. :func:`secure_outbound` / :func:`secure_inbound`
run the Noise handshake and return a :class:`SecureStream`.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..directsocket import DirectSocketStream
from ..errors import HandshakeError, ProtocolError
from ..identity import Identity, PeerId
from .layered import LayeredStream
from .multistream import Agreed, Dialer, Listener
from .noise import NoiseHandshake, NoiseSession
from .tcp import tcp_stream_of

RECEIVE_SIZE = 256 * 1024


async def _receive_exactly_up_to(stream: trio.abc.ReceiveStream, n: int, what: str) -> bytes:
    data = await stream.receive_some(n)
    if not data:
        raise ProtocolError(f"{what}: connection closed during negotiation")
    return bytes(data)


async def negotiate(stream: trio.abc.Stream, protocols: Sequence[str], *, initiator: bool) -> str:
    """Agree on one of ``protocols``; the dialer proposes them in order, the listener accepts any of them."""
    machine: Dialer | Listener
    if initiator:
        machine = Dialer(protocols)
        await stream.send_all(machine.initiate())
    else:
        machine = Listener(set(protocols))
    agreed: Agreed | None = None
    while agreed is None:
        if not initiator:
            out = machine.data_to_send()
            if out:
                await stream.send_all(out)
        data = await _receive_exactly_up_to(stream, machine.bytes_wanted(), "multistream")
        agreed = machine.receive_data(data)
        if initiator:
            out = machine.data_to_send()
            if out:
                await stream.send_all(out)
    out = machine.data_to_send()
    if out:
        await stream.send_all(out)
    return agreed.protocol


class SecureStream(LayeredStream):
    """A Noise-encrypted byte stream over another stream (TCP, WebSocket or memory).

    Over TCP, :meth:`write_nowait` hands ciphertext to the kernel itself
    when the socket has room (it nearly always has): Trio's socket wrapper
    costs more per write than encrypting a 64 KiB frame's worth of
    bookkeeping, so skipping it raises a single stream's throughput
    (``benchmarks/transport.py`` measures by how much).
    """

    def __init__(
        self, transport: trio.abc.Stream, session: NoiseSession, local_peer: PeerId, remote_peer: PeerId
    ) -> None:
        super().__init__(transport)
        self.local_peer = local_peer
        self.remote_peer = remote_peer
        self._session = session
        self._plain = b""
        tcp = tcp_stream_of(transport)
        # Over TCP (after the handshake) we read and write the socket ourselves.
        self._direct = DirectSocketStream(tcp) if tcp is not None else None
        # No send lock: the muxer's single writer task is the only caller after
        # the handshake (a lock here costs a scheduler round trip per write).

    def write_nowait(self, parts: Sequence[bytes | bytearray | memoryview]) -> memoryview:
        """Encrypt the concatenation of ``parts`` and write what the kernel takes now, without waiting.

        Returns the ciphertext not written yet (empty when all went). It is
        already encrypted, so the caller must send it with
        :meth:`send_encrypted` before anything else goes out, or the
        connection is out of sync.
        """
        data = memoryview(self._session.encrypt_parts(parts))
        if self._direct is None:
            return data
        return self._direct.write_nowait(data)

    async def send_encrypted(self, ciphertext: bytes | bytearray | memoryview) -> None:
        """Send ciphertext :meth:`write_nowait` left over (waits for the socket)."""
        await self.transport.send_all(ciphertext)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        rest = self.write_nowait((data,))
        if rest:
            await self.send_encrypted(rest)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._plain:
            if self._session.has_buffered():
                plain = self._session.decrypt_stream(b"")
                if plain:
                    self._plain = plain
                    break
            data = await self._receive_ciphertext()
            if not data:
                if self._session.has_buffered():
                    raise ProtocolError("noise: connection closed in the middle of a frame")
                return b""
            self._plain = self._session.decrypt_stream(data)
        if max_bytes is None or max_bytes >= len(self._plain):
            data, self._plain = self._plain, b""
        else:
            data, self._plain = self._plain[:max_bytes], self._plain[max_bytes:]
        return data

    async def _receive_ciphertext(self) -> bytes | bytearray:
        """Next bytes from the carrier; over TCP straight from the socket (see :mod:`ocf.directsocket`)."""
        if self._direct is None:
            return await self.transport.receive_some(RECEIVE_SIZE)
        return await self._direct.receive_some(RECEIVE_SIZE)


async def _handshake(stream: trio.abc.Stream, hs: NoiseHandshake) -> SecureStream:
    try:
        while not hs.complete:
            out = hs.data_to_send()
            if out:
                await stream.send_all(out)
            data = await stream.receive_some(hs.bytes_wanted())
            if not data:
                raise HandshakeError("noise: connection closed during the handshake")
            hs.receive_data(data)
        out = hs.data_to_send()
        if out:
            await stream.send_all(out)
    except ProtocolError as exc:
        raise HandshakeError(str(exc)) from None
    assert hs.remote_peer is not None
    return SecureStream(stream, hs.session(), hs.identity.peer_id, hs.remote_peer)


async def secure_outbound(stream: trio.abc.Stream, identity: Identity, expected: PeerId | None = None) -> SecureStream:
    """Noise XX as initiator; ``expected`` (from ``/p2p/<id>``) must match the authenticated peer."""
    return await _handshake(stream, NoiseHandshake(identity, initiator=True, expected_peer=expected))


async def secure_inbound(stream: trio.abc.Stream, identity: Identity) -> SecureStream:
    """Noise XX as responder; the peer is whoever proves its key."""
    return await _handshake(stream, NoiseHandshake(identity, initiator=False))
