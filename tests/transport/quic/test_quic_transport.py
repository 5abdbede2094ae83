"""QUIC transport below the host: TLS certificate checks, connect, streams, flow control."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncIterator

import pytest
import trio
from cryptography import x509

from ocf.errors import HandshakeError, PeerIdMismatch, StreamReset, transport_errors_unwrapped
from ocf.identity import Identity, Multiaddr
from ocf.transport.quic import QuicMuxedConnection, QuicStream, QuicTransport
from ocf.transport.quic.tls import make_certificate, peer_id_from_certificate
from ocf.transport.resources import Limits, ResourceManager


def test_certificate_round_trip() -> None:
    ident = Identity.generate()
    cert = make_certificate(ident).certificate
    assert peer_id_from_certificate(cert) == ident.peer_id
    assert peer_id_from_certificate(cert, expected=ident.peer_id) == ident.peer_id
    with pytest.raises(PeerIdMismatch):
        peer_id_from_certificate(cert, expected=Identity.generate().peer_id)


def test_certificate_checks() -> None:
    ident = Identity.generate()
    with pytest.raises(HandshakeError, match="no certificate"):
        peer_id_from_certificate(None)
    cert = make_certificate(ident).certificate
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365 * 20)
    with pytest.raises(HandshakeError, match="not valid now"):
        peer_id_from_certificate(cert, now=later)
    # A certificate whose extension was made for another key: the signature must not verify.
    other = make_certificate(ident)
    swapped = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.subject)
        .public_key(other.private_key.public_key())
        .serial_number(1)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
        .add_extension(cert.extensions[0].value, critical=True)
        .sign(other.private_key, __import__("cryptography").hazmat.primitives.hashes.SHA256())
    )
    with pytest.raises(HandshakeError, match="does not verify"):
        peer_id_from_certificate(swapped)


async def echo(stream: QuicStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)
    await stream.send_eof()


@contextlib.asynccontextmanager
async def server(ident: Identity, **kw: object) -> AsyncIterator[tuple[QuicTransport, Multiaddr, list]]:
    transport = QuicTransport(ident, resources=ResourceManager(Limits()), **kw)  # type: ignore[arg-type]
    conns: list[QuicMuxedConnection] = []

    async def on_inbound(conn: QuicMuxedConnection) -> None:
        conn.attach(handler=echo, resources=None, max_streams=1024)
        conns.append(conn)
        await conn.run()

    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(transport.serve, "127.0.0.1", 0, on_inbound, nursery)
        yield transport, addrs[0], conns
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def client(ident: Identity, addr: Multiaddr, expected=None) -> AsyncIterator[QuicMuxedConnection]:
    transport = QuicTransport(ident, resources=ResourceManager(Limits()))
    async with trio.open_nursery() as nursery:
        transport.start_dialing(nursery)
        async with transport.connect(addr, expected, 5.0) as conn:
            conn.attach(handler=None, resources=None, max_streams=1024)
            nursery.start_soon(conn.run)
            yield conn
        nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_connect_and_echo() -> None:
    a, b = Identity.generate(), Identity.generate()
    async with server(a) as (_, addr, conns), client(b, addr, a.peer_id) as conn:
        assert conn.remote_peer == a.peer_id
        stream = await conn.open_stream()
        payload = bytes(range(256)) * 4096  # 1 MiB: more than one stream window
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            nursery.start_soon(send)
            got = bytearray()
            while data := await stream.receive_some():
                got += data
        assert bytes(got) == payload
        assert conns[0].remote_peer == b.peer_id
        assert await conn.ping() > 0


@pytest.mark.trio
async def test_wrong_peer_refused() -> None:
    a, b = Identity.generate(), Identity.generate()
    async with server(a) as (_, addr, _conns):
        with pytest.raises(PeerIdMismatch), transport_errors_unwrapped():
            async with client(b, addr, Identity.generate().peer_id):
                pass


@pytest.mark.trio
async def test_many_streams_and_reset() -> None:
    a, b = Identity.generate(), Identity.generate()
    async with server(a) as (_, addr, _conns), client(b, addr, a.peer_id) as conn:

        async def one(i: int) -> None:
            s = await conn.open_stream()
            msg = f"stream {i}".encode() * 1000
            await s.send_all(msg)
            await s.send_eof()
            got = b""
            while data := await s.receive_some():
                got += data
            assert got == msg
            await s.aclose()

        async with trio.open_nursery() as nursery:
            for i in range(64):
                nursery.start_soon(one, i)
        s = await conn.open_stream()
        s.reset()
        with pytest.raises(StreamReset):
            await s.send_all(b"x")
        with trio.fail_after(5):
            await conn.wait_idle()
        assert conn.num_streams == 0


@pytest.mark.trio
async def test_retry_always() -> None:
    a, b = Identity.generate(), Identity.generate()
    async with server(a, retry="always") as (transport, addr, _conns), client(b, addr, a.peer_id) as conn:
        stream = await conn.open_stream()
        await stream.send_all(b"hi")
        assert await stream.receive_some() == b"hi"
        assert transport.endpoints[0].stats.retries_sent == 1
