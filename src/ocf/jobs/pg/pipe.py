"""Statements queued on one connection and sent together: a round trip per read, not per statement.

A PostgreSQL batch spends most of its time waiting for the server, so what
counts is round trips. A statement whose answer nobody reads (an UPDATE, a
``BEGIN``) is only queued; the next statement whose rows *are* read sends
everything queued before it in the same message. In a group commit the
queue belongs to the batch, not to one operation: an operation's trailing
writes travel with the next operation's first read, and the last ones with
the ``COMMIT``.

Statements go as one simple-protocol message, their parameters interpolated
by psycopg's client-side cursor (its quoting, not ours). A statement with
parameters is prepared once per connection (``PREPARE``, in the message that
first uses it) and run as ``EXECUTE name(values)``, so the server plans the
same few statements once per connection instead of at every call:
planning was about a sixth of its time.

The pipe remembers which queued statements change rows, so a batch can tell
an operation that failed before any of its writes reached the server (drop
its queued statements; it failed alone) from one that failed after (the
transaction must be redone).
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import psycopg

_PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s")


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


class _Session:
    """What one connection has prepared; used by one thread at a time, like its connection."""

    __slots__ = ("done", "reset")

    def __init__(self) -> None:
        self.done: set[str] = set()
        #: A message that may have prepared some statements failed: drop them all before preparing again.
        self.reset = False


class Prepared:
    """Which statements each connection has prepared; shared by the pipes of one pool.

    A prepared statement lives as long as its connection (a rollback does not
    undo a ``PREPARE``). After a failed message nobody knows which of its
    ``PREPARE`` statements ran, so that connection starts over with
    ``DEALLOCATE ALL``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statements: dict[str, tuple[str, str, list[int | str]]] = {}
        self._sessions: weakref.WeakKeyDictionary[psycopg.Connection[Any], _Session] = weakref.WeakKeyDictionary()

    def statement(self, sql: str) -> tuple[str, str, list[int | str]]:
        """Its name, its text with ``$n`` placeholders, and which parameter each ``$n`` takes."""
        known = self._statements.get(sql)
        if known is not None:
            return known
        order: list[int | str] = []

        def number(match: re.Match[str]) -> str:
            key: int | str = match.group(1) if match.group(1) is not None else len(order)
            if key not in order:
                order.append(key)
            return f"${order.index(key) + 1}"

        text = _PLACEHOLDER.sub(number, sql)
        with self._lock:
            return self._statements.setdefault(sql, (f"ocf_{len(self._statements)}", text, order))

    def session(self, conn: psycopg.Connection[Any]) -> _Session:
        with self._lock:
            session = self._sessions.get(conn)
            if session is None:
                session = self._sessions[conn] = _Session()
            return session


_RESET = "*"  # marks the queued DEALLOCATE ALL


class Pipe:
    """The statement queue of one connection (a batch's, or a lone operation's)."""

    def __init__(self, conn: psycopg.Connection[Any], prepared: Prepared | None = None) -> None:
        self.conn = conn
        self._cursor = psycopg.ClientCursor(conn)
        #: (number, SQL, its result, whether it changes rows, the name it prepares), in the order queued.
        self._queue: list[tuple[int, str, Result, bool, str | None]] = []
        self.queued = 0  # statements queued so far: the next one's number
        self.round_trips = 0
        self.status: str | None = None  # the command tag of the last statement sent (COMMIT, ROLLBACK...)
        self._last_write_sent = -1
        self._prepared = prepared
        self._session = prepared.session(conn) if prepared is not None else _Session()
        self._preparing: set[str] = set()  # queued PREPAREs (and _RESET), not sent yet

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> Result:
        result = Result(self)
        write = changes_rows(sql)
        if params is None:
            text = sql
        elif self._prepared is None:
            text = self._cursor.mogrify(sql, params)
        else:
            name, numbered, order = self._prepared.statement(sql)
            if self._session.reset and _RESET not in self._preparing:
                self._preparing.add(_RESET)
                self._queue.append((self.queued, "DEALLOCATE ALL", Result(self), False, _RESET))
                self.queued += 1
            if name not in self._session.done and name not in self._preparing:
                self._preparing.add(name)
                self._queue.append((self.queued, f"PREPARE {name} AS {numbered}", Result(self), False, name))
                self.queued += 1
            args = [params[k] for k in order]  # type: ignore[index]
            text = self._cursor.mogrify(f"EXECUTE {name}({', '.join(['%s'] * len(args))})", args)
        self._queue.append((self.queued, text, result, write, None))
        self.queued += 1
        return result

    def sync(self) -> None:
        """Send every queued statement now (one round trip), raising the first one's error."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        self.round_trips += 1
        for number, _, _, write, _ in queue:
            if write:
                self._last_write_sent = number
        cur = self._cursor
        try:
            cur.execute(";\n".join(sql for _, sql, _, _, _ in queue))
        except BaseException:
            self._session.done.clear()
            self._session.reset = True
            self._preparing.clear()
            raise
        for name in (entry[4] for entry in queue if entry[4] is not None):
            self._preparing.discard(name)
            if name == _RESET:
                self._session.reset = False
            else:
                self._session.done.add(name)
        for i, (_, _, result, _, _) in enumerate(queue):
            result.rows = cur.fetchall() if cur.description is not None else []
            if i + 1 < len(queue):
                cur.nextset()
        self.status = cur.statusmessage

    def mark(self) -> int:
        """Where an operation starts (for :meth:`wrote_since` and :meth:`discard`)."""
        return self.queued

    def wrote_since(self, mark: int) -> bool:
        """Whether a statement queued since ``mark`` that changes rows has reached the server."""
        return self._last_write_sent >= mark

    def sent_since(self, mark: int) -> bool:
        """Whether any statement queued since ``mark`` has reached the server."""
        return self.queued > mark and not any(entry[0] == mark for entry in self._queue)

    def discard(self, mark: int = 0) -> None:
        """Forget the statements queued since ``mark`` that were not sent."""
        for entry in self._queue:
            if entry[0] >= mark and entry[4] is not None:
                self._preparing.discard(entry[4])
        self._queue = [entry for entry in self._queue if entry[0] < mark]
