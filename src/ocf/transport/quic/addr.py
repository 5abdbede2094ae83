"""QUIC multiaddrs: ``/ip4|ip6|dns*/HOST/udp/PORT/quic-v1``."""

from __future__ import annotations

import ipaddress
from typing import Any

from ...identity import Multiaddr


def is_quic_addr(addr: Multiaddr) -> bool:
    """``/ip4|ip6|dns*/…/udp/P/quic-v1`` optionally followed by ``/p2p/<id>``."""
    names = [n for n, _ in addr.parts if n != "p2p"]
    return len(names) == 3 and names[0] in ("ip4", "ip6", "dns", "dns4", "dns6") and names[1:] == ["udp", "quic-v1"]


def quic_multiaddr(sockaddr: Any) -> Multiaddr | None:
    """``('1.2.3.4', 5)`` -> ``/ip4/1.2.3.4/udp/5/quic-v1``."""
    try:
        host, port = str(sockaddr[0]), int(sockaddr[1])
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return Multiaddr((("ip4" if ip.version == 4 else "ip6", str(ip)), ("udp", str(port)), ("quic-v1", None)))
