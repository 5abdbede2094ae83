"""Which addresses this node dials, when a peer (not the operator) told us about them.

Any peer can publish any address for itself (in its node-table entry, in
identify), and a node that dials whatever it learns becomes a scanner for
hire: it connects to ports on its own loopback, on the operator's LAN or on a
cloud metadata address, and tells the requester what answered. So addresses
are split by origin:

- **Operator addresses** (``--bootstrap.addr``, ``ocf ping``, a program
  calling :meth:`~ocf.transport.host.Host.connect`) are always dialed.
- **Learned addresses** are dialed when they are public, or when they lie in
  a network this node itself runs in: a loopback, link-local or private
  block (RFC 1918, RFC 6598 shared space, IPv6 ULA) that it listens on
  explicitly, that ``--public-addr`` names, or that an operator address
  reached. Multicast, unspecified, documentation and other reserved ranges
  are never dialed. ``--dial-allow`` adds CIDR blocks on top.

A wildcard listener (``0.0.0.0``, the default) accepts on loopback too, but
that is not "running in a loopback network": counting it would let every
internet-facing node be pointed at its own local services, the case this
policy exists for. A node of an all-local setup (the README walkthrough,
tests) is in the loopback network because its peers' operator addresses or
its explicit ``--host 127.0.0.1`` put it there.

IPv4 addresses embedded in IPv6 (mapped, 6to4, NAT64, Teredo) are judged
by the IPv4 address they lead to. DNS names in learned addresses are
resolved first and judged by what they resolve to (:func:`resolve_learned`),
and the dial goes to the checked IP, so a name cannot point elsewhere in
between.

The decision is pure (:class:`DialPolicy`); only :func:`resolve_learned`
touches the network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import attrs
import trio

from ..errors import PeerUnreachable
from ..identity import Multiaddr

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_BLOCKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
LINK_LOCAL_BLOCKS = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
PRIVATE_BLOCKS = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("100.64.0.0/10"),  # carrier-grade NAT shared space
    ipaddress.ip_network("fc00::/7"),
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
WILDCARD_HOSTS = ("", "*", "0.0.0.0", "::")
#: Addresses of one DNS name tried per learned dial (a name may resolve to many).
MAX_RESOLVED = 4


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def effective_ip(ip: IPAddress) -> IPAddress:
    """The address a connection to ``ip`` really leads to (the IPv4 inside mapped, 6to4, NAT64, Teredo)."""
    return _embedded_v4(ip) or ip


def classify(ip: IPAddress) -> tuple[str, IPNetwork | None]:
    """``(category, block)``: category is public, loopback, link-local, private, multicast, unspecified or reserved.

    ``block`` is the network a node "runs in" when it has an address there
    (for loopback, link-local and private), else None.
    """
    ip = effective_ip(ip)
    if ip.is_unspecified:
        return "unspecified", None
    if ip.is_multicast:
        return "multicast", None
    for category, blocks in (
        ("loopback", LOOPBACK_BLOCKS),
        ("link-local", LINK_LOCAL_BLOCKS),
        ("private", PRIVATE_BLOCKS),
    ):
        for block in blocks:
            if ip.version == block.version and ip in block:
                return category, block
    if ip.is_global and not ip.is_reserved:
        return "public", None
    return "reserved", None


def parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def parse_cidrs(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``--dial-allow`` values -> networks; raises ValueError naming the bad one."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network like 10.0.0.0/8 or fd00::/8") from None
    return tuple(out)


@attrs.define
class DialPolicy:
    """Decides whether a learned IP may be dialed; remembers the networks this node runs in.

    ``refused`` counts refusals by address category (for ``/metrics``).
    """

    allow: tuple[IPNetwork, ...] = ()
    home: set[IPNetwork] = attrs.field(factory=set)
    refused: dict[str, int] = attrs.field(factory=dict)

    def note_home(self, ip: IPAddress | str | None) -> None:
        """This node listens at, is known as, or was told by its operator to reach ``ip``."""
        if isinstance(ip, str):
            ip = parse_ip(ip)
        if ip is None:
            return
        _, block = classify(ip)
        if block is not None:
            self.home.add(block)

    def note_home_addr(self, addr: Multiaddr | None) -> None:
        if addr is not None and addr.parts and addr.parts[0][0] in ("ip4", "ip6"):
            self.note_home(addr.parts[0][1])

    def refusal_ip(self, ip: IPAddress) -> str | None:
        """Why a learned ``ip`` is not dialed, or None if it may be."""
        category, block = classify(ip)
        if category == "public":
            return None
        if any(net.version == ip.version and ip in net for net in self.allow):
            return None
        inner = effective_ip(ip)
        if inner is not ip and any(net.version == inner.version and inner in net for net in self.allow):
            return None
        if block is not None and block in self.home:
            return None
        self.refused[category] = self.refused.get(category, 0) + 1
        return f"{category} address {ip} outside this node's networks (--dial-allow adds networks)"

    def refusal(self, addr: Multiaddr) -> str | None:
        """Why a learned ``addr`` is not dialed, or None; DNS names pass here and are judged once resolved."""
        if not addr.parts:
            return "empty address"
        name, value = addr.parts[0]
        if name in ("ip4", "ip6"):
            ip = parse_ip(value or "")
            return "unparsable IP" if ip is None else self.refusal_ip(ip)
        return None  # /memory (in-process) or /dns*: nothing to judge before resolving


def is_wildcard(host: str) -> bool:
    return host.strip() in WILDCARD_HOSTS


async def resolve_learned(addr: Multiaddr, policy: DialPolicy) -> Multiaddr:
    """A learned ``/dns*`` address as ``/ip4|ip6`` of a resolved address the policy allows.

    Other addresses come back unchanged. Raises :class:`PeerUnreachable`
    when the name does not resolve or resolves only to refused addresses.
    """
    if not addr.parts or addr.parts[0][0] not in ("dns", "dns4", "dns6"):
        return addr
    kind, name = addr.parts[0]
    family = {"dns4": socket.AF_INET, "dns6": socket.AF_INET6}.get(kind, socket.AF_UNSPEC)
    try:
        port = int(addr.parts[1][1] or "") if len(addr.parts) > 1 else 0
        infos = await trio.socket.getaddrinfo(name, port, family=family, type=socket.SOCK_STREAM)
    except (OSError, ValueError, UnicodeError) as exc:
        raise PeerUnreachable(f"{addr}: cannot resolve: {exc}") from None
    refused = []
    for info in infos[:MAX_RESOLVED]:
        ip = parse_ip(str(info[4][0]))
        if ip is None:
            continue
        reason = policy.refusal_ip(ip)
        if reason is None:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            return Multiaddr((("ip4" if ip.version == 4 else "ip6", str(ip)),) + addr.parts[1:])
        refused.append(reason)
    raise PeerUnreachable(f"{addr}: resolves only to addresses not dialed ({'; '.join(refused) or 'none'})")
