"""Node configuration: one table of settings, four sources.

Every setting is declared once in :data:`SETTINGS` with its flag name, type,
default and one-sentence help. From that single table we derive the
``ocf start`` flags, the ``OCF_*`` environment variables and the TOML config
file keys, so the three can never drift apart. Precedence is
flag > environment > file > default.

Flag names follow Open Compute Framework's (``--bootstrap.addr``,
``--service.name``, ``--tcpport``) so OCF users can reuse their commands.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Mapping
from urllib.parse import urlparse

import attrs

from .errors import ConfigError, MultiaddrError
from .identity.multiaddr import Multiaddr

if TYPE_CHECKING:
    from .transport.pnet import NetworkKey

MODES = ("standalone", "local", "node")
DHT_MODES = ("client", "server", "auto")
DEFAULT_UDP_PORT = 59820
QUIC_RETRY_MODES = ("auto", "always", "never")
REACHABILITY = ("auto", "public", "private")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@attrs.frozen
class ServiceSpec:
    """A local service this node offers (e.g. an LLM server on ``localhost:8080``)."""

    name: str
    port: int
    host: str = "localhost"
    api_key: str | None = attrs.field(default=None, repr=False)  # sent to this backend only, never logged


@attrs.frozen
class Config:
    """Everything a node needs to start. Build with :func:`load` or directly in tests."""

    # --- node ---------------------------------------------------------------------
    mode: str = "node"
    bootstrap_addrs: tuple[str, ...] = ()
    public_addr: str | None = None
    host: str = "0.0.0.0"
    tcpport: int = 43905
    udpport: int = 59820  # DEFAULT_UDP_PORT
    port: int = 8092
    services: tuple[ServiceSpec, ...] = ()
    seed: str | None = None
    cleanslate: bool = False
    data_dir: Path = attrs.field(default=Path("~/.ocf"), converter=lambda p: Path(p).expanduser())
    log_level: str = "info"
    # --- transport ----------------------------------------------------------------
    ws: bool = True
    quic: bool = True
    quic_retry: str = "auto"
    max_connections: int = 512
    max_streams_per_connection: int = 1024
    max_pending_handshakes: int = 64
    handshake_timeout: float = 10.0
    dial_timeout: float = 10.0
    max_message_size: int = 1 << 20
    network_key: NetworkKey | None = None

    # --- transport: NAT traversal (circuit relay v2, AutoNAT, DCUtR) -------------------
    relay: bool = False
    reachability: str = "auto"
    max_relays: int = 2
    relay_max_reservations: int = 128
    relay_max_circuits: int = 16
    relay_circuit_duration: int = 120
    relay_circuit_data: int = 1 << 17

    # --- transport: dial policy -----------------------------------------------------
    dial_allow: tuple[str, ...] = ()
    max_addrs_per_peer: int = 8

    # transport resource manager (ocf.transport.resources): budgets a hostile peer cannot exceed
    max_inbound_connections: int = 384
    max_connections_per_peer: int = 8
    max_connections_per_ip: int = 32
    max_pending_handshakes_per_ip: int = 8
    max_system_streams: int = 16384
    max_streams_per_peer: int = 1024
    max_buffered: int = 512 << 20
    max_buffered_per_peer: int = 32 << 20
    max_buffered_per_ip: int = 64 << 20
    ws_max_message: int = 1 << 20
    message_timeout: float = 30.0
    refusal_log_interval: float = 10.0
    # --- dht (Kademlia peer routing, ocf.dht) ---------------------------------------
    dht: str = "auto"
    dht_protocol: str = "/ocf/kad/1.0.0"
    dht_query_rate: float = 10.0
    # --- node table ---------------------------------------------------------------
    verify_interval: float = 30.0
    stale_after: float = 600.0
    nodetable_max_doc_bytes: int = 64 << 10
    nodetable_max_decoded_bytes: int = 1 << 20
    nodetable_max_ops: int = 1024
    nodetable_max_changes: int = 256
    nodetable_max_entry_bytes: int = 32 << 10

    nodetable_max_entries: int = 4096
    nodetable_new_owner_burst: int = 1024
    nodetable_new_owner_rate: float = 64.0
    nodetable_verify_rate: float = 1000.0
    nodetable_verify_total: float = 1000.0
    nodetable_max_streams: int = 2
    nodetable_message_timeout: float = 10.0
    # --- membership ---------------------------------------------------------------
    membership: bool = True
    membership_degree: int = 8
    membership_probe_interval: float = 0.5
    membership_suspicion: float = 5.0
    membership_anti_entropy: float = 30.0
    # --- gateway ------------------------------------------------------------------
    max_body_size: int = 32 << 20
    request_timeout: float = 600.0
    max_forwards_per_peer: int = 256
    cors_origins: str = ""
    # --- access control -----------------------------------------------------------
    admin_token: str | None = attrs.field(default=None, repr=False)
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    api_key_file: Path | None = None
    admin_rate: float = 10.0
    admin_burst: int = 100
    register_rate: float = 5.0
    register_burst: int = 100
    # --- http (the gateway's HTTP/1.1 server: TCP port and peer streams) ----------------
    http_max_connections: int = 1024
    http_reserve_connections: int = 16
    http_max_header_size: int = 64 << 10
    http_head_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_min_body_rate: int = 1 << 10
    http_write_timeout: float = 30.0
    http_keep_alive_timeout: float = 75.0
    # --- jobs ---------------------------------------------------------------------
    jobs: bool = False
    jobs_max_stages: int = 5
    jobs_max_attempts: int = 3
    jobs_flag_threshold: int = 5
    jobs_max_payload: int = 1 << 20
    jobs_lease_timeout: float = 600.0
    jobs_worker_timeout: float = 3600.0
    jobs_create_chunk: int = 2000
    jobs_flag_per_worker: bool = False
    jobs_store: str = ""

    def replace(self, **changes: Any) -> Config:
        return attrs.evolve(self, **changes)


# --- value parsers: each raises ValueError with a message for the user ----------------


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        try:
            number = int(str(value).strip(), 10) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"must be an integer, got {value!r}") from None
        if not lo <= number <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {number}")
        return number

    return parse


def _positive_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number of seconds, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return number


def _choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return text

    return parse


def _jobs_store(value: Any) -> str:
    """``lmdb`` (or empty): the embedded store; a ``postgresql://`` URL: the shared one."""
    text = str(value).strip()
    if text in ("", "lmdb"):
        return ""
    if not text.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be 'lmdb' or a postgresql://user:password@host:port/database URL")
    return text


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


def _str(value: Any) -> str:
    text = str(value).strip()
    if not text:
        raise ValueError("must not be empty")
    return text


def _opt_str(value: Any) -> str | None:
    text = str(value).strip()
    return text or None


def _split(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        items: list[str] = []
        for v in value:
            items.extend(_split(v))
        return items
    return [part.strip() for part in str(value).split(",") if part.strip()]


def _protocol_id(value: Any) -> str:
    text = _str(value)
    if not text.startswith("/") or len(text) > 128 or not text.isprintable() or " " in text:
        raise ValueError(f"{text!r} is not a protocol ID like /ocf/kad/1.0.0")
    return text


def _bootstrap(value: Any) -> tuple[str, ...]:
    out = []
    for item in _split(value):
        if item.startswith(("http://", "https://")):
            if not urlparse(item).netloc:
                raise ValueError(f"bad bootstrap URL {item!r}")
        else:
            try:
                addr = Multiaddr.parse(item)
            except MultiaddrError as exc:
                raise ValueError(
                    f"{exc} (expected a multiaddr like /ip4/1.2.3.4/tcp/43905/p2p/<id> or an http(s) URL)"
                ) from None
            if addr.peer_id is None:
                raise ValueError(f"bootstrap multiaddr {item!r} must end with /p2p/<peer id>")
            item = str(addr)
        out.append(item)
    return tuple(out)


def _service_names(value: Any) -> list[str]:
    names = _split(value)
    for name in names:
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"service name {name!r} may only contain letters, digits, '-' and '_'")
    return names


def _service_ports(value: Any) -> list[int]:
    return [_int_range(1, 65535)(p) for p in _split(value)]


def _size(value: Any) -> int:
    """Bytes, with optional K/M/G suffix (binary)."""
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, factor in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            text, mult = text[:-1], factor
            break
    try:
        number = int(float(text) * mult)
    except ValueError:
        raise ValueError(f"must be a size like 32M or 1048576, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return number


def _network_key(value: Any) -> NetworkKey:
    """Read the key file now, so a missing or malformed key stops the start with exit 2."""
    from .transport.pnet import load_network_key

    return load_network_key(_str(value))


def _cidrs(value: Any) -> tuple[str, ...]:
    out = []
    for item in _split(value):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network like 10.0.0.0/8 or fd00::/8") from None
    return tuple(out)


@attrs.frozen
class Setting:
    flag: str  # without leading dashes, e.g. "bootstrap.addr"
    attr: str  # Config attribute (or pseudo-attribute for service.*)
    parse: Callable[[Any], Any]
    help: str
    is_switch: bool = False
    group: str = "node"
    metavar: str | None = None

    @property
    def env(self) -> str:
        return "OCF_" + self.flag.upper().replace(".", "_").replace("-", "_")


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "mode",
        "mode",
        _choice(MODES),
        "Bootstrap mode: 'standalone' waits for others to connect (a dispatcher), 'local' bootstraps to 127.0.0.1, "
        "'node' bootstraps from --bootstrap.addr (default: node).",
        metavar="{standalone,local,node}",
    ),
    Setting(
        "bootstrap.addr",
        "bootstrap_addrs",
        _bootstrap,
        "Peers to join in 'node' mode: multiaddrs ending in /p2p/<peer id> (comma-separated or repeated), or an "
        'http(s) URL answering {"bootstraps": [...]}.',
        metavar="ADDR",
    ),
    Setting(
        "public-addr",
        "public_addr",
        _opt_str,
        "This node's publicly reachable IP or hostname; recorded in the node table so others can use this node as a "
        "bootstrap.",
        metavar="HOST",
    ),
    Setting(
        "host",
        "host",
        _str,
        "Interface to listen on for peers and the HTTP gateway (default: 0.0.0.0, all interfaces).",
        metavar="IP",
    ),
    Setting(
        "tcpport",
        "tcpport",
        _int_range(0, 65535),
        "TCP port for peer connections; WebSocket (/tcp/PORT/ws) is served on the same port (default: 43905; 0 picks a "
        "free port).",
        metavar="PORT",
    ),
    Setting(
        "udpport",
        "udpport",
        _int_range(0, 65535),
        "UDP port for QUIC peer connections (/udp/PORT/quic-v1; default: 59820; 0 picks a free port, and so does the "
        "default when --tcpport is 0).",
        metavar="PORT",
    ),
    Setting(
        "port", "port", _int_range(0, 65535), "HTTP gateway port (default: 8092; 0 picks a free port).", metavar="PORT"
    ),
    Setting(
        "service.name",
        "service_names",
        _service_names,
        "Name of a local service to offer (e.g. 'llm'); repeat together with --service.port to offer several.",
        metavar="NAME",
    ),
    Setting(
        "service.port",
        "service_ports",
        _service_ports,
        "Port of the local service named by the matching --service.name (reached at localhost:PORT).",
        metavar="PORT",
    ),
    Setting(
        "service.api-key",
        "service_api_keys",
        lambda v: _split(v),
        "API key of the local backend (sent to it as Authorization: Bearer, never to anyone else): one per "
        "--service.name, in order, or one for all.",
        metavar="KEY",
    ),
    Setting(
        "seed",
        "seed",
        _opt_str,
        "Derive the node identity deterministically from this string instead of the stored key (for tests and "
        "reproducible setups; never in production).",
        metavar="TEXT",
    ),
    Setting(
        "cleanslate",
        "cleanslate",
        _bool,
        "Discard the stored node table and job data before starting (the identity key is kept).",
        is_switch=True,
    ),
    Setting(
        "data-dir",
        "data_dir",
        lambda v: Path(_str(v)).expanduser(),
        "Directory for the identity key and the LMDB store (default: ~/.ocf).",
        metavar="DIR",
    ),
    Setting(
        "log-level",
        "log_level",
        _choice(LOG_LEVELS),
        "Log verbosity: debug, info, warning, error or critical (default: info).",
        metavar="LEVEL",
    ),
    Setting(
        "ws",
        "ws",
        _bool,
        "Also accept libp2p over WebSocket on the TCP port (default: true; --no-ws to disable).",
        is_switch=True,
        group="transport",
    ),
    Setting(
        "quic",
        "quic",
        _bool,
        "Listen on and dial QUIC (/udp/PORT/quic-v1), preferred over TCP when a peer has both (default: true; "
        "--no-quic to disable; off in a private network, which QUIC cannot carry).",
        is_switch=True,
        group="transport",
    ),
    Setting(
        "quic-retry",
        "quic_retry",
        _choice(QUIC_RETRY_MODES),
        "QUIC address validation: 'always' makes every new client prove its address with a Retry round trip, "
        "'auto' (default) only while half the handshake slots are taken, 'never' never.",
        metavar="MODE",
        group="transport",
    ),
    Setting(
        "max-connections",
        "max_connections",
        _int_range(1, 1_000_000),
        "Maximum simultaneous peer connections (default: 512).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-streams",
        "max_streams_per_connection",
        _int_range(1, 1_000_000),
        "Maximum concurrent streams per peer connection (default: 1024).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-pending-handshakes",
        "max_pending_handshakes",
        _int_range(1, 100_000),
        "Maximum connections still handshaking at once; more are refused (default: 64).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "handshake-timeout",
        "handshake_timeout",
        _positive_float,
        "Seconds a new connection may take to finish its security handshake (default: 10).",
        group="transport",
        metavar="SECONDS",
    ),
    Setting(
        "dial-timeout",
        "dial_timeout",
        _positive_float,
        "Seconds to wait when dialing a peer (default: 10).",
        group="transport",
        metavar="SECONDS",
    ),
    Setting(
        "relay",
        "relay",
        _bool,
        "Serve circuit relay v2 (/libp2p/circuit/relay/0.2.0/hop) so that peers behind NAT can be reached through "
        "this node; use on publicly reachable nodes (default: false).",
        is_switch=True,
        group="transport",
    ),
    Setting(
        "reachability",
        "reachability",
        _choice(REACHABILITY),
        "Whether peers can dial this node: 'auto' asks peers to dial back (AutoNAT), 'public' or 'private' skip "
        "asking; a private node reserves slots on relays and publishes /p2p-circuit addresses (default: auto).",
        group="transport",
        metavar="{auto,public,private}",
    ),
    Setting(
        "max-relays",
        "max_relays",
        _int_range(0, 16),
        "Relays a private node keeps a reservation on (default: 2; 0 reserves on none).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "relay-max-reservations",
        "relay_max_reservations",
        _int_range(1, 1_000_000),
        "With --relay: peers that may hold a reservation at once, 8 per IP address at most "
        "(default: 128, as go-libp2p).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "relay-max-circuits",
        "relay_max_circuits",
        _int_range(1, 100_000),
        "With --relay: relayed connections per peer at once, as source or target (default: 16, as go-libp2p).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "relay-circuit-duration",
        "relay_circuit_duration",
        _int_range(0, 86_400),
        "With --relay: seconds a relayed connection may stay open, then both ends are reset; 0 is no limit "
        "(default: 120, as go-libp2p).",
        group="transport",
        metavar="SECONDS",
    ),
    Setting(
        "relay-circuit-data",
        "relay_circuit_data",
        _size,
        "With --relay: bytes a relayed connection may carry in each direction, then both ends are reset "
        "(default: 128K, as go-libp2p).",
        group="transport",
        metavar="BYTES",
    ),
    Setting(
        "dial-allow",
        "dial_allow",
        _cidrs,
        "Networks (CIDR, comma-separated) a learned peer address may be in, beyond public addresses and the private or "
        "loopback networks this node itself runs in (default: none).",
        group="transport",
        metavar="CIDRS",
    ),
    Setting(
        "max-addrs-per-peer",
        "max_addrs_per_peer",
        _int_range(1, 64),
        "Addresses learned from peers (node table, identify) kept and tried per peer (default: 8).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-message-size",
        "max_message_size",
        _size,
        "Largest single protocol message accepted from a peer (default: 1M).",
        group="transport",
        metavar="BYTES",
    ),
    Setting(
        "network-key",
        "network_key",
        _network_key,
        "Run in a private network: a go-libp2p swarm.key file (/key/swarm/psk/1.0.0/, /base16/, 64 hex digits); peers "
        "without the same key are refused before any handshake (default: none, an open network).",
        group="transport",
        metavar="FILE",
    ),
    Setting(
        "max-inbound-connections",
        "max_inbound_connections",
        _int_range(1, 1_000_000),
        "Maximum inbound peer connections, within --max-connections, so our own dials always find room (default: 384).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-connections-per-peer",
        "max_connections_per_peer",
        _int_range(1, 1000),
        "Maximum simultaneous connections with one peer ID (default: 8).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-connections-per-ip",
        "max_connections_per_ip",
        _int_range(1, 1_000_000),
        "Maximum inbound connections from one IP address (IPv6: one /64) (default: 32).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-pending-handshakes-per-ip",
        "max_pending_handshakes_per_ip",
        _int_range(1, 100_000),
        "Maximum connections from one IP address (IPv6: one /64) still handshaking at once (default: 8).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-system-streams",
        "max_system_streams",
        _int_range(1, 10_000_000),
        "Maximum streams open over all peer connections (default: 16384).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-streams-per-peer",
        "max_streams_per_peer",
        _int_range(1, 1_000_000),
        "Maximum streams open with one peer, over all its connections (default: 1024).",
        group="transport",
        metavar="N",
    ),
    Setting(
        "max-buffered",
        "max_buffered",
        _size,
        "Most bytes received from peers and not yet read that the node holds in total (default: 512M).",
        group="transport",
        metavar="BYTES",
    ),
    Setting(
        "max-buffered-per-peer",
        "max_buffered_per_peer",
        _size,
        "Most received-but-unread bytes one peer may make the node hold; a stream going past it is reset (default: "
        "32M).",
        group="transport",
        metavar="BYTES",
    ),
    Setting(
        "max-buffered-per-ip",
        "max_buffered_per_ip",
        _size,
        "Most received-but-unread bytes from one IP address (IPv6: one /64), all its peers and unfinished WebSocket "
        "messages together (default: 64M).",
        group="transport",
        metavar="BYTES",
    ),
    Setting(
        "ws-max-message",
        "ws_max_message",
        _size,
        "Largest WebSocket message accepted from a peer (default: 1M).",
        group="transport",
        metavar="BYTES",
    ),
    Setting(
        "message-timeout",
        "message_timeout",
        _positive_float,
        "Seconds a peer may take to finish a message it started (WebSocket message, identify) (default: 30).",
        group="transport",
        metavar="SECONDS",
    ),
    Setting(
        "refusal-log-interval",
        "refusal_log_interval",
        _positive_float,
        "Seconds between log lines about the same kind of refused connection, stream or message; the line counts the "
        "others (default: 10).",
        group="transport",
        metavar="SECONDS",
    ),
    Setting(
        "dht",
        "dht",
        _choice(DHT_MODES),
        "Kademlia DHT role: 'server' answers peer lookups for others, 'client' only asks; 'auto' serves when this "
        "node is reachable (standalone nodes and nodes with --public-addr) (default: auto).",
        group="dht",
        metavar="{client,server,auto}",
    ),
    Setting(
        "dht.protocol",
        "dht_protocol",
        _protocol_id,
        "Kademlia protocol ID; the default keeps OCF networks apart from the public IPFS DHT, /ipfs/kad/1.0.0 joins "
        "libp2p's standard one (default: /ocf/kad/1.0.0).",
        group="dht",
        metavar="ID",
    ),
    Setting(
        "dht.query-rate",
        "dht_query_rate",
        _positive_float,
        "Kademlia requests per second one peer may make of this node, with a burst of five times that; the rest are "
        "refused (default: 10).",
        group="dht",
        metavar="PER_SECOND",
    ),
    Setting(
        "verify-interval",
        "verify_interval",
        _positive_float,
        "Seconds between liveness verification rounds of the node table (default: 30).",
        group="node table",
        metavar="SECONDS",
    ),
    Setting(
        "max-record-size",
        "nodetable_max_doc_bytes",
        _size,
        "Largest saved Automerge document in a node table record, checked before its signature (default: 64K).",
        group="node table",
        metavar="BYTES",
    ),
    Setting(
        "max-record-decoded-size",
        "nodetable_max_decoded_bytes",
        _size,
        "Most bytes a record's document may decode to (inflated columns, repeated values), checked before Automerge "
        "parses it (default: 1M).",
        group="node table",
        metavar="BYTES",
    ),
    Setting(
        "max-record-ops",
        "nodetable_max_ops",
        _int_range(16, 10_000_000),
        "Most rows (operations, changes) in any column of a record's document, counted before Automerge parses it "
        "(default: 1024).",
        group="node table",
        metavar="N",
    ),
    Setting(
        "max-record-changes",
        "nodetable_max_changes",
        _int_range(2, 10_000_000),
        "Most changes (history) in a record's document, counted before Automerge parses it; owners compact after 64 "
        "(default: 256).",
        group="node table",
        metavar="N",
    ),
    Setting(
        "max-entry-size",
        "nodetable_max_entry_bytes",
        _size,
        "Largest node table entry as JSON once its document is loaded (default: 32K).",
        group="node table",
        metavar="BYTES",
    ),
    Setting(
        "stale-after",
        "stale_after",
        _positive_float,
        "Seconds after which a peer not seen (no owner-signed heartbeat, no direct contact) leaves the served node "
        "table and is then pruned from memory and disk (default: 600).",
        group="node table",
        metavar="SECONDS",
    ),
    Setting(
        "nodetable.max-entries",
        "nodetable_max_entries",
        _int_range(16, 10_000_000),
        "Maximum node table entries; past it new owners are refused unless a stale entry can be evicted (our own and "
        "directly connected peers always have room) (default: 4096).",
        group="node table",
        metavar="N",
    ),
    Setting(
        "nodetable.new-owner-burst",
        "nodetable_new_owner_burst",
        _int_range(1, 10_000_000),
        "New owners a peer may introduce at once before --nodetable.new-owner-rate applies; more are refused and asked "
        "again later. Also the records a peer may have us send at once on request (default: 1024).",
        group="node table",
        metavar="N",
    ),
    Setting(
        "nodetable.new-owner-rate",
        "nodetable_new_owner_rate",
        _positive_float,
        "New owners per second a peer may introduce after its burst, and records per second it may have us send on "
        "request (default: 64).",
        group="node table",
        metavar="PER_SECOND",
    ),
    Setting(
        "nodetable.verify-rate",
        "nodetable_verify_rate",
        _positive_float,
        "Signature checks per second (records and heartbeats) a peer may cost us, with a burst of twice that; the rest "
        "wait for the next summary (default: 1000).",
        group="node table",
        metavar="PER_SECOND",
    ),
    Setting(
        "nodetable.verify-total",
        "nodetable_verify_total",
        _positive_float,
        "Signature checks per second all peers together may cost us, in the node table and in membership each, with "
        "a burst of four times that (a joiner's whole table); the rest wait for the next summary or gossip "
        "(default: 1000).",
        group="node table",
        metavar="PER_SECOND",
    ),
    Setting(
        "nodetable.max-streams",
        "nodetable_max_streams",
        _int_range(1, 64),
        "Concurrent inbound node table sync streams per peer; extra ones are reset (default: 2).",
        group="node table",
        metavar="N",
    ),
    Setting(
        "nodetable.message-timeout",
        "nodetable_message_timeout",
        _positive_float,
        "Seconds a node table message may take to arrive once its first byte has, else the stream is reset (default: "
        "10).",
        group="node table",
        metavar="SECONDS",
    ),
    Setting(
        "membership",
        "membership",
        _bool,
        "Run SWIM membership for liveness (default: true; --no-membership falls back to owner-signed heartbeats "
        "relayed in whole-table summaries, which does not scale past a few hundred nodes).",
        is_switch=True,
        group="membership",
    ),
    Setting(
        "membership.degree",
        "membership_degree",
        _int_range(2, 1024),
        "Neighbours each node keeps connected and probes; it dials random living members while it has fewer (others "
        "may connect to it beyond this) (default: 8).",
        group="membership",
        metavar="N",
    ),
    Setting(
        "membership.probe-interval",
        "membership_probe_interval",
        _positive_float,
        "Seconds between SWIM probes of one neighbour; a probe unanswered after half of it goes to 3 other neighbours "
        "to try (default: 0.5).",
        group="membership",
        metavar="SECONDS",
    ),
    Setting(
        "membership.suspicion",
        "membership_suspicion",
        _positive_float,
        "Seconds a suspected member has to refute (it signs a higher incarnation) before it is declared dead "
        "everywhere (default: 5).",
        group="membership",
        metavar="SECONDS",
    ),
    Setting(
        "membership.anti-entropy",
        "membership_anti_entropy",
        _positive_float,
        "Seconds between digest comparisons with one random neighbour, which repair what gossip missed (and, for the "
        "node table, every --verify-interval) (default: 30).",
        group="membership",
        metavar="SECONDS",
    ),
    Setting(
        "max-body-size",
        "max_body_size",
        _size,
        "Largest HTTP request body the gateway accepts (default: 32M).",
        group="gateway",
        metavar="BYTES",
    ),
    Setting(
        "request-timeout",
        "request_timeout",
        _positive_float,
        "Seconds a forwarded request may take in total before 504 (default: 600).",
        group="gateway",
        metavar="SECONDS",
    ),
    Setting(
        "max-forwards-per-peer",
        "max_forwards_per_peer",
        _int_range(1, 1_000_000),
        "Maximum concurrent requests forwarded to one peer (default: 256).",
        group="gateway",
        metavar="N",
    ),
    Setting(
        "cors-origins",
        "cors_origins",
        _opt_str,
        "Web origins (e.g. https://app.example) whose pages may call state-changing routes, comma-separated; '*' for "
        "any (default: none; reads stay open to any origin).",
        group="gateway",
        metavar="ORIGINS",
    ),
    # --- access control (admin token, API keys, per-client limits) ---------------------
    Setting(
        "admin-token",
        "admin_token",
        _opt_str,
        "Admin token for state-changing routes (default: generated into <data-dir>/admin.token on first start); prefer "
        "OCF_ADMIN_TOKEN over the flag so it stays out of ps.",
        group="access",
        metavar="TOKEN",
    ),
    Setting(
        "api-key",
        "api_keys",
        lambda v: tuple(_split(v)),
        "API key clients must send (Authorization: Bearer) on /v1/service and /v1/p2p; repeat or comma-separate for "
        "several (default: none, open).",
        group="access",
        metavar="KEY",
    ),
    Setting(
        "api-key-file",
        "api_key_file",
        lambda v: Path(_str(v)).expanduser(),
        "File with one API key per line ('#' comments), in addition to --api-key.",
        group="access",
        metavar="FILE",
    ),
    Setting(
        "admin-rate",
        "admin_rate",
        _positive_float,
        "Admin calls per second allowed per client address, after the burst (default: 10).",
        group="access",
        metavar="PER_SECOND",
    ),
    Setting(
        "admin-burst",
        "admin_burst",
        _int_range(1, 1_000_000),
        "Admin calls a client address may make at once before --admin-rate applies (default: 100).",
        group="access",
        metavar="N",
    ),
    Setting(
        "register-rate",
        "register_rate",
        _positive_float,
        "Worker registrations per second allowed per client address, after the burst (default: 5).",
        group="access",
        metavar="PER_SECOND",
    ),
    Setting(
        "register-burst",
        "register_burst",
        _int_range(1, 1_000_000),
        "Worker registrations a client address may make at once before --register-rate applies (default: 100).",
        group="access",
        metavar="N",
    ),
    Setting(
        "http.max-connections",
        "http_max_connections",
        _int_range(1, 1_000_000),
        "Maximum open HTTP connections on the gateway port; at the cap the longest-idle one is closed for a new one "
        "(default: 1024; lowered to fit the descriptor limit).",
        group="http",
        metavar="N",
    ),
    Setting(
        "http.reserve-connections",
        "http_reserve_connections",
        _int_range(0, 100_000),
        "Extra connections taken when every connection is busy; each may make one /v1/health request, others get 503 "
        "(default: 16).",
        group="http",
        metavar="N",
    ),
    Setting(
        "http.max-header-size",
        "http_max_header_size",
        _size,
        "Largest request head (request line and headers; also the bound on chunk-size and trailer lines) before 400 "
        "(default: 64K).",
        group="http",
        metavar="BYTES",
    ),
    Setting(
        "http.head-timeout",
        "http_head_timeout",
        _positive_float,
        "Seconds a client has to send a whole request head, from its first byte (from the connection's start for the "
        "first request) before 408 (default: 10).",
        group="http",
        metavar="SECONDS",
    ),
    Setting(
        "http.body-timeout",
        "http_body_timeout",
        _positive_float,
        "Seconds a request body may stall before 408; it must also keep up --http.min-body-rate after this long "
        "(default: 30).",
        group="http",
        metavar="SECONDS",
    ),
    Setting(
        "http.min-body-rate",
        "http_min_body_rate",
        _size,
        "Minimum average upload rate of a request body, bytes per second: each byte received extends the body deadline "
        "by 1/rate seconds (default: 1K).",
        group="http",
        metavar="BYTES",
    ),
    Setting(
        "http.write-timeout",
        "http_write_timeout",
        _positive_float,
        "Seconds one write to a client may wait for it to read before the connection is closed (default: 30).",
        group="http",
        metavar="SECONDS",
    ),
    Setting(
        "http.keep-alive-timeout",
        "http_keep_alive_timeout",
        _positive_float,
        "Seconds an idle keep-alive connection is kept open waiting for its next request (default: 75).",
        group="http",
        metavar="SECONDS",
    ),
    Setting(
        "jobs",
        "jobs",
        _bool,
        "Host the distributed job tracker on this node (served under /v1/jobs and as the 'jobs' service).",
        is_switch=True,
        group="jobs",
    ),
    Setting(
        "jobs.max-stages",
        "jobs_max_stages",
        _int_range(1, 100),
        "Maximum stages a job tracker project may have (default: 5).",
        group="jobs",
        metavar="N",
    ),
    Setting(
        "jobs.max-attempts",
        "jobs_max_attempts",
        _int_range(1, 1000),
        "Attempts before a job is marked failed (default: 3).",
        group="jobs",
        metavar="N",
    ),
    Setting(
        "jobs.flag-threshold",
        "jobs_flag_threshold",
        _int_range(1, 1000),
        "Distinct workers flagging a job's input as invalid before it is rolled back to the previous stage (default: "
        "5).",
        group="jobs",
        metavar="N",
    ),
    Setting(
        "jobs.max-payload",
        "jobs_max_payload",
        _size,
        "Largest job input or output, as JSON, the tracker accepts (default: 1M).",
        group="jobs",
        metavar="BYTES",
    ),
    Setting(
        "jobs.lease-timeout",
        "jobs_lease_timeout",
        _positive_float,
        "Default seconds a claimed job stays leased without a heartbeat before it returns to pending (default: 600; "
        "projects may set it per stage).",
        group="jobs",
        metavar="SECONDS",
    ),
    Setting(
        "jobs.worker-timeout",
        "jobs_worker_timeout",
        _positive_float,
        "Seconds of silence after which a worker is forgotten and its token answers 404 (default: 3600).",
        group="jobs",
        metavar="SECONDS",
    ),
    # tracker: bounded job creation and flag counting
    Setting(
        "jobs.create-chunk",
        "jobs_create_chunk",
        _int_range(1, 1_000_000),
        "Jobs written per transaction when creating jobs; a large request commits in chunks, letting workers' requests "
        "run in between (default: 2000).",
        group="jobs",
        metavar="N",
    ),
    Setting(
        "jobs.store",
        "jobs_store",
        _jobs_store,
        "Where the tracker keeps its state: 'lmdb' (default: embedded in the data dir, one node) or a "
        "postgresql://user:password@host:port/database URL that several nodes started with --jobs share; "
        "prefer OCF_JOBS_STORE over the flag so a password stays out of ps.",
        group="jobs",
        metavar="URL",
    ),
    Setting(
        "jobs.flag-per-worker",
        "jobs_flag_per_worker",
        _bool,
        "Count each flagging worker toward --jobs.flag-threshold, instead of each distinct user (default: distinct "
        "users, so one person's many workers count once).",
        is_switch=True,
        group="jobs",
    ),
)
BY_FLAG = {s.flag: s for s in SETTINGS}
_BY_KEY = {s.flag.replace("-", "_"): s for s in SETTINGS} | {s.attr: s for s in SETTINGS}


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | str | None = None,
) -> Config:
    """Merge the four sources into a :class:`Config`.

    ``flags`` maps Setting.flag -> raw value (only flags the user gave);
    ``env`` defaults to ``os.environ``; ``config_file`` (or ``OCF_CONFIG``)
    is a TOML file. Raises :class:`ConfigError` naming the offending flag.
    """
    env = os.environ if env is None else env
    flags = dict(flags or {})
    if config_file is None and env.get("OCF_CONFIG"):
        config_file = env["OCF_CONFIG"]
    values: dict[str, Any] = {}
    file_services: tuple[ServiceSpec, ...] | None = None
    if config_file is not None:
        file_values, file_services = _read_file(Path(config_file))
        values.update(file_values)
    for setting in SETTINGS:
        if setting.env in env:
            values[setting.attr] = _parse(setting, env[setting.env], f"{setting.env} (--{setting.flag})")
    for flag, raw in flags.items():
        setting = BY_FLAG[flag]
        values[setting.attr] = _parse(setting, raw, f"--{setting.flag}")
    services = _services(
        values.pop("service_names", None), values.pop("service_ports", None), values.pop("service_api_keys", None)
    )
    if services is None:
        services = file_services or ()
    if env.get("LIBP2P_FORCE_PNET", "").strip() == "1" and values.get("network_key") is None:
        # The pnet spec's safety net: an operator who demands a private network never starts an open node by mistake.
        raise ConfigError("--network-key", "LIBP2P_FORCE_PNET=1 is set but no network key was given")
    mode = values.get("mode", "node")
    if mode == "standalone" and values.get("bootstrap_addrs"):
        raise ConfigError(
            "--bootstrap.addr", "standalone mode does not bootstrap; drop --bootstrap.addr or use --mode node"
        )
    return Config(services=services, **values)


def _parse(setting: Setting, raw: Any, where: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(where, str(exc)) from None


def _services(
    names: list[str] | None, ports: list[int] | None, keys: list[str] | None = None
) -> tuple[ServiceSpec, ...] | None:
    if names is None and ports is None:
        if keys:
            raise ConfigError("--service.api-key", "needs --service.name and --service.port")
        return None
    names, ports = names or [], ports or []
    keys = keys or []
    if len(keys) == 1:
        keys = keys * len(names)
    if keys and len(keys) != len(names):
        raise ConfigError(
            "--service.api-key",
            f"{len(names)} service name(s) but {len(keys)} --service.api-key value(s);"
            " give one per name or one for all",
        )
    if len(names) != len(ports):
        raise ConfigError(
            "--service.name",
            f"{len(names)} service name(s) but {len(ports)} --service.port value(s); give one port per name",
        )
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError("--service.name", f"service {name!r} given twice")
        seen.add(name)
    return tuple(
        ServiceSpec(n, p, api_key=keys[i] if keys else None) for i, (n, p) in enumerate(zip(names, ports, strict=True))
    )


def _read_file(path: Path) -> tuple[dict[str, Any], tuple[ServiceSpec, ...] | None]:
    where = f"--config {path}"
    try:
        data = tomllib.loads(path.expanduser().read_text())
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    services = None
    if "services" in data:
        services = _file_services(data.pop("services"), where)
    values: dict[str, Any] = {}
    for key, raw in _flatten(data):
        setting = _BY_KEY.get(key.replace("-", "_"))
        if setting is None:
            raise ConfigError("--config", f"unknown setting {key!r} in {path}")
        values[setting.attr] = _parse(setting, raw, f"{key} in {path}")
    return values, services


def _file_services(items: Any, where: str) -> tuple[ServiceSpec, ...]:
    if not isinstance(items, list):
        raise ConfigError("--config", "'services' must be an array of tables ([[services]] with name and port)")
    out = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item or "port" not in item:
            raise ConfigError("--config", "each [[services]] entry needs 'name' and 'port'")
        try:
            name = _service_names(item["name"])
            port = _int_range(1, 65535)(item["port"])
        except ValueError as exc:
            raise ConfigError("--config", f"[[services]]: {exc}") from None
        if len(name) != 1:
            raise ConfigError("--config", "[[services]] name must be a single name")
        key = item.get("api_key")
        out.append(ServiceSpec(name[0], port, str(item.get("host", "localhost")), api_key=str(key) if key else None))
    return tuple(out)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.extend(_flatten(value, full))
        else:
            out.append((full, value))
    return out
