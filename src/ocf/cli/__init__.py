"""Command line: ``ocf <command>`` / ``python -m ocf <command>``.

A thin layer: each subcommand module parses its flags, builds what it needs
with the library, and maps errors to one-line messages and exit codes
(0 ok, 1 runtime failure, 2 bad usage or configuration).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn
from collections.abc import Sequence

from ..version import __version__

# Each module defines ``register(subparsers)``; order is the order in --help.
SUBCOMMANDS = ("start", "jobs", "worker", "ping", "swarmkey", "version")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> Parser:
    parser = Parser(
        prog="ocf",
        description=(
            "ocf: a node of a decentralized compute fabric (peer-to-peer network, service routing, job tracker)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ocf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
