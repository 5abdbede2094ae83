"""``ocf ping <multiaddr>``: ping any libp2p peer with ``/ipfs/ping/1.0.0`` and print RTTs.

It dials with a fresh throwaway identity and listens nowhere, so it can run
next to a node on the same machine without touching its data directory.
Output follows the ``ping`` command; exit code 0 if at least one reply came
back, 1 otherwise (or on any connection error), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import TYPE_CHECKING

import trio

from .. import log as logfmt
from ..config import Config
from ..errors import MultiaddrError, OcfError, find_in_group
from ..identity import Identity, Multiaddr

if TYPE_CHECKING:
    from ..transport.pnet import NetworkKey


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ping",
        help="Ping a libp2p peer by multiaddr and print round-trip times.",
        description=(
            "Connect to a libp2p peer (ours or any other implementation) and measure round-trip times with "
            "/ipfs/ping/1.0.0."
        ),
        epilog=(
            "examples: ocf ping /ip4/127.0.0.1/tcp/43905/p2p/12D3KooW... --count 3; "
            "ocf ping /ip4/127.0.0.1/udp/59820/quic-v1/p2p/12D3KooW..."
        ),
    )
    p.add_argument(
        "addr",
        metavar="MULTIADDR",
        help="Peer address, e.g. /ip4/1.2.3.4/tcp/43905/p2p/<peer id> (also /ws, and /udp/PORT/quic-v1).",
    )
    p.add_argument("-c", "--count", type=_positive_int, default=4, metavar="N", help="Number of pings (default: 4).")
    p.add_argument(
        "-i",
        "--interval",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="Seconds between pings (default: 1).",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="Seconds to wait for the connection and for each reply (default: 10).",
    )
    p.add_argument(
        "--network-key",
        metavar="FILE",
        default=None,
        help="Ping a node of a private network: its swarm.key file (as the node's --network-key; also "
        "OCF_NETWORK_KEY).",
    )
    p.set_defaults(func=run)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    try:
        addr = Multiaddr.parse(args.addr)
    except MultiaddrError as exc:
        print(f"ocf ping: error: {exc}", file=sys.stderr)
        return 2
    key_file = args.network_key or os.environ.get("OCF_NETWORK_KEY") or None
    network_key = None
    if key_file:
        from ..transport.pnet import load_network_key

        try:
            network_key = load_network_key(key_file)
        except ValueError as exc:
            print(f"ocf ping: error: --network-key: {exc}", file=sys.stderr)
            return 2
    logfmt.setup("warning")
    try:
        return trio.run(_ping, addr, args.count, args.interval, args.timeout, network_key)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:  # noqa: BLE001 - one-line error for the user
        err = find_in_group(exc, (OcfError, OSError, trio.TooSlowError))
        if err is None:
            raise
        message = "timed out" if isinstance(err, trio.TooSlowError) else str(err)
        print(f"ocf ping: error: {message}", file=sys.stderr)
        return 1


async def _ping(
    addr: Multiaddr, count: int, interval: float, step_timeout: float, network_key: NetworkKey | None = None
) -> int:
    """Dial, open a ping stream, ping ``count`` times: each step, not the whole run, has ``step_timeout``."""
    from ..transport import open_host
    from ..transport.ping import PING_SIZE, open_ping_stream, ping_once

    config = Config(dial_timeout=step_timeout, handshake_timeout=step_timeout, ws=False, network_key=network_key)
    async with open_host(Identity.generate(), config, listen=False) as host:
        t0 = trio.current_time()
        with trio.fail_after(step_timeout * 2):
            peer = await host.connect(addr)
        print(f"PING {addr}: connected to {peer} in {(trio.current_time() - t0) * 1000:.2f} ms", flush=True)
        rtts: list[float] = []
        with trio.fail_after(step_timeout):
            stream = await open_ping_stream(host, peer)
        async with stream:
            for seq in range(1, count + 1):
                if seq > 1:
                    await trio.sleep(interval)
                try:
                    with trio.fail_after(step_timeout):
                        rtt = await ping_once(stream)
                except trio.TooSlowError:
                    print(f"no reply: seq={seq} (timeout {step_timeout:g}s)", flush=True)
                    break  # the stream is out of step now; stop like a lost connection
                except OcfError as exc:
                    print(f"error: seq={seq} {exc}", flush=True)
                    break
                rtts.append(rtt)
                print(f"{PING_SIZE} bytes from {peer}: seq={seq} time={rtt * 1000:.3f} ms", flush=True)
        lost = count - len(rtts)
        print(f"--- {addr} ping statistics ---")
        summary = f"{count} pings transmitted, {len(rtts)} received, {lost * 100 // count}% loss"
        if rtts:
            ms = [r * 1000 for r in rtts]
            figures = (min(ms), statistics.fmean(ms), max(ms), statistics.median(ms))
            summary += f", rtt min/avg/max/median = {'/'.join(f'{v:.3f}' for v in figures)} ms"
        print(summary, flush=True)
        return 0 if rtts else 1
