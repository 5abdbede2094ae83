"""Hosts over QUIC: dial, ping, identify, protocols, QUIC preferred over TCP, one connection on simultaneous dials."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio

from ocf.config import Config
from ocf.errors import PeerUnreachable
from ocf.identity import Identity, Multiaddr
from ocf.transport import open_host
from ocf.transport.host import Host
from tests.waiting import wait_until

ECHO = "/test/echo/1.0.0"


async def echo(stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


def cfg(**kw: object) -> Config:
    base: dict[str, object] = dict(host="127.0.0.1", tcpport=0, handshake_timeout=5.0, dial_timeout=5.0)
    base.update(kw)
    return Config(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def two_hosts(**kw: object) -> AsyncIterator[tuple[Host, Host]]:
    async with open_host(Identity.generate(), cfg(**kw)) as a, open_host(Identity.generate(), cfg(**kw)) as b:
        for h in (a, b):
            h.set_stream_handler(ECHO, echo)
        yield a, b


def quic_addr(host: Host) -> Multiaddr:
    return next(a for a in host.listen_addrs if a.has("quic-v1"))


@pytest.mark.trio
async def test_listen_dial_ping_identify_over_quic() -> None:
    async with two_hosts() as (a, b):
        addr = quic_addr(a)
        assert addr.value_for("udp") != "59820"  # --tcpport 0 makes the default UDP port free too
        assert await b.connect(addr) == a.peer_id
        (conn,) = b.connections(a.peer_id)
        assert conn.transport == "quic"
        assert await b.ping(a.peer_id) > 0
        stream = await b.new_stream(a.peer_id, ECHO)
        await stream.send_all(b"hello")
        assert await stream.receive_some() == b"hello"
        await stream.aclose()
        # QUIC measures the RTT from every acknowledged packet: routing has it without a ping of ours.
        rtt = b.rtt(a.peer_id)
        assert rtt is not None and 0 < rtt < 1
        with trio.fail_after(5):
            await wait_until(lambda: (i := b.peer_info(a.peer_id)) is not None and bool(i.protocols))
        info = b.peer_info(a.peer_id)
        assert info is not None and ECHO in info.protocols
        # identify tells a our QUIC address as seen from its side
        assert any(x.has("quic-v1") for x in b.peer_addrs(a.peer_id))


@pytest.mark.trio
async def test_quic_preferred_over_tcp_and_fallback() -> None:
    async with two_hosts() as (a, b):
        tcp = next(x for x in a.listen_addrs if x.has("tcp") and not x.has("ws"))
        b.add_addrs(a.peer_id, [tcp.without_p2p(), quic_addr(a).without_p2p()])
        stream = await b.new_stream(a.peer_id, ECHO)
        assert stream.connection is b.connections(a.peer_id)[0].muxed
        assert b.connections(a.peer_id)[0].transport == "quic"
        await stream.aclose()
    # A QUIC address nobody answers on: the TCP one is used instead.
    async with two_hosts(dial_timeout=1.0) as (a, b):
        tcp = next(x for x in a.listen_addrs if x.has("tcp") and not x.has("ws"))
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as dead:
            await dead.bind(("127.0.0.1", 0))
            port = dead.getsockname()[1]
            b.add_addrs(a.peer_id, [Multiaddr.parse(f"/ip4/127.0.0.1/udp/{port}/quic-v1"), tcp.without_p2p()])
            with trio.fail_after(10):
                stream = await b.new_stream(a.peer_id, ECHO)
            assert b.connections(a.peer_id)[0].transport == "tcp"
            await stream.aclose()
            # The failure is remembered: the next dial to that peer tries TCP first (no second timeout).
            await b.disconnect(a.peer_id)
            assert b._quic is not None
            before = b._quic.stats()["datagrams_out"]
            stream = await b.new_stream(a.peer_id, ECHO)
            assert b.connections(a.peer_id)[0].transport == "tcp"
            assert b._quic.stats()["datagrams_out"] == before  # not one QUIC Initial sent
            await stream.aclose()


@pytest.mark.trio
async def test_simultaneous_quic_dials_keep_one_connection() -> None:
    async with two_hosts() as (a, b):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.connect, quic_addr(b))
            nursery.start_soon(b.connect, quic_addr(a))

        # Each side may briefly hold one connection before it sees the other; wait until the
        # duplicate is retired on both sides.
        def settled() -> bool:
            ours, theirs = a.connections(b.peer_id), b.connections(a.peer_id)
            return len(ours) == 1 == len(theirs) and ours[0].initiator == theirs[0].initiator

        with trio.fail_after(20):
            await wait_until(settled)
        (ca,) = a.connections(b.peer_id)
        (cb,) = b.connections(a.peer_id)
        assert ca.usable and cb.usable
        assert ca.initiator == cb.initiator == min(a.peer_id, b.peer_id)


@pytest.mark.trio
async def test_quic_disabled_and_bad_address() -> None:
    async with two_hosts(quic=False) as (a, b):
        assert not any(x.has("quic-v1") for x in a.listen_addrs)
        with pytest.raises(PeerUnreachable, match="QUIC is disabled"):
            await b.connect("/ip4/127.0.0.1/udp/1/quic-v1")
        with pytest.raises(PeerUnreachable):
            await b.connect("/ip4/127.0.0.1/udp/quic-v1")


@pytest.mark.trio
async def test_ocf_ping_command_takes_quic_addrs(capsys: pytest.CaptureFixture[str]) -> None:
    from ocf.cli.ping import _ping

    async with two_hosts() as (a, _b):
        assert await _ping(quic_addr(a), 2, 0.01, 5.0) == 0
    out = capsys.readouterr().out
    assert "2 pings transmitted, 2 received" in out and "/quic-v1" in out


@pytest.mark.trio
async def test_a_quic_dialing_endpoint_does_not_keep_the_task_that_opened_it() -> None:
    """A dial-only host opens its QUIC endpoint (a socket and its reader task) on its first QUIC dial
    and keeps it for the host's life. The task that opened it (the first connection's) is freed when
    that connection ends, not when the host closes (see StartedOnce)."""
    import gc

    def kept() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, trio.lowlevel.Task) and "_run_outbound" in o.name)

    async with open_host(Identity.generate(), cfg()) as a, open_host(Identity.generate(), cfg(), listen=False) as b:
        await b.connect(quic_addr(a))
        assert b.connections(a.peer_id)[0].transport == "quic"
        assert kept() == 1  # the connection's own task, alive
        await b.disconnect(a.peer_id)
        await trio.testing.wait_all_tasks_blocked()
        assert not b.is_connected(a.peer_id)
        assert kept() == 0
