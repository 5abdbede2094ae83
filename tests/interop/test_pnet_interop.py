"""Private networks against js-libp2p's ``@libp2p/pnet``: same key both ways, wrong key refused.

The js peer reads the very swarm.key file our node reads, so the key format
is exercised too.
"""

from __future__ import annotations

import pytest
import trio

from ocf import open_node
from ocf.errors import PrivateNetworkRefused
from ocf.identity import Multiaddr, PeerId
from ocf.transport import noise, pnet
from tests.interop.jspeer import open_js_peer
from tests.waiting import wait_until

pytestmark = pytest.mark.interop


def write_key(path, psk: bytes):
    path.write_bytes(pnet.format_swarm_key(psk))
    path.chmod(0o600)
    return path


@pytest.fixture
def keys(tmp_path):
    good = write_key(tmp_path / "swarm.key", bytes(range(32)))
    other = write_key(tmp_path / "other.key", bytes(range(1, 33)))
    return good, other


@pytest.fixture
def noise_states(monkeypatch):
    """How many Noise handshakes were started in this process (refusal must come before any)."""
    created = []
    original = noise.NoiseHandshake.__init__

    def counting(self, *args, **kw):
        created.append(kw.get("initiator"))
        original(self, *args, **kw)

    monkeypatch.setattr(noise.NoiseHandshake, "__init__", counting)
    return created


def our_addr(node, transport):
    for a in node.listen_addrs:
        if a.has("ws") == (transport == "ws") and a.has("tcp"):
            return str(a)
    raise LookupError(transport)


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_js_with_key_and_us_ping_both_ways(node_config, keys, transport):
    good, _ = keys
    config = node_config(network_key=pnet.load_network_key(good))
    async with open_js_peer(good) as js, open_node(config) as node:
        reply = await js.request("ping", addr=our_addr(node, transport), count=3)
        assert len(reply["rtts"]) == 3
        peer = await node.host.connect(Multiaddr.parse(js.addr(transport)))
        assert peer == PeerId.from_string(js.peer_id)
        rtt = await node.host.ping(peer)
        assert 0 < rtt < 5
        protector = node.host.upgrader.protector
        assert protector.stats["refused"] == 0 and protector.stats["protected"] >= 1


async def test_js_with_wrong_key_is_refused_before_noise(node_config, keys, noise_states):
    good, other = keys
    config = node_config(network_key=pnet.load_network_key(good), handshake_timeout=30.0)
    async with open_js_peer(other) as js, open_node(config) as node:
        protector = node.host.upgrader.protector
        with pytest.raises(RuntimeError):
            await js.request("ping", addr=our_addr(node, "tcp"), count=1)
        with trio.fail_after(10):
            await wait_until(lambda: protector.stats["refused"] >= 1)  # it lands in our task after js gave up
        assert False not in noise_states  # no responder handshake started on our side
        # Dialing it: js answers nothing readable and hangs up at its own upgrade
        # deadline; we report that as the key mismatch it is, not as a timeout
        # or a parse error, and never reach Noise.
        with pytest.raises(PrivateNetworkRefused, match="network key mismatch or peer is not in this private network"):
            await node.host.connect(Multiaddr.parse(js.addr("tcp")))
        assert noise_states == []
        assert protector.stats["refused"] >= 2


async def test_js_without_key_cannot_reach_private_node_and_vice_versa(node_config, keys, noise_states):
    good, _ = keys
    config = node_config(network_key=pnet.load_network_key(good), handshake_timeout=30.0)
    async with open_js_peer() as js, open_node(config) as node:
        with pytest.raises(RuntimeError):
            await js.request("ping", addr=our_addr(node, "tcp"), count=1)
        with pytest.raises(PrivateNetworkRefused, match="network key mismatch"):
            await node.host.connect(Multiaddr.parse(js.addr("tcp")))
        assert noise_states == []
