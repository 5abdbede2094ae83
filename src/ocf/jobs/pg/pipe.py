"""Statements queued on one connection and sent together: a round trip per read, not per statement.

A PostgreSQL batch spends most of its time waiting for the server, so what
counts is round trips. A statement whose answer nobody reads (an UPDATE, a
``BEGIN``) is only queued; the next statement whose rows *are* read sends
everything queued before it in the same message. In a group commit the
queue belongs to the batch, not to one operation: an operation's trailing
writes travel with the next operation's first read, and the last ones with
the ``COMMIT``.

Statements go as one simple-protocol message, interpolated by psycopg's
client-side cursor (its quoting, not ours): one message, one answer, and no
prepared-statement bookkeeping per connection of the pool.

The pipe remembers which queued statements change rows, so a batch can tell
an operation that failed before any of its writes reached the server (drop
its queued statements; it failed alone) from one that failed after (the
transaction must be redone).
"""

from __future__ import annotations

from typing import Any
from collections.abc import Iterator

import psycopg


class Result:
    """The rows of a queued statement, fetched (with everything queued before it) when first read."""

    __slots__ = ("pipe", "rows")

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.rows: list[tuple[Any, ...]] | None = None

    def fetchall(self) -> list[tuple[Any, ...]]:
        if self.rows is None:
            self.pipe.sync()
        assert self.rows is not None
        return self.rows

    def fetchone(self) -> tuple[Any, ...] | None:
        rows = self.fetchall()
        return rows[0] if rows else None

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


def changes_rows(sql: str) -> bool:
    """Whether a statement may change rows (a plain SELECT, even ``FOR UPDATE`` or ``nextval``, does not).

    Locks a failed operation's SELECT took are harmless (the batch's
    transaction holds them until its end), and sequence values are never
    given back by a rollback anyway.
    """
    return sql.lstrip()[:6].upper() != "SELECT"


class Pipe:
    """The statement queue of one connection (a batch's, or a lone operation's)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._cursor = psycopg.ClientCursor(conn)
        #: (number, SQL, its result, whether it changes rows), in the order queued.
        self._queue: list[tuple[int, str, Result, bool]] = []
        self.queued = 0  # statements queued so far: the next one's number
        self.round_trips = 0
        self._last_write_sent = -1

    def execute(self, sql: str, params: Any = None) -> Result:
        result = Result(self)
        text = self._cursor.mogrify(sql, params) if params is not None else sql
        self._queue.append((self.queued, text, result, changes_rows(sql)))
        self.queued += 1
        return result

    def sync(self) -> None:
        """Send every queued statement now (one round trip), raising the first one's error."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        self.round_trips += 1
        for number, _, _, write in queue:
            if write:
                self._last_write_sent = number
        cur = self._cursor
        cur.execute(";\n".join(sql for _, sql, _, _ in queue))
        for i, (_, _, result, _) in enumerate(queue):
            result.rows = cur.fetchall() if cur.description is not None else []
            if i + 1 < len(queue):
                cur.nextset()

    def mark(self) -> int:
        """Where an operation starts (for :meth:`wrote_since` and :meth:`discard`)."""
        return self.queued

    def wrote_since(self, mark: int) -> bool:
        """Whether a statement queued since ``mark`` that changes rows has reached the server."""
        return self._last_write_sent >= mark

    def sent_since(self, mark: int) -> bool:
        """Whether any statement queued since ``mark`` has reached the server."""
        return self.queued > mark and not any(number == mark for number, *_ in self._queue)

    def discard(self, mark: int = 0) -> None:
        """Forget the statements queued since ``mark`` that were not sent."""
        self._queue = [entry for entry in self._queue if entry[0] < mark]
