"""The keyed idle pool both of the gateway's hops keep their connections in."""

from __future__ import annotations

import attrs
import pytest

from ocf.httpstream import pool as pool_module
from ocf.httpstream.pool import IdlePool


@attrs.define(eq=False)
class Item:
    name: str
    fit: bool = True


def make(**kw):  # type: ignore[no-untyped-def]
    dropped: list[str] = []
    kw.setdefault("idle_timeout", 30.0)
    kw.setdefault("max_idle_per_key", 3)
    p: IdlePool[str, Item] = IdlePool(fits=lambda c: c.fit, drop=lambda c: dropped.append(c.name), **kw)
    return p, dropped


def test_newest_first_per_key_and_keys_apart():
    p, dropped = make()
    p.put("a", Item("a1"))
    p.put("a", Item("a2"))
    p.put("b", Item("b1"))
    assert p.take("a").name == "a2"
    assert p.take("a").name == "a1"
    assert p.take("a") is None
    assert p.take("b").name == "b1"
    assert dropped == []


def test_unfit_and_expired_are_dropped_not_handed_out(monkeypatch: pytest.MonkeyPatch):
    now = [100.0]
    monkeypatch.setattr(pool_module.time, "monotonic", lambda: now[0])
    p, dropped = make(idle_timeout=5.0)
    p.put("a", Item("old"))
    now[0] += 10.0
    p.put("a", Item("dead", fit=False))
    p.put("a", Item("good"))
    assert p.take("a").name == "good"
    assert p.take("a") is None
    assert dropped == ["dead", "old"]  # each checked once, closed at once
    assert p.idle("a") == 0


def test_at_most_max_idle_per_key_and_oldest_goes_first():
    p, dropped = make(max_idle_per_key=3)
    for i in range(10):
        p.put("a", Item(f"a{i}"))
    assert p.idle("a") == 3
    assert dropped == [f"a{i}" for i in range(7)]


def test_close_drops_everything_and_later_puts():
    p, dropped = make()
    p.put("a", Item("a1"))
    p.put("b", Item("b1"))
    p.close()
    assert sorted(dropped) == ["a1", "b1"]
    p.put("a", Item("late"))
    assert dropped[-1] == "late"
    assert p.take("a") is None
