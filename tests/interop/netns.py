"""A one-namespace segment of public-looking addresses, for the DCUtR interop tests.

js-libp2p's DCUtR dials only public addresses (``isPublicAndDialable``):
on 127.0.0.1 it never punches. The segment is a fresh network namespace
whose loopback carries ``11.1.0.1``, ``11.1.0.2``, … (public addresses that
exist only inside it; nothing routes out). The test runs its case in a child
process inside it (:func:`run_inside`), which starts the ocf nodes and the js peer.

A firewall (nftables) can make a listener refuse new connections, so that a
"unilateral" direct dial fails and the DCUtR exchange is what upgrades.

Needs root, ``ip`` and ``nft`` (``tests/setup-external.sh``); when the
segment cannot be made, :class:`SegmentUnavailable` says why and the test
fails with it (never a skip). The namespace is deleted on exit, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from ocf.config import Config

from .jspeer import ensure_installed

PREFIX = "11.1.0"


class SegmentUnavailable(RuntimeError):
    """The namespace could not be made or entered."""


def _run(*argv: str, stdin: str | None = None) -> None:
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise SegmentUnavailable(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")


@attrs.define
class Segment:
    name: str
    ips: list[str]
    _rules: int = 0

    def refuse_new(self, ip: str, port: int) -> None:
        """New TCP connections to ``ip:port`` get a reset (established ones and outbound ones go on)."""
        if self._rules == 0:
            table = "table ip ocfseg {\n chain input {\n  type filter hook input priority 0; policy accept;\n }\n}\n"
            _run("ip", "netns", "exec", self.name, "nft", "-f", "-", stdin=table)
        self._rules += 1
        rule = f"ip daddr {ip} tcp dport {port} ct state new reject with tcp reset"
        _run("ip", "netns", "exec", self.name, "nft", "add", "rule", "ip", "ocfseg", "input", *rule.split())


@contextlib.contextmanager
def public_segment(hosts: int = 3) -> Iterator[Segment]:
    """Make the namespace, yield it, delete it on exit (whatever still runs in it is killed first)."""
    if os.geteuid() != 0:
        raise SegmentUnavailable("the DCUtR interop segment needs root to create a network namespace")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise SegmentUnavailable(f"'{tool}' is not installed (tests/setup-external.sh installs it)")
    name = f"ocfseg{os.getpid() % 100000}"
    segment = Segment(name, [f"{PREFIX}.{i}" for i in range(1, hosts + 1)])
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "-n", name, "link", "set", "lo", "up")
        for ip in segment.ips:
            _run("ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "lo")
        yield segment
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def run_inside(segment: Segment, argv: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``argv`` in the segment (``ip netns exec``); its output, or :class:`AssertionError` with it.

    A separate process, not ``setns`` in the test's own: Trio's worker threads
    (which spawn processes and would be created inside) outlive a test.
    """
    out = subprocess.run(
        ["ip", "netns", "exec", segment.name, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({out.returncode}) in {segment.name}:\n{text[-6000:]}")
    return text


def free_tcp_addr(ip: str) -> str:
    """``/ip4/<ip>/tcp/<a free port>``, for a js peer whose listen address must be known in advance."""
    with socket.socket() as probe:
        probe.bind((ip, 0))
        return f"/ip4/{ip}/tcp/{probe.getsockname()[1]}"


def run_in_segment(module: str, case: str, hosts: int = 3, timeout: float = 150) -> None:
    """Run ``module``'s async function ``case`` in a child process inside a fresh segment; fail with its output.

    The child is ``python -m <module> <case> <namespace> <hosts>``, whose ``__main__`` calls :func:`case_main`.
    """
    ensure_installed()  # npm ci needs the registry, which the namespace cannot reach
    try:
        with public_segment(hosts) as segment:
            out = run_inside(segment, [sys.executable, "-m", module, case, segment.name, str(hosts)], timeout)
    except SegmentUnavailable as exc:
        pytest.fail(f"the segment could not be made: {exc}")
    assert "CASE PASSED" in out, out[-4000:]


def config_factory(tmp: Path) -> Callable[..., Config]:
    """As the ``node_config`` fixture: an isolated node's Config with ephemeral ports."""
    counter = iter(range(100))

    def make(**overrides: Any) -> Config:
        base: dict[str, Any] = dict(mode="standalone", tcpport=0, port=0, log_level="debug")
        base.update(data_dir=tmp / f"node{next(counter)}", **overrides)
        return Config(**base)

    return make


def case_main(cases: dict[str, Any]) -> None:
    """The child's side of :func:`run_in_segment`: run one case with a config factory and the segment."""
    case, name, hosts = sys.argv[1], sys.argv[2], int(sys.argv[3])
    fn: Callable[[Callable[..., Config], Segment], Awaitable[None]] = cases[case]
    if os.environ.get("OCF_CASE_LOG"):  # debugging a case: the nodes' logs on stderr
        from ocf import log

        log.setup(os.environ["OCF_CASE_LOG"])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trio.run(fn, config_factory(Path(tmp)), Segment(name, [f"{PREFIX}.{i}" for i in range(1, hosts + 1)]))
        except BaseException as exc:  # the leaves only: nested nursery groups bury them in the parent's output
            for leaf in _leaves(exc):
                traceback.print_exception(type(leaf), leaf, leaf.__traceback__, limit=-12)
            raise SystemExit(1) from None
    print("CASE PASSED")


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc
