"""``MuxedStream.reusable``: what a pool of idle streams asks before handing one out again."""

from __future__ import annotations

import trio.testing

from tests.transport.test_muxer import pair, recv_exactly


async def test_reusable_only_while_open_both_ways_and_fully_read():
    async with pair() as (client, _):
        s = await client.open_stream()
        assert s.reusable  # fresh
        await s.send_all(b"ping")
        await trio.testing.wait_all_tasks_blocked()
        assert not s.reusable  # the echo is waiting unread: it would be taken for the next answer
        assert await recv_exactly(s, 4) == b"ping"
        assert s.reusable  # everything read: fit for another request
        await s.send_eof()  # the echo handler answers with its own EOF
        await trio.testing.wait_all_tasks_blocked()
        assert not s.reusable  # half-closed by the peer

        r = await client.open_stream()
        assert r.reusable
        r.reset()
        assert not r.reusable
