"""The resource manager's bookkeeping, sans-IO: reserve, refuse, release, prune."""

from __future__ import annotations

import pytest
import trio

from ocf.errors import ResourceLimitExceeded
from ocf.identity import Multiaddr
from ocf.transport.resources import Limits, ResourceManager, ip_key


def test_ip_key_groups_ipv6_by_64_and_ignores_non_ip():
    assert ip_key(Multiaddr.parse("/ip4/10.1.2.3/tcp/1")) == "10.1.2.3"
    a = ip_key(Multiaddr.parse("/ip6/2001:db8:1:2::1/tcp/1"))
    b = ip_key(Multiaddr.parse("/ip6/2001:db8:1:2:ffff::9/tcp/1"))
    assert a == b == "2001:db8:1:2::/64"
    assert ip_key(Multiaddr.parse("/memory/x")) is None
    assert ip_key(None) is None


def test_peer_memory_budget_is_all_or_nothing_and_released():
    rm = ResourceManager(Limits(memory_per_peer=100, memory=150))
    assert rm.try_reserve("memory", 60, peer="a")
    assert not rm.try_reserve("memory", 41, peer="a")  # peer over its budget
    assert rm.refusals["peer", "memory"] == 1
    assert rm.try_reserve("memory", 90, peer="b")
    assert not rm.try_reserve("memory", 1, peer="c")  # system over its budget
    assert rm.refusals["system", "memory"] == 1
    assert rm.system.usage["memory"] == 150
    rm.release("memory", 60, peer="a")
    rm.release("memory", 90, peer="b")
    assert rm.system.usage["memory"] == 0
    assert rm.usage()["peers"] == 0  # idle scopes are dropped


def test_streams_count_both_directions_against_one_limit():
    rm = ResourceManager(Limits(streams_per_peer=3))
    res = rm.peer_scope("p")
    assert res.open_stream(inbound=True) and res.open_stream(inbound=False) and res.open_stream(inbound=True)
    assert not res.open_stream(inbound=False)
    res.close()
    assert rm.peer_usage("p")["streams_inbound"] == 0 and rm.system.usage["streams_outbound"] == 0


def test_reserve_raises_a_typed_error():
    rm = ResourceManager(Limits(connections_per_peer=1))
    rm.reserve("conns_inbound", peer="p")
    with pytest.raises(ResourceLimitExceeded):
        rm.reserve("conns_outbound", peer="p")


async def test_handshake_slots_per_address_and_deadline():
    rm = ResourceManager(Limits(handshakes=4, handshakes_per_ip=2))
    slots = [rm.handshake("1.1.1.1", 10.0) for _ in range(3)]
    assert slots[2] is None and rm.refusals["ip", "handshakes"] == 1
    assert slots[0].deadline == pytest.approx(trio.current_time() + 10.0)
    for slot in slots[:2]:
        slot.release()
        slot.release()  # idempotent
    assert rm.system.usage["handshakes"] == 0 and rm.usage()["ips"] == 0


async def test_a_newcomer_evicts_the_busiest_address():
    rm = ResourceManager(Limits(handshakes=4, handshakes_per_ip=4))
    scopes = []
    for _ in range(4):
        slot = rm.handshake("6.6.6.6", 10.0)
        slot.cancel_scope = trio.CancelScope()
        scopes.append((slot, slot.cancel_scope))
    newcomer = rm.handshake("7.7.7.7", 10.0)
    assert newcomer is not None
    assert scopes[0][1].cancel_called and not scopes[1][1].cancel_called  # the oldest went
    assert rm.ip_usage("6.6.6.6")["handshakes"] == 3
    # an address as busy as the busiest does not evict
    rm2 = ResourceManager(Limits(handshakes=2, handshakes_per_ip=2))
    for ip in ("1.0.0.1", "1.0.0.2"):
        rm2.handshake(ip, 10.0).cancel_scope = trio.CancelScope()
    assert rm2.handshake("1.0.0.3", 10.0) is None


async def test_pending_handshakes_count_toward_the_connection_limit():
    rm = ResourceManager(Limits(connections=2, handshakes=10))
    rm.reserve("conns_outbound", peer="p")
    assert rm.handshake("1.2.3.4", 10.0) is not None
    assert rm.handshake("1.2.3.5", 10.0) is None
    assert rm.refusals["system", "connections"] == 1
