import pytest
from hypothesis import given, strategies as st

from ocf.errors import MultiaddrError
from ocf.identity import Multiaddr, PeerId

PEER = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"

# Text <-> binary vectors from the multiformats/multiaddr spec and implementations.
VECTORS = [
    ("/ip4/127.0.0.1/udp/1234", "047f000001910204d2"),
    ("/ip4/127.0.0.1/tcp/4321", "047f0000010610e1"),
    ("/ip4/127.0.0.1/udp/1234/quic-v1", "047f000001910204d2cd03"),
    ("/ip4/127.0.0.1/udp/1234/quic", "047f000001910204d2cc03"),
    ("/ip4/1.2.3.4/tcp/80/ws", "0401020304060050dd03"),
    ("/ip6/::1/tcp/8000", "2900000000000000000000000000000001061f40"),
    ("/dns4/example.com/tcp/443/wss", "360b6578616d706c652e636f6d0601bbde03"),
    ("/dns/example.com", "350b6578616d706c652e636f6d"),
]


@pytest.mark.parametrize("text,hexbytes", VECTORS)
def test_vectors(text, hexbytes):
    addr = Multiaddr.parse(text)
    assert str(addr) == text
    assert addr.to_bytes().hex() == hexbytes
    assert Multiaddr.from_bytes(bytes.fromhex(hexbytes)) == addr


def test_p2p_component():
    addr = Multiaddr.parse(f"/ip4/10.0.0.60/tcp/43905/p2p/{PEER}")
    assert addr.peer_id == PeerId.from_string(PEER)
    assert str(addr.without_p2p()) == "/ip4/10.0.0.60/tcp/43905"
    assert addr.host_port() == ("10.0.0.60", 43905)
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
    # legacy /ipfs/ is read as /p2p/
    assert Multiaddr.parse(f"/ip4/10.0.0.60/tcp/43905/ipfs/{PEER}") == addr
    assert addr.without_p2p().with_p2p(addr.peer_id) == addr


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "ip4/1.2.3.4",
        "/ip4/1.2.3.256/tcp/1",
        "/ip4/1.2.3.4/tcp/65536",
        "/ip4/1.2.3.4/tcp/-1",
        "/ip4/1.2.3.4/tcp",
        "/ip4",
        "/foo/1",
        "/ip4/1.2.3.4/tcp/1/p2p/notapeerid",
        "/ip6/zz::1/tcp/1",
    ],
)
def test_bad_multiaddrs(bad):
    with pytest.raises(MultiaddrError):
        Multiaddr.parse(bad)


@given(st.binary(max_size=64))
def test_binary_parser_never_crashes(data):
    try:
        addr = Multiaddr.from_bytes(data)
    except MultiaddrError:
        return
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr


@given(st.ip_addresses(v=4), st.integers(0, 65535))
def test_roundtrip_ip4_tcp(ip, port):
    addr = Multiaddr.parse(f"/ip4/{ip}/tcp/{port}")
    assert Multiaddr.parse(str(addr)) == addr
    assert Multiaddr.from_bytes(addr.to_bytes()) == addr
