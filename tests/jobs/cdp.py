"""A minimal Chrome DevTools Protocol client for browser tests (test helper, not product code).

Why hand-written: the dashboard test needs five CDP commands (navigate,
evaluate, screenshot, and two ``enable`` calls) and the console events, which
is less code than a Selenium/Playwright dependency and its browser-download
machinery. It speaks CDP over ``trio_websocket`` (already a dependency) to
Debian's headless Chromium, attaching to one page with a *flattened* session
so everything goes over the browser's single WebSocket.

Lifetimes are structured: :func:`open_browser` owns the Chromium process
(its own process group, killed on exit whatever happens) and a nursery with
the stderr drain and the WebSocket reader.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "/usr/bin/chromium")
DEVTOOLS_LINE = re.compile(rb"DevTools listening on (ws://\S+)")
STARTUP_TIMEOUT = 20.0
COMMAND_TIMEOUT = 15.0


def find_chromium() -> str | None:
    """The Chromium executable to drive, or None (callers skip their test then)."""
    override = os.environ.get("OCF_TEST_CHROMIUM")
    if override:
        return override if Path(override).exists() else None
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class CDPError(Exception):
    """A CDP command answered with an error, or a page script threw."""


class _Reply:
    """One pending command's answer: set once by the reader task, awaited by the caller."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.message: dict[str, Any] = {}


class CDPConnection:
    """Commands and events over one DevTools WebSocket (browser endpoint, flattened sessions)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, _Reply] = {}
        self.events: list[dict[str, Any]] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    async def reader(self) -> None:
        """Route answers to their callers and keep every event (tests inspect them afterwards)."""
        while True:
            try:
                message = json.loads(await self.ws.get_message())
            except ConnectionClosed:
                return  # the browser went away (Browser.close, or it died: pending commands time out)
            if "id" in message:
                reply = self.pending.pop(message["id"], None)
                if reply is not None:
                    reply.message = message
                    reply.event.set()
            else:
                self.events.append(message)
                for listener in self.listeners:
                    listener(message)

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        self.next_id += 1
        command: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session is not None:
            command["sessionId"] = session
        reply = self.pending[self.next_id] = _Reply()
        await self.ws.send_message(json.dumps(command))
        with trio.fail_after(COMMAND_TIMEOUT):
            await reply.event.wait()
        if "error" in reply.message:
            raise CDPError(f"{method}: {reply.message['error']}")
        result: dict[str, Any] = reply.message.get("result", {})
        return result


class Page:
    """One tab, driven through its flattened CDP session."""

    def __init__(self, cdp: CDPConnection, session: str) -> None:
        self.cdp = cdp
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.send(method, params, session=self.session)

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CDPError(f"navigating to {url}: {result['errorText']}")

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a page expression (promises awaited); page exceptions raise :class:`CDPError`."""
        result = await self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise CDPError(
                f"{expression!r} threw: {details.get('exception', {}).get('description') or details.get('text')}"
            )
        return result["result"].get("value")

    async def wait_for(self, expression: str, interval: float = 0.05) -> Any:
        """Poll a JS condition until truthy (for 10 s): the browser is another process, nothing to wait on in Trio."""
        with trio.fail_after(10):
            while True:
                value = await self.evaluate(expression)
                if value:
                    return value
                await trio.sleep(interval)

    async def screenshot(self) -> bytes:
        result = await self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        return base64.b64decode(result["data"])

    def errors(self) -> list[str]:
        """Uncaught exceptions, ``console.error`` calls and error log entries (CSP, failed loads) so far."""
        out = []
        for event in self.cdp.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                out.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append(
                    "console.error: "
                    + " ".join(str(a.get("value", a.get("description"))) for a in params.get("args", []))
                )
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        return out


async def _read_devtools_url(stream: trio.abc.ReceiveStream, tail: list[bytes]) -> str:
    buffer = b""
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise RuntimeError("chromium exited before opening DevTools:\n" + b"".join(tail).decode(errors="replace"))
        tail.append(chunk)
        buffer += chunk
        match = DEVTOOLS_LINE.search(buffer)
        if match:
            return match.group(1).decode()


async def _drain(stream: trio.abc.ReceiveStream, tail: list[bytes]) -> None:
    """Keep reading Chromium's stderr so a full pipe never blocks it; keep the last bit for errors."""
    while chunk := await stream.receive_some(65536):
        tail.append(chunk)
        del tail[:-20]


def _kill_group(process: trio.Process) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@asynccontextmanager
async def open_browser(profile_dir: Path, *, width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """Headless Chromium with one blank page; the whole process group is killed on exit."""
    executable = find_chromium()
    if executable is None:
        raise RuntimeError(
            "no chromium executable found: run tests/setup-external.sh (tox does), or set OCF_TEST_CHROMIUM"
        )
    argv = [
        executable,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--mute-audio",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile_dir}",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    assert process.stderr is not None
    tail: list[bytes] = []
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(STARTUP_TIMEOUT):
                url = await _read_devtools_url(process.stderr, tail)
            nursery.start_soon(_drain, process.stderr, tail)
            async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
                cdp = CDPConnection(ws)
                nursery.start_soon(cdp.reader)
                target = await cdp.send("Target.createTarget", {"url": "about:blank"})
                attached = await cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
                page = Page(cdp, attached["sessionId"])
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                )
                for domain in ("Page", "Runtime", "Log"):
                    await page.send(f"{domain}.enable")
                yield page
                with trio.move_on_after(2):
                    await cdp.send("Browser.close")
            nursery.cancel_scope.cancel()
    finally:
        _kill_group(process)
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await process.wait()
