"""A throwaway PostgreSQL cluster for the tests and the benchmark: ``initdb`` into a temp dir, a free port.

The tracker's PostgreSQL store is tested against the real server, never a
mock: the semantics that matter (row locks, ``SKIP LOCKED``, savepoints,
``LISTEN/NOTIFY``, a server killed mid-run) only exist there. PostgreSQL
refuses to run as root, so when the suite runs as root the cluster belongs to
the unprivileged ``postgres`` user Debian's package creates. A missing server
is an error naming ``tests/setup-external.sh``, never a skip.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.ports import free_port

SETUP_HINT = "run tests/setup-external.sh (it installs Debian's postgresql)"


class PostgresMissing(RuntimeError):
    """No PostgreSQL server binaries on this machine."""


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding ``initdb`` and ``postgres``."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        on_path = shutil.which("initdb")
        if on_path:
            return Path(on_path).parent
        raise PostgresMissing(f"PostgreSQL server binaries (initdb, postgres) not found; {SETUP_HINT}")
    return found[-1]


class Cluster:
    """One ``postgres`` server on 127.0.0.1:``port``; ``url(db)`` for a database on it."""

    def __init__(self, root: Path | None = None, *, fsync: bool = False) -> None:
        self.bindir = find_bindir()
        self.root = Path(root or tempfile.mkdtemp(prefix="ocf-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.fsync = fsync
        self.user = "postgres" if os.geteuid() == 0 else None
        self.proc: subprocess.Popen[bytes] | None = None

    def _cmd(self, argv: list[str]) -> list[str]:
        if self.user is None:
            return argv
        return ["runuser", "-u", self.user, "--", *argv]

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            shutil.chown(self.root, self.user)
        subprocess.run(
            self._cmd(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start(self) -> None:
        """Start the server and return once it accepts connections (``pg_ctl -w`` waits for that)."""
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                f"-c fsync={'on' if self.fsync else 'off'}",
                "-c max_connections=200",
                "-c shared_buffers=128MB",
            ]
        )
        subprocess.run(
            self._cmd(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.root / "server.log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def kill9(self) -> None:
        """SIGKILL the postmaster (its backends exit when they notice it is gone)."""
        import psutil

        pid = self.pid()
        children = psutil.Process(pid).children()
        os.kill(pid, signal.SIGKILL)
        # Backends of a killed postmaster hold its shared memory until they exit: a restart waits for them.
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=10)

    def stop(self) -> None:
        if not (self.data / "postmaster.pid").exists():
            return
        subprocess.run(
            self._cmd([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]),
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def url(self, db: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
