"""``ocf keygen-swarm FILE``: make a private network key (go-libp2p's swarm.key format).

Give the same file to every node of the network (``--network-key FILE``).
The file is created readable by its owner only and never overwritten: a
replaced key silently splits the network it belongs to.
"""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keygen-swarm",
        help="Create a private network key file for --network-key.",
        description=(
            "Write a new random pre-shared key in the swarm.key format that go-libp2p, js-libp2p and IPFS "
            "read. Nodes started with --network-key FILE talk only to nodes with the same key."
        ),
        epilog="example: ocf keygen-swarm ~/.ocf/swarm.key && ocf start --network-key ~/.ocf/swarm.key",
    )
    p.add_argument(
        "file",
        metavar="FILE",
        help="Where to write the key ('-' for standard output); an existing file is never overwritten.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..transport.pnet import generate_swarm_key

    data = generate_swarm_key()
    if args.file == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    path = os.path.expanduser(args.file)
    try:
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)  # e.g. ~/.ocf before the first start
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"ocf keygen-swarm: error: {path} exists; not overwriting a network key", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ocf keygen-swarm: error: cannot create {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    print(
        f"wrote a new network key to {path}; copy it to every node of the network and start them with --network-key "
        f"{path}",
        file=sys.stderr,
    )
    return 0
