#!/usr/bin/env python
"""The README walkthrough in one command: a dispatcher, two workers with mock LLMs, an OpenAI client.

    python examples/walkthrough.py              # README's ports: 8092/43905, workers 8093/8094, LLMs 8080/8081
    python examples/walkthrough.py --free-ports # any free ports (used by the test suite)

Starts the same processes the README's three terminals start (``python -m
ocf start ...`` and ``python examples/mock_llm.py ...``), waits until the
dispatcher's node table lists both workers' models, runs the README's
OpenAI client snippet against the dispatcher, prints what it got and stops
everything. Exit status 0 means the walkthrough works as written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - local URL
        return json.loads(response.read())


def wait_for(what: str, check, timeout: float = 60.0) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(0.2)
    raise SystemExit(f"walkthrough: timed out waiting for {what} (last error: {last})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--free-ports", action="store_true", help="use free ports instead of the README's")
    args = parser.parse_args()
    if args.free_ports:
        gw, tcp, w1, w1tcp, w2, w2tcp, llm1, llm2 = (free_port() for _ in range(8))
    else:
        gw, tcp, w1, w1tcp, w2, w2tcp, llm1, llm2 = 8092, 43905, 8093, 43906, 8094, 43907, 8080, 8081
    tmp = Path(tempfile.mkdtemp(prefix="ocf-walkthrough-"))
    py = sys.executable
    # The README's commands (with --mode local the workers find the dispatcher on 127.0.0.1:<tcp>;
    # on free ports they are told its address instead, since "local" means port 43905).
    commands = {
        "dispatcher": [
            py,
            "-m",
            "ocf",
            "start",
            "--mode",
            "standalone",
            "--port",
            str(gw),
            "--tcpport",
            str(tcp),
            "--udpport",
            "0",
            "--data-dir",
            str(tmp / "dispatcher"),
        ],
        "llm1": [py, "examples/mock_llm.py", "--port", str(llm1), "--model", "m1"],
        "llm2": [py, "examples/mock_llm.py", "--port", str(llm2), "--model", "m2", "--token-delay", "0.05"],
    }
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    failed = False

    def spawn(name: str, argv: list[str]) -> None:
        logs[name] = (tmp / f"{name}.log").open("w")
        procs[name] = subprocess.Popen(
            argv, cwd=ROOT, stdout=logs[name], stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )

    try:
        for name, argv in commands.items():
            spawn(name, argv)
        health = wait_for("the dispatcher", lambda: get_json(f"http://127.0.0.1:{gw}/v1/health"))
        if args.free_ports:
            join = ["--mode", "node", "--bootstrap.addr", f"/ip4/127.0.0.1/tcp/{tcp}/p2p/{health['peer_id']}"]
        else:
            join = ["--mode", "local"]
        for name, port, tport, llm in (("worker1", w1, w1tcp, llm1), ("worker2", w2, w2tcp, llm2)):
            spawn(
                name,
                [
                    py,
                    "-m",
                    "ocf",
                    "start",
                    *join,
                    "--port",
                    str(port),
                    "--tcpport",
                    str(tport),
                    "--udpport",
                    "0",
                    "--data-dir",
                    str(tmp / name),
                    "--service.name",
                    "llm",
                    "--service.port",
                    str(llm),
                ],
            )

        def both_models():
            listing = get_json(f"http://127.0.0.1:{gw}/v1/service/llm/v1/models")
            return {m["id"] for m in listing["data"]} >= {"m1", "m2"}

        wait_for("both workers' models in the dispatcher's node table", both_models)

        # --- the README's client snippet -------------------------------------------------
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{gw}/v1/service/llm/v1", api_key="any")
        models = [m.id for m in client.models.list()]
        print(models)
        nodes = {}
        for model in ("m1", "m2"):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hello"}]
            )
            content = raw.parse().choices[0].message.content
            nodes[model] = raw.headers["x-computing-node"]
            print(nodes[model], content)
            assert content == f"[{model}] you said: hello", content
        stream = client.chat.completions.create(
            model="m2", stream=True, messages=[{"role": "user", "content": "one token at a time"}]
        )
        parts = []
        for chunk in stream:
            part = chunk.choices[0].delta.content if chunk.choices else None
            print(part or "", end="", flush=True)
            parts.append(part or "")
        print()
        assert "".join(parts) == "[m2] you said: one token at a time"
        assert models == ["m1", "m2"] and nodes["m1"] != nodes["m2"]
        print("walkthrough OK")
        return 0
    except BaseException:
        failed = True
        raise
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGINT)
        for name, proc in procs.items():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                print(f"walkthrough: {name} did not stop on Ctrl-C", file=sys.stderr)
        for log in logs.values():
            log.close()
        if failed:
            for name in logs:
                print(f"--- {name} log ---\n" + (tmp / f"{name}.log").read_text()[-3000:], file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
