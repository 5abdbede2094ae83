"""libp2p's TLS 1.3 certificates for QUIC: who the peer is, proven inside the handshake.

libp2p does not use certificate authorities. Each side presents a fresh
self-signed certificate whose key is throwaway (ECDSA P-256 here, which every
libp2p implementation accepts) and which carries one critical extension,
OID ``1.3.6.1.4.1.53594.1.1``, holding::

    SignedKey ::= SEQUENCE { publicKey OCTET STRING, signature OCTET STRING }

``publicKey`` is the node's libp2p key (protobuf, Ed25519 for us) and
``signature`` is that key's signature over ``"libp2p-tls-handshake:"`` plus
the certificate's DER ``SubjectPublicKeyInfo``. TLS itself proves possession
of the certificate key (CertificateVerify); the extension binds that key to
the peer ID. Nothing else about the certificate is checked beyond validity
dates and its self-signature, as the libp2p TLS spec says.

Both sides present and check a certificate (the server asks for the
client's), and the ALPN is ``libp2p``. Encoding and parsing go through
``cryptography`` (X.509 and its DER codec); nothing here is hand-rolled.
"""

from __future__ import annotations

import datetime

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ObjectIdentifier

from ...errors import HandshakeError, IdentityError, PeerIdMismatch
from ...identity import Identity, PeerId

ALPN = "libp2p"
LIBP2P_EXTENSION_OID = ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
SIGNATURE_PREFIX = b"libp2p-tls-handshake:"
#: A certificate is a few hundred bytes; anything far larger is not one of ours to parse.
MAX_CERT_BYTES = 16 * 1024
MAX_KEY_PROTO = 1024
# Certificates are valid from an hour ago (clock skew) for a long time: the
# identity, not the dates, is what matters, and nodes renew at start.
NOT_BEFORE_SKEW = datetime.timedelta(hours=1)
VALIDITY = datetime.timedelta(days=365 * 10)


@asn1.sequence
class SignedKey:
    """The libp2p extension's value."""

    public_key: bytes
    signature: bytes


@attrs.frozen
class CertifiedKey:
    """A certificate for this node and the private key TLS signs the handshake with."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


def make_certificate(identity: Identity, *, now: datetime.datetime | None = None) -> CertifiedKey:
    """A fresh self-signed certificate carrying ``identity``'s signed libp2p key."""
    key = ec.generate_private_key(ec.SECP256R1())
    spki = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    signed = SignedKey(public_key=identity.public_key_proto, signature=identity.sign(SIGNATURE_PREFIX + spki))
    extension = x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, asn1.encode_der(signed))
    now = now or datetime.datetime.now(datetime.UTC)
    # The subject is free-form in libp2p; a random serial keeps certificates distinct.
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.SERIAL_NUMBER, format(x509.random_serial_number(), "x"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - NOT_BEFORE_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(extension, critical=True)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(cert, key)


def peer_id_from_certificate(
    cert: x509.Certificate | None, *, now: datetime.datetime | None = None, expected: PeerId | None = None
) -> PeerId:
    """Check a peer's certificate as libp2p prescribes and return the peer ID it proves.

    Raises :class:`~ocf.errors.HandshakeError` for a certificate that is not
    a valid libp2p one, :class:`~ocf.errors.PeerIdMismatch` when it proves a
    different peer than ``expected``.
    """
    if cert is None:
        raise HandshakeError("tls: the peer presented no certificate")
    if len(cert.tbs_certificate_bytes) > MAX_CERT_BYTES:
        raise HandshakeError("tls: peer certificate too large")
    now = now or datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise HandshakeError("tls: peer certificate is not valid now")
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise HandshakeError(
            f"tls: peer certificate is not properly self-signed ({exc or type(exc).__name__})"
        ) from None
    try:
        ext = cert.extensions.get_extension_for_oid(LIBP2P_EXTENSION_OID)
    except x509.ExtensionNotFound:
        raise HandshakeError("tls: peer certificate lacks the libp2p extension") from None
    except ValueError as exc:  # a malformed extensions block
        raise HandshakeError(f"tls: peer certificate extensions malformed ({exc})") from None
    if not ext.critical:
        raise HandshakeError("tls: the libp2p extension must be critical")
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        signed = asn1.decode_der(SignedKey, raw)
    except ValueError:
        raise HandshakeError("tls: malformed libp2p extension") from None
    if len(signed.public_key) > MAX_KEY_PROTO:
        raise HandshakeError("tls: libp2p public key too large")
    try:
        peer = PeerId.from_key_proto(signed.public_key)
    except IdentityError as exc:
        raise HandshakeError(f"tls: bad libp2p public key ({exc})") from None
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if not peer.verify(SIGNATURE_PREFIX + spki, signed.signature):
        raise HandshakeError("tls: the libp2p key's signature over the certificate key does not verify")
    if expected is not None and peer != expected:
        raise PeerIdMismatch(f"tls: expected peer {expected.short()}, the certificate proves {peer.short()}")
    return peer
