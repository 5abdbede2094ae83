"""Simulated links: latency keeps order, loss costs a retransmission timeout, a crash is silent."""

import trio
import trio.testing

from ocf.transport.memlink import MIN_RTO, Links


async def test_latency_delays_and_keeps_order(autojump_clock):
    a, b = Links(latency=0.05).pair("a", "b")
    t0 = trio.current_time()
    await a.send_all(b"one")
    await a.send_all(b"two")
    assert await b.receive_some() == b"one"
    assert trio.current_time() - t0 == 0.05
    assert await b.receive_some() == b"two"


async def test_loss_is_a_retransmission_delay_with_head_of_line_blocking(autojump_clock):
    links = Links(latency=0.01, loss=1.0)
    a, b = links.pair("a", "b")
    t0 = trio.current_time()
    await a.send_all(b"x")
    links.loss = 0.0
    await a.send_all(b"y")
    assert await b.receive_some() == b"x"
    assert trio.current_time() - t0 >= MIN_RTO
    assert await b.receive_some() == b"y"  # it could not overtake
    assert links.stats.bytes["a"] == 2 and links.stats.writes["a"] == 2


async def test_crash_is_silent_both_ways(autojump_clock):
    links = Links()
    a, b = links.pair("a", "b")
    links.crash("b")
    await a.send_all(b"lost")
    await b.aclose()  # no EOF reaches a
    with trio.move_on_after(5) as scope:
        await a.receive_some()
    assert scope.cancelled_caught


async def test_close_delivers_eof_and_breaks_writes():
    a, b = Links().pair("a", "b")
    await a.aclose()
    assert await b.receive_some() == b""
    await b.aclose()
    c, d = Links().pair("c", "d")
    await d.aclose()
    try:
        await c.send_all(b"x")
    except trio.BrokenResourceError:
        pass
    else:
        raise AssertionError("write to a closed link succeeded")


async def test_partition_silences_only_links_across_it_until_healed(autojump_clock):
    links = Links(latency=0.01)
    links.partition(["a"], ["b", "c"])
    ab, ba = links.pair("a", "b")
    bc, cb = links.pair("b", "c")
    await ab.send_all(b"lost")
    await bc.send_all(b"kept")
    assert await cb.receive_some() == b"kept"
    with trio.move_on_after(1.0):
        await ba.receive_some()
        raise AssertionError("a write crossed the partition")
    links.heal()
    await ab.send_all(b"after")
    assert await ba.receive_some() == b"after"
    assert links.unreachable("c", "a") is False
