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

import math
import os
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import attrs

from .errors import ConfigError, MultiaddrError
from .identity.multiaddr import Multiaddr

MODES = ("standalone", "local", "node")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@attrs.frozen
class ServiceSpec:
    """A local service this node offers (e.g. an LLM server on ``localhost:8080``)."""

    name: str
    port: int
    host: str = "localhost"


@attrs.frozen
class Config:
    """Everything a node needs to start. Build with :func:`load` or directly in tests."""

    # --- node ---------------------------------------------------------------------
    mode: str = "node"
    bootstrap_addrs: tuple[str, ...] = ()
    public_addr: str | None = None
    host: str = "0.0.0.0"
    tcpport: int = 43905
    udpport: int = 59820
    port: int = 8092
    services: tuple[ServiceSpec, ...] = ()
    seed: str | None = None
    cleanslate: bool = False
    data_dir: Path = attrs.field(default=Path("~/.ocf"), converter=lambda p: Path(p).expanduser())
    log_level: str = "info"
    # --- transport ----------------------------------------------------------------
    ws: bool = True
    max_connections: int = 512
    max_streams_per_connection: int = 1024
    max_pending_handshakes: int = 64
    handshake_timeout: float = 10.0
    dial_timeout: float = 10.0
    max_message_size: int = 1 << 20
    # --- node table ---------------------------------------------------------------
    verify_interval: float = 30.0
    stale_after: float = 600.0
    # --- gateway ------------------------------------------------------------------
    max_body_size: int = 32 << 20
    request_timeout: float = 600.0
    max_forwards_per_peer: int = 256
    cors_origins: str = "*"
    # --- jobs ---------------------------------------------------------------------
    jobs: bool = False
    jobs_max_stages: int = 5
    jobs_max_attempts: int = 3
    jobs_flag_threshold: int = 5
    jobs_max_payload: int = 1 << 20
    jobs_lease_timeout: float = 600.0
    jobs_worker_timeout: float = 3600.0
    jobs_admin_token: str | None = None
    jobs_create_chunk: int = 2000
    jobs_flag_per_worker: bool = False

    def replace(self, **changes: Any) -> "Config":
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
                raise ValueError(f"{exc} (expected a multiaddr like /ip4/1.2.3.4/tcp/43905/p2p/<id> or an http(s) URL)") from None
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
    Setting("mode", "mode", _choice(MODES), "Bootstrap mode: 'standalone' waits for others to connect (a dispatcher), 'local' bootstraps to 127.0.0.1, 'node' bootstraps from --bootstrap.addr (default: node).", metavar="{standalone,local,node}"),
    Setting("bootstrap.addr", "bootstrap_addrs", _bootstrap, "Peers to join in 'node' mode: multiaddrs ending in /p2p/<peer id> (comma-separated or repeated), or an http(s) URL answering {\"bootstraps\": [...]}.", metavar="ADDR"),
    Setting("public-addr", "public_addr", _opt_str, "This node's publicly reachable IP or hostname; recorded in the node table so others can use this node as a bootstrap.", metavar="HOST"),
    Setting("host", "host", _str, "Interface to listen on for peers and the HTTP gateway (default: 0.0.0.0, all interfaces).", metavar="IP"),
    Setting("tcpport", "tcpport", _int_range(0, 65535), "TCP port for peer connections; WebSocket (/tcp/PORT/ws) is served on the same port (default: 43905; 0 picks a free port).", metavar="PORT"),
    Setting("udpport", "udpport", _int_range(0, 65535), "UDP port reserved for QUIC (default: 59820). Accepted for OCF compatibility; QUIC is not implemented yet, so nothing listens on it.", metavar="PORT"),
    Setting("port", "port", _int_range(0, 65535), "HTTP gateway port (default: 8092; 0 picks a free port).", metavar="PORT"),
    Setting("service.name", "service_names", _service_names, "Name of a local service to offer (e.g. 'llm'); repeat together with --service.port to offer several.", metavar="NAME"),
    Setting("service.port", "service_ports", _service_ports, "Port of the local service named by the matching --service.name (reached at localhost:PORT).", metavar="PORT"),
    Setting("seed", "seed", _opt_str, "Derive the node identity deterministically from this string instead of the stored key (for tests and reproducible setups; never in production).", metavar="TEXT"),
    Setting("cleanslate", "cleanslate", _bool, "Discard the stored node table and job data before starting (the identity key is kept).", is_switch=True),
    Setting("data-dir", "data_dir", lambda v: Path(_str(v)).expanduser(), "Directory for the identity key and the LMDB store (default: ~/.ocf).", metavar="DIR"),
    Setting("log-level", "log_level", _choice(LOG_LEVELS), "Log verbosity: debug, info, warning, error or critical (default: info).", metavar="LEVEL"),
    Setting("ws", "ws", _bool, "Also accept libp2p over WebSocket on the TCP port (default: true; --no-ws to disable).", is_switch=True, group="transport"),
    Setting("max-connections", "max_connections", _int_range(1, 1_000_000), "Maximum simultaneous peer connections (default: 512).", group="transport", metavar="N"),
    Setting("max-streams", "max_streams_per_connection", _int_range(1, 1_000_000), "Maximum concurrent streams per peer connection (default: 1024).", group="transport", metavar="N"),
    Setting("max-pending-handshakes", "max_pending_handshakes", _int_range(1, 100_000), "Maximum connections still handshaking at once; more are refused (default: 64).", group="transport", metavar="N"),
    Setting("handshake-timeout", "handshake_timeout", _positive_float, "Seconds a new connection may take to finish its security handshake (default: 10).", group="transport", metavar="SECONDS"),
    Setting("dial-timeout", "dial_timeout", _positive_float, "Seconds to wait when dialing a peer (default: 10).", group="transport", metavar="SECONDS"),
    Setting("max-message-size", "max_message_size", _size, "Largest single protocol message accepted from a peer (default: 1M).", group="transport", metavar="BYTES"),
    Setting("verify-interval", "verify_interval", _positive_float, "Seconds between liveness verification rounds of the node table (default: 30).", group="node table", metavar="SECONDS"),
    Setting("stale-after", "stale_after", _positive_float, "Seconds after which a peer not seen is dropped from the served node table (default: 600).", group="node table", metavar="SECONDS"),
    Setting("max-body-size", "max_body_size", _size, "Largest HTTP request body the gateway accepts (default: 32M).", group="gateway", metavar="BYTES"),
    Setting("request-timeout", "request_timeout", _positive_float, "Seconds a forwarded request may take in total before 504 (default: 600).", group="gateway", metavar="SECONDS"),
    Setting("max-forwards-per-peer", "max_forwards_per_peer", _int_range(1, 1_000_000), "Maximum concurrent requests forwarded to one peer (default: 256).", group="gateway", metavar="N"),
    Setting("cors-origins", "cors_origins", _str, "Allowed CORS origins, comma-separated, or '*' for any (default: *).", group="gateway", metavar="ORIGINS"),
    Setting("jobs", "jobs", _bool, "Host the distributed job tracker on this node (served under /v1/jobs and as the 'jobs' service).", is_switch=True, group="jobs"),
    Setting("jobs.max-stages", "jobs_max_stages", _int_range(1, 100), "Maximum stages a job tracker project may have (default: 5).", group="jobs", metavar="N"),
    Setting("jobs.max-attempts", "jobs_max_attempts", _int_range(1, 1000), "Attempts before a job is marked failed (default: 3).", group="jobs", metavar="N"),
    Setting("jobs.flag-threshold", "jobs_flag_threshold", _int_range(1, 1000), "Distinct workers flagging a job's input as invalid before it is rolled back to the previous stage (default: 5).", group="jobs", metavar="N"),
    Setting("jobs.max-payload", "jobs_max_payload", _size, "Largest job input or output, as JSON, the tracker accepts (default: 1M).", group="jobs", metavar="BYTES"),
    Setting("jobs.lease-timeout", "jobs_lease_timeout", _positive_float, "Default seconds a claimed job stays leased without a heartbeat before it returns to pending (default: 600; projects may set it per stage).", group="jobs", metavar="SECONDS"),
    Setting("jobs.admin-token", "jobs_admin_token", _opt_str, "If set, creating projects and jobs needs 'Authorization: Bearer <token>' (workers never do); prefer OCF_JOBS_ADMIN_TOKEN over the flag so it stays out of ps.", group="jobs", metavar="TOKEN"),
    Setting("jobs.worker-timeout", "jobs_worker_timeout", _positive_float, "Seconds of silence after which a worker is forgotten and its token answers 404 (default: 3600).", group="jobs", metavar="SECONDS"),
    # tracker: bounded job creation and flag counting
    Setting("jobs.create-chunk", "jobs_create_chunk", _int_range(1, 1_000_000), "Jobs written per transaction when creating jobs; a large request commits in chunks, letting workers' requests run in between (default: 2000).", group="jobs", metavar="N"),
    Setting("jobs.flag-per-worker", "jobs_flag_per_worker", _bool, "Count each flagging worker toward --jobs.flag-threshold, instead of each distinct user (default: distinct users, so one person's many workers count once).", is_switch=True, group="jobs"),
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
    services = _services(values.pop("service_names", None), values.pop("service_ports", None))
    if services is None:
        services = file_services or ()
    mode = values.get("mode", "node")
    if mode == "standalone" and values.get("bootstrap_addrs"):
        raise ConfigError("--bootstrap.addr", "standalone mode does not bootstrap; drop --bootstrap.addr or use --mode node")
    return Config(services=services, **values)


def _parse(setting: Setting, raw: Any, where: str) -> Any:
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(where, str(exc)) from None


def _services(names: list[str] | None, ports: list[int] | None) -> tuple[ServiceSpec, ...] | None:
    if names is None and ports is None:
        return None
    names, ports = names or [], ports or []
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
    return tuple(ServiceSpec(n, p) for n, p in zip(names, ports))


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
        out.append(ServiceSpec(name[0], port, str(item.get("host", "localhost"))))
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
