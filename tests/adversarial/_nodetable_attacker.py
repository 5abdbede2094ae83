"""A hostile node-table peer built from the project's own Identity, Record and wire code."""

from __future__ import annotations

import functools
import os
import time

import trio

from ocf.identity import Identity
from tests.waiting import wait_until
from ocf.nodetable import PROTOCOL, wire
from ocf.nodetable.heartbeat import Heartbeat
from ocf.nodetable.record import OwnerDoc, Record


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")  # pragma: no cover


@functools.lru_cache(maxsize=4)
def sybils(n: int) -> tuple[tuple[Identity, Record], ...]:
    """``n`` fresh self-signed identities, each with a valid one-entry record."""
    out = []
    for _ in range(n):
        ident = Identity.generate()
        doc = OwnerDoc(ident.peer_id)
        doc.update({"id": str(ident.peer_id), "status": "online", "service": []})
        out.append((ident, Record.create(ident, 1, doc)))
    return tuple(out)


def items(records: tuple[tuple[Identity, Record], ...], *, beat: bool = True, age: float = 0.0) -> list[dict]:
    """Wire items as an honest relay would send them, each with an owner-signed heartbeat ``age`` seconds old."""
    now_ms = int((time.time() - age) * 1000)
    out = []
    for ident, record in records:
        item = record.to_wire()
        if beat:
            item["hb"] = Heartbeat.create(ident, now_ms).to_wire()
        out.append(item)
    return out


async def push_records(stream, payload: list[dict], budget: int = 256 * 1024) -> None:
    """Send ``payload`` in records messages of about ``budget`` bytes each."""
    batch, size = [], 0
    for item in payload:
        cost = len(item["doc"]) + 400
        if batch and size + cost > budget:
            await stream.send_all(wire.encode({"t": "records", "records": batch}))
            batch, size = [], 0
        batch.append(item)
        size += cost
    if batch:
        await stream.send_all(wire.encode({"t": "records", "records": batch}))


async def open_raw_stream(attacker, target):
    return await attacker.host.new_stream(target.peer_id, PROTOCOL)


async def poll(predicate) -> None:
    """Wait (bounded) for a condition that has no event of its own, e.g. another node's counters."""
    with trio.fail_after(30):
        await wait_until(predicate)


def random_ids(n: int) -> list[str]:
    """Strings shaped like peer IDs (never parsed by a correct receiver: they name nobody it holds)."""
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    table = bytes(alphabet[b % 58].encode()[0] for b in range(256))
    text = os.urandom(44 * n).translate(table).decode()
    return ["12D3KooW" + text[i * 44 : (i + 1) * 44] for i in range(n)]
