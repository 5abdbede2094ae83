"""``ocf version``: print the version."""

from __future__ import annotations

import argparse
import platform

from ..version import __version__


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="Print the ocf version and exit.", description="Print the ocf version and exit.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(f"ocf {__version__} (Python {platform.python_version()})")
    return 0
