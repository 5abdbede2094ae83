"""Drive a js-libp2p peer (peer.mjs) from Trio tests.

The peer speaks newline-delimited JSON on stdin/stdout: it prints one
``{"event": "ready", "peerId", "addrs"}`` line, then answers each
``{"id", "cmd", ...}`` request with ``{"id", "ok", ...}``. Commands: ping,
identify, echo (streams N bytes over ``/ocf/echo/1.0.0`` and checks them),
dial, dhtFindPeer, dhtTable, peerStoreAddrs (with a DHT), streams (M concurrent echo streams on one
connection), peers, addrs, connections, stop. It listens on TCP, WebSocket and (outside a private network)
QUIC. It also serves ``/ocf/echo/1.0.0`` itself.

``npm ci`` installs the pinned packages (package-lock.json) on first use, or
``tests/setup-external.sh`` does it before the suite. ``@chainsafe/libp2p-quic``
ships its native code as one optional package per platform; the registry this
project installs from carries only the linux-x64-gnu one, so package.json maps
the others to ``native-stub/`` (an empty package) to keep the lock complete
for ``npm ci``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator

import trio

HERE = Path(__file__).parent
STAMP = HERE / "node_modules" / ".stamp"


def ensure_installed() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("the js-libp2p interop peer needs node and npm on PATH")
    lock = HERE / "package-lock.json"
    if STAMP.exists() and STAMP.stat().st_mtime >= lock.stat().st_mtime:
        return
    result = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"npm ci failed in {HERE}: {result.stderr[-2000:]}")
    STAMP.touch()


class JsPeer:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.peer_id = ""
        self.addrs: list[str] = []
        self._ids = itertools.count(1)
        self._buf = b""
        self._lock = trio.Lock()

    async def _line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while b"\n" not in self._buf:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise RuntimeError("js peer exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def addr(self, transport: str = "tcp") -> str:
        """The peer's address for ``transport``: ``tcp``, ``ws`` or ``quic``."""
        for a in self.addrs:
            kind = "quic" if "/quic-v1" in a else "ws" if "/ws/" in a else "tcp"
            if kind == transport:
                return a
        raise LookupError(transport)

    async def request(self, cmd: str, **kw: Any) -> dict[str, Any]:
        async with self._lock:  # one request at a time keeps replies in order
            rid = next(self._ids)
            assert self.process.stdin is not None
            await self.process.stdin.send_all((json.dumps({"id": rid, "cmd": cmd, **kw}) + "\n").encode())
            reply = await self._line()
        if not reply.get("ok"):
            raise RuntimeError(f"js peer {cmd} failed: {reply.get('error')}")
        return reply


@contextlib.asynccontextmanager
async def open_js_peer(
    swarm_key_file: Path | None = None,
    *,
    dht: str | None = None,
    dht_protocol: str | None = None,
    relay: bool = False,
    relay_listen: str | None = None,
    listen: list[str] | None = None,
    announce: list[str] | None = None,
    autonat_v2: bool = False,
) -> AsyncIterator[JsPeer]:
    """A running js peer; with ``swarm_key_file`` it runs in that private network (@libp2p/pnet).

    ``dht`` ("server" or "client") runs @libp2p/kad-dht on ``dht_protocol`` (default /ipfs/kad/1.0.0).
    ``relay=True`` makes it a circuit relay v2 server; ``relay_listen`` (a
    ``…/p2p-circuit`` address) makes it reserve on that relay and listen there.
    ``listen`` replaces its listen addresses; ``announce`` are announced as verified;
    ``autonat_v2`` runs @libp2p/autonat-v2 too.
    """
    ensure_installed()
    env = dict(os.environ)
    for name in (
        "OCF_JS_SWARM_KEY_FILE",
        "OCF_JS_DHT",
        "OCF_JS_DHT_PROTOCOL",
        "OCF_JS_RELAY",
        "OCF_JS_RELAY_LISTEN",
        "OCF_JS_LISTEN",
        "OCF_JS_ANNOUNCE",
        "OCF_JS_AUTONAT_V2",
    ):
        env.pop(name, None)
    if swarm_key_file is not None:
        env["OCF_JS_SWARM_KEY_FILE"] = str(swarm_key_file)
    if dht is not None:
        env["OCF_JS_DHT"] = dht
        if dht_protocol is not None:
            env["OCF_JS_DHT_PROTOCOL"] = dht_protocol
    if relay:
        env["OCF_JS_RELAY"] = "1"
    if relay_listen is not None:
        env["OCF_JS_RELAY_LISTEN"] = relay_listen
    if listen is not None:
        env["OCF_JS_LISTEN"] = ",".join(listen)
    if announce is not None:
        env["OCF_JS_ANNOUNCE"] = ",".join(announce)
    if autonat_v2:
        env["OCF_JS_AUTONAT_V2"] = "1"
    process = await trio.lowlevel.open_process(
        ["node", str(HERE / "peer.mjs")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE, env=env
    )
    peer = JsPeer(process)
    try:
        with trio.fail_after(30):
            ready = await peer._line()
        peer.peer_id, peer.addrs = ready["peerId"], ready["addrs"]
        yield peer
    finally:
        with trio.move_on_after(5) as scope:
            scope.shield = True
            with contextlib.suppress(Exception):  # it may be gone already
                await peer.request("stop")
            await process.wait()
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
