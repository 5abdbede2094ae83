"""A NAT lab in network namespaces: one public relay, two nodes each behind its own NAT.

::

    ns R  (the "internet", and the relay on it):  bridge 172.31.0.1/24
      ├─ veth ── ns NA (NAT): wan 172.31.0.2 │ lan 192.168.1.1 ── ns A: 192.168.1.2 (default via .1)
      └─ veth ── ns NB (NAT): wan 172.31.0.3 │ lan 192.168.2.1 ── ns B: 192.168.2.2 (default via .1)

Each NAT masquerades its LAN behind its WAN address (nftables) and, like a
home router, drops unsolicited inbound connections on its WAN side, so the
nodes behind it are reachable only through the relay, until hole punching
opens a path. Nothing routes out of the lab: the namespaces have no link to
the host's own network, and the addresses exist only inside them.

Needs root, ``ip`` (iproute2) and ``nft`` (nftables), which
``tests/setup-external.sh`` installs. :func:`nat_lab` raises
:class:`LabUnavailable` with the reason when the lab cannot be built; the
test turns that into a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from collections.abc import Iterator

import attrs

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "172.31.0"
RELAY_IP = f"{PUBLIC}.1"
NAT_RULES = """
table ip ocfnat {{
  chain natpost {{
    type nat hook postrouting priority 100; policy accept;
    oifname "wan" ip saddr {lan}.0/24 masquerade
  }}
  chain forwarding {{
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    {only_udp}iifname "lan" oifname "wan" accept
  }}
  chain incoming {{
    type filter hook input priority 0; policy accept;
    iifname "wan" ct state new drop
  }}
}}
"""


class LabUnavailable(RuntimeError):
    """The namespaces could not be made (not root, no iproute2/nftables, no permission)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise LabUnavailable(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


@attrs.define
class Lab:
    tag: str
    names: dict[str, str]  # role (R, NA, NB, A, B) -> namespace name
    punch: str = "tcp"  # "quic": the NATs pass TCP to the relay only, so a hole punch must be QUIC's
    procs: list[subprocess.Popen[bytes]] = attrs.field(factory=list)

    def ns(self, role: str) -> str:
        return self.names[role]

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[role], *argv]

    def spawn(self, role: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = log.open("wb")
        proc = subprocess.Popen(
            self.exec_argv(role, argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT / "src")),
            start_new_session=True,
        )
        out.close()
        self.procs.append(proc)
        return proc

    def http(self, role: str, method: str, url: str, body: object = None, timeout: float = 30.0) -> tuple[int, object]:
        """An HTTP request made from inside namespace ``role`` (status, parsed JSON or text)."""
        script = (
            "import json,sys,urllib.request,urllib.error\n"
            "m,u,b,t=sys.argv[1],sys.argv[2],sys.argv[3],float(sys.argv[4])\n"
            "req=urllib.request.Request(u,method=m,data=b.encode() if b else None,"
            "headers={'content-type':'application/json'})\n"
            "try:\n r=urllib.request.urlopen(req,timeout=t); s,d=r.status,r.read()\n"
            "except urllib.error.HTTPError as e: s,d=e.code,e.read()\n"
            "print(json.dumps([s,d.decode('utf-8','replace')]))\n"
        )
        argv = [sys.executable, "-c", script, method, url, json.dumps(body) if body is not None else "", str(timeout)]
        out = subprocess.run(self.exec_argv(role, argv), capture_output=True, text=True, timeout=timeout + 10)
        if out.returncode != 0:
            raise RuntimeError(f"http from {role} failed: {out.stderr[-500:]}")
        status, text = json.loads(out.stdout)
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def stop(self) -> None:
        """Stop every process started in the lab (SIGINT, then SIGKILL), and whatever still runs in its namespaces."""
        for proc in self.procs:
            _signal(proc, signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
        self.procs.clear()
        for name in self.names.values():  # children they started, which we do not hold handles to
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    """The process's group when it leads one (spawn makes it so), else the process itself."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise LabUnavailable("the NAT lab needs root to create network namespaces")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            raise LabUnavailable(f"'{tool}' is not installed (tests/setup-external.sh installs iproute2 and nftables)")


def _build(lab: Lab) -> None:
    n = lab.names
    for name in n.values():
        _run("ip", "netns", "add", name)
    for name in n.values():
        _run("ip", "-n", name, "link", "set", "lo", "up")
    r = n["R"]
    _run("ip", "-n", r, "link", "add", "br0", "type", "bridge")
    _run("ip", "-n", r, "addr", "add", f"{RELAY_IP}/24", "dev", "br0")
    _run("ip", "-n", r, "link", "set", "br0", "up")
    for i, (nat, node) in enumerate((("NA", "A"), ("NB", "B")), start=1):
        lan = f"192.168.{i}"
        up, down = f"u{lab.tag}{i}", f"d{lab.tag}{i}"
        # WAN: a veth from the NAT into the relay's bridge
        _run("ip", "link", "add", up, "type", "veth", "peer", "name", "wan", "netns", n[nat])
        _run("ip", "link", "set", up, "netns", r)
        _run("ip", "-n", r, "link", "set", up, "master", "br0")
        _run("ip", "-n", r, "link", "set", up, "up")
        _run("ip", "-n", n[nat], "addr", "add", f"{PUBLIC}.{i + 1}/24", "dev", "wan")
        _run("ip", "-n", n[nat], "link", "set", "wan", "up")
        # LAN: a veth from the NAT to the node
        _run("ip", "link", "add", down, "type", "veth", "peer", "name", "eth0", "netns", n[node])
        _run("ip", "link", "set", down, "netns", n[nat])
        _run("ip", "-n", n[nat], "link", "set", down, "name", "lan")
        _run("ip", "-n", n[nat], "addr", "add", f"{lan}.1/24", "dev", "lan")
        _run("ip", "-n", n[nat], "link", "set", "lan", "up")
        _run("ip", "-n", n[node], "addr", "add", f"{lan}.2/24", "dev", "eth0")
        _run("ip", "-n", n[node], "link", "set", "eth0", "up")
        _run("ip", "-n", n[node], "route", "add", "default", "via", f"{lan}.1")
        _run("ip", "netns", "exec", n[nat], "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        rules = subprocess.run(
            ["ip", "netns", "exec", n[nat], "nft", "-f", "-"],
            input=NAT_RULES.format(lan=lan, only_udp=_only_udp(lab.punch)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if rules.returncode != 0:
            raise LabUnavailable(f"nft in {n[nat]} failed: {rules.stderr.strip()}")


def _only_udp(punch: str) -> str:
    """With ``punch="quic"``: a NAT forwards TCP to the relay only (a TCP hole punch cannot succeed)."""
    if punch == "tcp":
        return ""
    return f'iifname "lan" oifname "wan" ip daddr != {RELAY_IP} meta l4proto tcp drop\n    '


def _teardown(lab: Lab) -> None:
    try:
        lab.stop()
    finally:
        _delete(lab)


def _delete(lab: Lab) -> None:
    for name in lab.names.values():
        _run("ip", "netns", "del", name, check=False)  # deleting a namespace deletes its veths


@contextlib.contextmanager
def nat_lab(punch: str = "tcp") -> Iterator[Lab]:
    """Build the lab, yield it, tear it down (processes and namespaces) even on failure.

    ``punch="quic"`` makes the NATs pass TCP only to the relay, so that nodes reach each other
    directly only by a QUIC hole punch.
    """
    check_prerequisites()
    tag = f"{os.getpid() % 100000}"
    lab = Lab(tag, {role: f"ocf{role}{tag}" for role in ("R", "NA", "NB", "A", "B")}, punch)
    try:
        _build(lab)
        yield lab
    finally:
        _teardown(lab)
