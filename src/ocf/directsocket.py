"""A TCP stream that reads and writes its socket's descriptor directly.

Trio's ``SocketStream`` passes through the scheduler after every successful
``send``/``recv`` (a schedule point) and wraps each call in several layers.
For the small request/response messages that dominate ocf's traffic that
overhead is larger than the work itself: a noticeable share of a bulk
transfer, and a whole scheduler pass on every message of a round trip.
:class:`DirectSocketStream` does the system call itself and only waits
(``wait_readable``/``wait_writable``) when the kernel says it must.
Fairness comes from a budget instead of a yield per call: after
``YIELD_AFTER`` bytes moved without waiting, the next call yields once, so a
peer that never pauses cannot starve the other tasks.

Used by the secure channel over TCP (:mod:`ocf.transport.secure`), by the
gateway's HTTP server (:mod:`ocf.httpstream.listener`) and by the pool of
backend connections (:mod:`ocf.httpstream.pool`).
"""

from __future__ import annotations

import os

import trio

#: Bytes moved without waiting before a call yields to other tasks anyway.
YIELD_AFTER = 1 << 20
#: A read shorter than this most likely emptied the socket.
SHORT_READ = 64 * 1024
DEFAULT_READ = 64 * 1024


class DirectSocketStream(trio.abc.HalfCloseableStream):
    """Wraps a connected ``trio.SocketStream``; closing this closes it."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._read_budget = 0
        self._write_budget = 0
        self._short_read = False  # the last read most likely drained the socket

    def _fd(self) -> int:
        fd = self.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the socket is closed")
        return fd

    # --- writing -----------------------------------------------------------------------

    def write_nowait(self, data: bytes | bytearray | memoryview) -> memoryview:
        """Write what the kernel takes now, without waiting; returns the rest (empty if all went)."""
        view = memoryview(data)
        fd = self._fd()
        try:
            while view:
                view = view[os.write(fd, view) :]
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc
        return view

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        rest = self.write_nowait(data)
        if rest:
            self._write_budget = 0
            while rest:
                await trio.lowlevel.wait_writable(self.socket)
                rest = self.write_nowait(rest)
            return
        self._write_budget += len(data)
        if self._write_budget >= YIELD_AFTER:
            self._write_budget = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self.socket)

    # --- reading -----------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = DEFAULT_READ if max_bytes is None else max_bytes
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        self._fd()  # closed: say so before waiting on it
        if self._read_budget >= YIELD_AFTER:
            self._read_budget = 0
            await trio.lowlevel.checkpoint()
        elif self._short_read:
            # Most likely nothing is there yet: wait rather than pay for a failed
            # system call and an exception.
            self._read_budget = 0
            await trio.lowlevel.wait_readable(self.socket)
        while True:
            fd = self._fd()
            try:
                data = os.read(fd, size)
            except BlockingIOError:
                self._read_budget = 0
                await trio.lowlevel.wait_readable(self.socket)
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc
            self._read_budget += len(data)
            self._short_read = len(data) < min(size, SHORT_READ)
            return data

    # --- closing -----------------------------------------------------------------------

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
