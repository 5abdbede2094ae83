"""Typed exceptions for every failure a caller may want to tell apart.

Every error raised on purpose by ocf derives from :class:`OcfError`, so a
caller (the CLI, the gateway, a test) can catch "anything ocf refused" in one
place and still react to the specific kind when it matters.
"""

from __future__ import annotations


class OcfError(Exception):
    """Base class of all errors ocf raises on purpose."""


class ConfigError(OcfError):
    """A setting has a bad value; ``setting`` names the flag (e.g. ``--tcpport``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class IdentityError(OcfError):
    """A key, peer ID or signature is malformed or does not verify."""


class MultiaddrError(OcfError):
    """A multiaddr string or binary encoding is malformed or unsupported."""


class StoreError(OcfError):
    """The LMDB store cannot be used."""


class DataDirLocked(StoreError):
    """Another process (or node in this process) already holds the data directory."""


class StoreCorrupt(StoreError):
    """The store exists but cannot be read; start again with ``--cleanslate``."""


# --- transport (issue 4) -------------------------------------------------------------


class TransportError(OcfError):
    """A peer connection or stream failed."""


class ProtocolError(TransportError):
    """The peer broke a wire protocol (malformed multistream, Noise or yamux bytes)."""


class HandshakeError(TransportError):
    """The security handshake failed (bad message, bad signature, timeout)."""


class PeerIdMismatch(HandshakeError):
    """The peer authenticated as a different peer ID than the one dialed."""


class ProtocolNotSupported(TransportError):
    """The peer supports none of the protocols we proposed."""


class PeerUnreachable(TransportError):
    """No connection to the peer could be made (no address, refused, timed out)."""


class StreamReset(TransportError):
    """The stream was reset (by the peer, locally, or because its connection closed)."""


def find_in_group(exc: BaseException, types: type[BaseException] | tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``types`` in ``exc`` or, recursively, inside exception groups.

    Trio nurseries wrap errors in ``ExceptionGroup``; callers that report a
    single clear error (the CLI, startup code) use this to find it.
    """
    if isinstance(exc, types):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_in_group(inner, types)
            if found is not None:
                return found
    return None


def single_leaf(exc: BaseException) -> BaseException:
    """If ``exc`` is a (nested) group holding exactly one exception, that exception; else ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
