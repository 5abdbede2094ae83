"""Multiaddrs: self-describing network addresses (``/ip4/1.2.3.4/tcp/43905/p2p/12D3KooW…``).

Only the protocols a node of this fabric meets are supported; an unknown one
is a clear :class:`MultiaddrError`, never a silent drop. Both the text form
and the binary form (used by identify) round-trip.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import attrs

from ..errors import IdentityError, MultiaddrError
from . import varint
from .peerid import PeerId


@attrs.frozen
class Protocol:
    name: str
    code: int
    size: int  # bytes of value; 0 = no value; -1 = varint-length-prefixed


PROTOCOLS = [
    Protocol("ip4", 4, 4),
    Protocol("tcp", 6, 2),
    Protocol("udp", 273, 2),
    Protocol("ip6", 41, 16),
    Protocol("ip6zone", 42, -1),
    Protocol("dns", 53, -1),
    Protocol("dns4", 54, -1),
    Protocol("dns6", 55, -1),
    Protocol("dnsaddr", 56, -1),
    Protocol("p2p-circuit", 290, 0),
    Protocol("p2p", 421, -1),
    Protocol("tls", 448, 0),
    Protocol("quic", 460, 0),
    Protocol("quic-v1", 461, 0),
    Protocol("http", 480, 0),
    Protocol("ws", 477, 0),
    Protocol("wss", 478, 0),
    # --- transport: in-process addresses (/memory/<name>) for MemoryNetwork tests ---
    Protocol("memory", 777, -1),
]
BY_NAME = {p.name: p for p in PROTOCOLS} | {"ipfs": next(p for p in PROTOCOLS if p.name == "p2p")}
BY_CODE = {p.code: p for p in PROTOCOLS}


@attrs.frozen
class Multiaddr:
    """An immutable multiaddr: a tuple of ``(protocol name, value or None)``."""

    parts: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        if not isinstance(text, str) or not text.startswith("/"):
            raise MultiaddrError(f"multiaddr must start with '/': {text!r}")
        tokens = text.rstrip("/").split("/")[1:]
        parts: list[tuple[str, str | None]] = []
        i = 0
        while i < len(tokens):
            name = tokens[i]
            proto = BY_NAME.get(name)
            if proto is None:
                raise MultiaddrError(f"unknown protocol {name!r} in multiaddr {text!r}")
            i += 1
            if proto.size == 0:
                parts.append((proto.name, None))
                continue
            if i >= len(tokens) or tokens[i] == "":
                raise MultiaddrError(f"protocol {name!r} needs a value in multiaddr {text!r}")
            value = tokens[i]
            i += 1
            parts.append((proto.name, _normalize(proto, value, text)))
        if not parts:
            raise MultiaddrError("empty multiaddr")
        return cls(tuple(parts))

    @classmethod
    def from_bytes(cls, data: bytes) -> Multiaddr:
        parts: list[tuple[str, str | None]] = []
        pos = 0
        try:
            while pos < len(data):
                code, pos = varint.decode_exact(data, pos)
                proto = BY_CODE.get(code)
                if proto is None:
                    raise MultiaddrError(f"unknown multiaddr protocol code {code}")
                if proto.size == 0:
                    parts.append((proto.name, None))
                    continue
                if proto.size > 0:
                    size = proto.size
                else:
                    size, pos = varint.decode_exact(data, pos)
                raw = data[pos : pos + size]
                if len(raw) != size:
                    raise MultiaddrError(f"truncated value for /{proto.name}")
                pos += size
                parts.append((proto.name, _value_from_bytes(proto, raw)))
        except varint.VarintError as exc:
            raise MultiaddrError(f"bad multiaddr bytes: {exc}") from None
        if not parts:
            raise MultiaddrError("empty multiaddr")
        return cls(tuple(parts))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for name, value in self.parts:
            proto = BY_NAME[name]
            out += varint.encode(proto.code)
            if proto.size == 0:
                continue
            raw = _value_to_bytes(proto, value or "")
            if proto.size < 0:
                out += varint.encode(len(raw))
            out += raw
        return bytes(out)

    def __str__(self) -> str:
        return "".join(f"/{n}" if v is None else f"/{n}/{v}" for n, v in self.parts)

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        return iter(self.parts)

    def value_for(self, name: str) -> str | None:
        for n, v in self.parts:
            if n == name:
                return v
        return None

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.parts)

    @property
    def peer_id(self) -> PeerId | None:
        """The ``/p2p/<id>`` of the peer this address reaches, if any.

        In a relay address (``…/p2p/<relay>/p2p-circuit/p2p/<peer>``) that is
        the one after ``/p2p-circuit``, not the relay's.
        """
        value = None
        for name, v in self.parts:
            if name == "p2p":
                value = v
            elif name == "p2p-circuit":
                value = None
        return PeerId.from_string(value) if value else None

    def without_p2p(self) -> Multiaddr:
        """Without the trailing ``/p2p/<id>`` (a relay address keeps its relay's)."""
        if self.parts and self.parts[-1][0] == "p2p":
            return Multiaddr(self.parts[:-1])
        return self

    def with_p2p(self, peer: PeerId) -> Multiaddr:
        return Multiaddr(self.without_p2p().parts + (("p2p", peer.to_string()),))

    def host_port(self) -> tuple[str, int]:
        """(host, tcp port) for dialing; raises for addresses without both."""
        host = None
        for name, value in self.parts:
            if name in ("ip4", "ip6", "dns", "dns4", "dns6"):
                host = value
                break
        port = self.value_for("tcp")
        if host is None or port is None:
            raise MultiaddrError(f"{self} has no host and TCP port")
        return host, int(port)


def _normalize(proto: Protocol, value: str, text: str) -> str:
    try:
        return _value_from_bytes(proto, _value_to_bytes(proto, value))
    except MultiaddrError as exc:
        raise MultiaddrError(f"{exc} in multiaddr {text!r}") from None


def _value_to_bytes(proto: Protocol, value: str) -> bytes:
    try:
        if proto.name == "ip4":
            return ipaddress.IPv4Address(value).packed
        if proto.name == "ip6":
            return ipaddress.IPv6Address(value).packed
        if proto.name in ("tcp", "udp"):
            if not value.isdigit() or not 0 <= int(value) <= 65535:
                raise ValueError(f"port out of range: {value}")
            return int(value).to_bytes(2, "big")
        if proto.name == "p2p":
            return PeerId.from_string(value).raw
    except (ValueError, IdentityError) as exc:
        raise MultiaddrError(f"bad /{proto.name} value {value!r}: {exc}") from None
    raw = value.encode()
    if not raw or "/" in value:
        raise MultiaddrError(f"bad /{proto.name} value {value!r}")
    return raw


def _value_from_bytes(proto: Protocol, raw: bytes) -> str:
    try:
        if proto.name == "ip4":
            return str(ipaddress.IPv4Address(raw))
        if proto.name == "ip6":
            return str(ipaddress.IPv6Address(raw))
        if proto.name in ("tcp", "udp"):
            return str(int.from_bytes(raw, "big"))
        if proto.name == "p2p":
            return PeerId(raw).to_string()
        text = raw.decode()
    except (ValueError, IdentityError, UnicodeDecodeError) as exc:
        raise MultiaddrError(f"bad /{proto.name} value: {exc}") from None
    if not text or "/" in text:
        raise MultiaddrError(f"bad /{proto.name} value {text!r}")
    return text
