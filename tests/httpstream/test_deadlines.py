"""The per-connection deadlines, sans-IO: what expires when, for each phase of an exchange."""

from __future__ import annotations

from ocf.httpstream.bridge import PHASE_BODY, PHASE_HEAD
from ocf.httpstream.deadlines import BODY, HEAD, HEAD_UNSTARTED, INF, WRITE, ConnectionClock, Timeouts

T = Timeouts(head=10, body=30, min_body_rate=100, write=5)
DONE = 2  # any phase but head and body: the request is in


def test_the_first_head_is_due_from_the_connections_start():
    clock = ConnectionClock(T, now=100)
    assert clock.expired(109.9, PHASE_HEAD) is None and clock.next_deadline(PHASE_HEAD) == 110
    assert clock.expired(110, PHASE_HEAD) == HEAD_UNSTARTED  # nothing sent: closed quietly
    clock.received(105, 20, PHASE_HEAD)  # half a head
    assert clock.expired(110, PHASE_HEAD) == HEAD  # still from the start, not from the first byte: 408


def test_keep_alive_idle_is_not_a_head_and_a_new_head_is_due_from_its_first_byte():
    clock = ConnectionClock(T, now=0)
    clock.received(1, 100, DONE)
    clock.next_cycle(2, buffered=0)
    assert (
        clock.expired(1000, PHASE_HEAD) is None and clock.next_deadline(PHASE_HEAD) == INF
    )  # the keep-alive timer's job
    clock.received(1000, 5, PHASE_HEAD)
    assert clock.expired(1009, PHASE_HEAD) is None and clock.expired(1010, PHASE_HEAD) == HEAD
    clock.next_cycle(2000, buffered=7)  # a pipelined head already started
    assert clock.expired(2010, PHASE_HEAD) == HEAD


def test_a_body_must_not_stall_and_must_keep_the_minimum_rate():
    clock = ConnectionClock(T, now=0)
    clock.received(0, 100, PHASE_BODY)  # head and the first bytes: due at 30
    assert clock.next_deadline(PHASE_BODY) == 30
    for t in range(4, 60, 4):  # one byte every 4 s: never stalls 30 s, earns 0.01 s a byte
        clock.received(t, 1, PHASE_BODY)
    assert clock.expired(30.5, PHASE_BODY) == BODY
    fast = ConnectionClock(T, now=0)
    fast.received(0, 100, PHASE_BODY)
    fast.received(20, 100_000, PHASE_BODY)  # 1,000 s earned, but the stall timer still runs
    assert fast.expired(49, PHASE_BODY) is None and fast.expired(50, PHASE_BODY) == BODY


def test_time_the_server_does_not_read_is_not_counted():
    clock = ConnectionClock(T, now=0)
    clock.received(0, 10, PHASE_BODY)
    clock.pause(1)
    assert clock.expired(100, PHASE_BODY) is None and clock.next_deadline(PHASE_BODY) == INF
    clock.resume(101)
    assert (
        clock.expired(129.9, PHASE_BODY) is None and clock.expired(130, PHASE_BODY) == BODY
    )  # 30 s, less the 1 s used before


def test_a_client_waiting_for_100_continue_is_not_late_until_it_is_sent():
    clock = ConnectionClock(T, now=0)
    clock.received(0, 80, PHASE_BODY, expecting_continue=True)
    assert clock.expired(1000, PHASE_BODY) is None
    clock.continued(1000)
    assert clock.expired(1030, PHASE_BODY) == BODY


def test_a_write_may_not_wait_longer_than_the_write_timeout_in_any_phase():
    clock = ConnectionClock(T, now=0)
    clock.received(0, 50, DONE)
    clock.writing = True  # the driver flags a write in flight; the watchdog times it from when it sees it
    assert clock.expired(10, DONE) is None and clock.next_deadline(DONE) == 15
    assert clock.expired(14.9, DONE) is None and clock.expired(15, DONE) == WRITE
    clock.stop_reading()
    assert clock.expired(15, DONE) == WRITE  # stopping reading does not stop the write timer
    clock.writing, clock.writes = False, clock.writes + 1  # it finished; the next write is a new one
    clock.writing = True
    assert clock.expired(16, DONE) is None and clock.expired(21, DONE) == WRITE
