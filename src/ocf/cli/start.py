"""``ocf start``: run a node until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

import trio

from .. import log as logfmt
from ..config import SETTINGS, load
from ..errors import ConfigError, OcfError, find_in_group

log = logging.getLogger("ocf.cli")

EXAMPLES = """\
examples:
  ocf start --mode standalone                      # a dispatcher others connect to
  ocf start --bootstrap.addr=/ip4/1.2.3.4/tcp/43905/p2p/12D3KooW...   # join it
  ocf start --bootstrap.addr=... --service.name=llm --service.port=8080  # offer an LLM

Every flag can also be set as an environment variable (OCF_ + the flag in
upper case with '.' and '-' as '_', e.g. OCF_BOOTSTRAP_ADDR, OCF_DATA_DIR) or
in the TOML file given by --config (keys as the flags, e.g. mode = "local",
[[services]] tables with name and port). Precedence: flag > env > file > default.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "start",
        help="Start a node and run it until interrupted.",
        description="Start a node: join the peer-to-peer network, serve the HTTP gateway, offer local services.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="TOML file with settings (flags and OCF_* variables override it).",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for s in SETTINGS:
        group = groups.get(s.group)
        if group is None:
            group = groups[s.group] = p.add_argument_group(f"{s.group} options")
        dest = "flag:" + s.flag
        if s.is_switch:
            group.add_argument(
                f"--{s.flag}", dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=s.help
            )
        elif s.flag in ("bootstrap.addr", "service.name", "service.port", "service.api-key", "api-key"):
            group.add_argument(
                f"--{s.flag}", dest=dest, action="append", default=argparse.SUPPRESS, metavar=s.metavar, help=s.help
            )
        else:
            group.add_argument(f"--{s.flag}", dest=dest, default=argparse.SUPPRESS, metavar=s.metavar, help=s.help)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    flags = {k.removeprefix("flag:"): v for k, v in vars(args).items() if k.startswith("flag:")}
    try:
        config = load(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"ocf start: error: {exc}", file=sys.stderr)
        return 2
    logfmt.setup(config.log_level)
    try:
        trio.run(_serve, config)
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        log.warning("interrupted again; exiting without finishing shutdown")
        return 130
    except BaseException as exc:  # noqa: BLE001 - map to a one-line message
        err = find_in_group(exc, (OcfError, OSError))
        if err is None:
            raise
        print(f"ocf start: error: {err}", file=sys.stderr)
        return 1
    return 0


async def _serve(config) -> None:  # type: ignore[no-untyped-def]
    from ..node import open_node

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config) as node:
            assert node.gateway is not None
            listening = ", ".join(b.split("://", 1)[-1] for b in node.gateway.binds)
            print(
                f"ocf node {node.peer_id} ready; gateway {node.gateway_url} (listening on {listening})",
                file=sys.stderr,
                flush=True,
            )
            async for signum in signals:
                log.info("shutdown requested %s", logfmt.kv(signal=signal.Signals(signum).name))
                break
            t0 = time.monotonic()
        log.info("shutdown complete %s", logfmt.kv(seconds=round(time.monotonic() - t0, 3)))
