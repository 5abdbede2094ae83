"""Private networks (pnet): the keystream, the session, the key file, and hosts with and without the key."""

from __future__ import annotations

import base64
import contextlib
import itertools
import logging
import os

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ocf.config import Config, load
from ocf.errors import ConfigError, PrivateNetworkRefused, TransportError
from ocf.identity import Identity
from ocf.transport import MemoryNetwork, noise, open_host, pnet
from ocf.transport.multistream import HEADER, encode
from tests.waiting import wait_until

ECHO = "/test/echo/1.0.0"
GO_KEY = b"this is 32-byte key for xsalsa20"
GO_NONCE = b"24-byte nonce for xsalsa"
KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
HEADER_MESSAGE = encode(HEADER)  # the multistream header, as the first framed message


# --- keystream: vectors from golang.org/x/crypto/salsa20 and NaCl's stream3 test -------------------


def test_xsalsa20_go_vectors():
    assert pnet.XSalsa20Stream(GO_KEY, GO_NONCE).process(b"Hello world!").hex() == "002d4513843fc240c401e541"
    assert pnet.XSalsa20Stream(GO_KEY, GO_NONCE).process(bytes(64)).hex() == (
        "4848297feb1fb52fb66d81609bd547fabcbe7026edc8b5e5e449d088bfa69c08"
        "8f5d8da1d791267c2c195a7f8cae9c4b4050d08ce6d3a151ec265f3a58e47648"
    )


def test_xsalsa20_nacl_vector():
    key = bytes.fromhex("1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389")
    nonce = bytes.fromhex("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")
    assert (
        pnet.XSalsa20Stream(key, nonce).process(bytes(32)).hex()
        == "eea6a7251c1e72916d11c2cb214d3c252539121d8e234e652d651fa4c8cff880"
    )


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=600), cuts=st.lists(st.integers(0, 600), max_size=12))
def test_keystream_is_independent_of_chunking(data, cuts):
    whole = pnet.XSalsa20Stream(KEY_A, GO_NONCE).process(data)
    stream = pnet.XSalsa20Stream(KEY_A, GO_NONCE)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = b"".join(stream.process(data[a:b]) for a, b in itertools.pairwise(bounds))
    assert pieces == whole
    assert stream.position == len(data)
    assert pnet.XSalsa20Stream(KEY_A, GO_NONCE).process(whole) == data  # XOR twice is the identity


def test_keystream_rejects_bad_sizes():
    with pytest.raises(ValueError):
        pnet.XSalsa20Stream(KEY_A[:31], GO_NONCE)
    with pytest.raises(ValueError):
        pnet.XSalsa20Stream(KEY_A, GO_NONCE[:8])


# --- session (sans-IO) --------------------------------------------------------------------------


def pair(key_a=KEY_A, key_b=KEY_A, expect=HEADER_MESSAGE):
    a = pnet.PnetSession(key_a, expect=expect)
    b = pnet.PnetSession(key_b, expect=expect)
    return a, b


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=400), cuts=st.lists(st.integers(0, 450), max_size=10))
def test_session_roundtrip_any_chunking(payload, cuts):
    a, b = pair()
    wire = a.local_nonce + a.encrypt(encode(HEADER) + payload)
    bounds = sorted({0, len(wire), *(c for c in cuts if c <= len(wire))})
    got = b"".join(b.decrypt(wire[x:y]) for x, y in itertools.pairwise(bounds))
    assert got == encode(HEADER) + payload
    assert b.verified


def test_session_wrong_key_is_refused_at_the_first_wrong_byte():
    refused = 0
    for _ in range(50):
        a, b = pair(KEY_A, KEY_B)
        wire = a.local_nonce + a.encrypt(encode(HEADER))
        b.decrypt(wire[: pnet.NONCE_SIZE])
        with contextlib.suppress(PrivateNetworkRefused):
            for i in range(pnet.NONCE_SIZE, len(wire)):
                b.decrypt(wire[i : i + 1])
        refused += not b.verified
    assert refused == 50


def test_session_plain_libp2p_peer_is_refused():
    # A peer outside any private network starts with the cleartext multistream header.
    _, b = pair()
    with pytest.raises(PrivateNetworkRefused, match="network key mismatch or peer is not in this private network"):
        b.decrypt(encode(HEADER) + encode("/noise") + encode("/noise"))


# --- Trio stream --------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(min_size=1, max_size=3000), sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8))
def test_stream_wrapper_chunking_independent(payload, sizes):
    async def main() -> bytes:
        left, right = trio.testing.memory_stream_pair()
        protector = pnet.Protector(pnet.NetworkKey(KEY_A))
        async with trio.open_nursery() as nursery:
            results = {}

            async def side(name, raw, initiator):
                results[name] = await protector.protect(raw, initiator=initiator)

            nursery.start_soon(side, "a", left, True)
            nursery.start_soon(side, "b", right, False)
        a, b = results["a"], results["b"]
        view = memoryview(payload)
        pos, i = 0, 0
        while pos < len(payload):
            n = sizes[i % len(sizes)]
            await a.send_all(view[pos : pos + n])
            pos, i = pos + n, i + 1
        await a.send_eof()
        got = bytearray()
        i = 0
        while chunk := await b.receive_some(sizes[i % len(sizes)]):
            assert len(chunk) <= sizes[i % len(sizes)]
            got += chunk
            i += 1
        return bytes(got)

    assert trio.run(main) == payload


async def test_listener_speaks_only_after_the_dialers_nonce():
    # js-libp2p over WebSocket drops a message that arrives with the upgrade response.
    sent, received = trio.testing.MemorySendStream(), trio.testing.MemoryReceiveStream()
    protector = pnet.Protector(pnet.NetworkKey(KEY_A))
    got = {}
    async with trio.open_nursery() as nursery:

        async def listen():
            got["stream"] = await protector.protect(trio.StapledStream(sent, received), initiator=False)

        nursery.start_soon(listen)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):  # nothing sent: silent until the dialer's nonce
            sent.get_data_nowait()
        dialer = pnet.PnetSession(KEY_A)
        received.put_data(dialer.local_nonce + dialer.encrypt(b"after"))
    assert len(sent.get_data_nowait()) == pnet.NONCE_SIZE
    assert await got["stream"].receive_some() == b"after"
    assert protector.stats["protected"] == 1


# --- key file -------------------------------------------------------------------------------------


HEX = KEY_A.hex()


@pytest.mark.parametrize(
    "content",
    [
        f"/key/swarm/psk/1.0.0/\n/base16/\n{HEX}".encode(),  # js-libp2p's generateKey (no final newline)
        f"/key/swarm/psk/1.0.0/\n/base16/\n{HEX}\n".encode(),
        f"/key/swarm/psk/1.0.0/\r\n/base16/\r\n{HEX.upper()}\r\n".encode(),
        b"/key/swarm/psk/1.0.0/\n/base64/\n" + base64.b64encode(KEY_A) + b"\n",
        b"/key/swarm/psk/1.0.0/\n/bin/\n" + KEY_A,
        b"/key/swarm/psk/1.0.0/\n/bin/\n" + KEY_A + b"\n",
    ],
)
def test_swarm_key_formats(tmp_path, content):
    path = tmp_path / "swarm.key"
    path.write_bytes(content)
    assert pnet.load_network_key(path).psk == KEY_A


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "first line must be"),
        (b"/key/swarm/psk/2.0.0/\n/base16/\n" + HEX.encode(), "first line must be"),
        (f"/key/swarm/psk/1.0.0/\n/base58/\n{HEX}".encode(), "unknown key encoding"),
        (f"/key/swarm/psk/1.0.0/\n/base16/\n{HEX[:-2]}".encode(), "must be 32 bytes, got 31"),
        (f"/key/swarm/psk/1.0.0/\n/base16/\n{HEX}{HEX}".encode(), "must be 32 bytes, got 64"),
        (f"/key/swarm/psk/1.0.0/\n/base16/\n{HEX[:-1]}z".encode(), "not valid base16"),
        (f"/key/swarm/psk/1.0.0/\n/base16/\n{HEX}\n{HEX}".encode(), "on one line"),
        (b"/key/swarm/psk/1.0.0/\n/base64/\n!!!!", "not valid base64"),
        (b"/key/swarm/psk/1.0.0/\n/bin/\n" + KEY_A[:20], "must be 32 bytes, got 20"),
        (b"x" * 5000, "too large"),
    ],
)
def test_bad_swarm_keys_are_one_line_config_errors(tmp_path, content, message):
    path = tmp_path / "swarm.key"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        load({"network-key": str(path)}, env={})
    assert info.value.setting == "--network-key"
    assert "\n" not in str(info.value)


def test_missing_key_file_and_env_and_toml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load({"network-key": str(tmp_path / "nope.key")}, env={})
    key = tmp_path / "swarm.key"
    key.write_bytes(pnet.format_swarm_key(KEY_A))
    assert load(env={"OCF_NETWORK_KEY": str(key)}).network_key.psk == KEY_A
    toml = tmp_path / "ocf.toml"
    toml.write_text(f'network-key = "{key}"\n')
    assert load(env={}, config_file=toml).network_key.psk == KEY_A


def test_force_pnet_env_refuses_an_open_node(tmp_path):
    with pytest.raises(ConfigError, match="LIBP2P_FORCE_PNET=1"):
        load(env={"LIBP2P_FORCE_PNET": "1"})
    key = tmp_path / "swarm.key"
    key.write_bytes(pnet.format_swarm_key(KEY_A))
    assert load({"network-key": str(key)}, env={"LIBP2P_FORCE_PNET": "1"}).network_key.psk == KEY_A


def test_key_never_shows_in_config_repr(tmp_path):
    key = tmp_path / "swarm.key"
    key.write_bytes(pnet.format_swarm_key(KEY_A))
    config = load({"network-key": str(key)}, env={})
    text = repr(config) + str(config.network_key)
    assert KEY_A.hex() not in text and repr(KEY_A) not in text
    assert config.network_key.fingerprint in text


def test_start_exits_2_on_bad_key(tmp_path, capsys):
    from ocf.cli import main

    bad = tmp_path / "swarm.key"
    bad.write_text("/key/swarm/psk/1.0.0/\n/base16/\nabcd\n")
    assert main(["start", "--network-key", str(bad), "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("ocf start: error: --network-key:") and "must be 32 bytes" in err and len(err.splitlines()) == 1
    )


def test_keygen_swarm_writes_private_key_file(tmp_path, capsys):
    from ocf.cli import main

    path = tmp_path / "new-dir" / "swarm.key"
    assert main(["keygen-swarm", str(path)]) == 0
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert (path.stat().st_mode & 0o777) == 0o600
    key = pnet.load_network_key(path)
    assert not key.world_readable
    assert main(["keygen-swarm", str(path)]) == 2  # never overwrites a key
    assert pnet.load_network_key(path).psk == key.psk


# --- hosts -----------------------------------------------------------------------------------------


def cfg(key: bytes | None, **kw) -> Config:
    base = dict(host="127.0.0.1", tcpport=0, handshake_timeout=30.0, dial_timeout=5.0)
    base.update(kw)
    return Config(network_key=pnet.NetworkKey(key) if key is not None else None, **base)


async def echo(stream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


@pytest.fixture
def noise_states(monkeypatch):
    """Every Noise handshake object created in this test, by role (initiator True/False)."""
    created = []
    original = noise.NoiseHandshake.__init__

    def counting(self, *args, **kw):
        created.append(kw.get("initiator"))
        original(self, *args, **kw)

    monkeypatch.setattr(noise.NoiseHandshake, "__init__", counting)
    return created


@contextlib.asynccontextmanager
async def two_hosts(key_a, key_b, network=None, **kw):
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i, key in enumerate((key_a, key_b)):
            ident = Identity.from_seed(f"pnet-{i}-{os.getpid()}")
            host = await stack.enter_async_context(open_host(ident, cfg(key, **kw), network))
            host.set_stream_handler(ECHO, echo)
            out.append(host)
        yield out


async def roundtrip(host, peer, payload: bytes) -> bytes:
    stream = await host.new_stream(peer, ECHO)
    async with stream:
        await stream.send_all(payload)
        got = bytearray()
        while len(got) < len(payload):
            got += await stream.receive_some()
    return bytes(got)


@pytest.mark.parametrize("transport", ["memory", "tcp", "ws"])
async def test_same_key_connects_and_carries_data(transport):
    network = MemoryNetwork() if transport == "memory" else None
    async with two_hosts(KEY_A, KEY_A, network) as (a, b):
        addr = [x for x in b.listen_addrs if x.has("ws") == (transport == "ws")][0]
        assert await a.connect(addr) == b.peer_id
        payload = os.urandom(300_000)
        assert await roundtrip(a, b.peer_id, payload) == payload
        assert await a.ping(b.peer_id) > 0
        assert a.upgrader.protector.stats == {"protected": 1, "refused": 0}


@pytest.mark.parametrize(
    ("key_a", "key_b"),
    [(KEY_A, KEY_B), (None, KEY_B), (KEY_A, None)],
    ids=["other-key", "dialer-open", "listener-open"],
)
async def test_outsider_is_refused_before_noise(key_a, key_b, noise_states):
    async with two_hosts(key_a, key_b, MemoryNetwork()) as (a, b):
        t0 = trio.current_time()
        with pytest.raises(TransportError) as info:  # an open dialer just sees garbage
            await a.connect(b.listen_addrs[0])
        elapsed = trio.current_time() - t0
        assert elapsed < 5  # decided on the first bytes, not by the 30 s handshake deadline
        assert not a.is_connected(b.peer_id) and not b.connected_peers()
        if key_a is not None:  # a private dialer names the cause
            assert isinstance(info.value, PrivateNetworkRefused)
            assert "network key mismatch or peer is not in this private network" in str(info.value)
        if key_b is not None:
            # the private listener never started a Noise responder
            assert False not in noise_states
            with trio.fail_after(5):
                await wait_until(lambda: b.upgrader.protector.stats["refused"] >= 1)  # in the listener's task
        if key_a is not None and key_b is not None:
            assert noise_states == []


async def test_refusals_do_not_storm_the_log(caplog, noise_states):
    caplog.set_level(logging.INFO, logger="ocf")
    attempts = 200
    async with two_hosts(KEY_B, KEY_A, MemoryNetwork()) as (a, b):
        for _ in range(attempts):
            with pytest.raises(PrivateNetworkRefused):
                await a.connect(b.listen_addrs[0])
        with trio.fail_after(5):
            await wait_until(lambda: b.upgrader.protector.stats["refused"] >= attempts)
        assert b.resources.system.usage["handshakes"] == 0 and b.connections() == []  # nothing held after the refusals
    assert b.upgrader.protector.stats["refused"] == attempts
    assert a.upgrader.protector.stats["refused"] == attempts
    listener_lines = [r for r in caplog.records if "refused" in r.getMessage() or "handshake failed" in r.getMessage()]
    assert len(listener_lines) <= 1  # one rate-limited summary per interval, not one line per attempt
    assert noise_states == []


# --- multistream: garbage where the header belongs is refused on its first wrong byte -------------


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=60))
def test_multistream_refuses_non_header_at_once(garbage):
    from ocf.errors import ProtocolError
    from ocf.transport.multistream import HEADER_BYTES, Listener

    listener = Listener({"/noise"})
    if HEADER_BYTES.startswith(garbage[: len(HEADER_BYTES)]):
        return  # a real header (or its start): covered by the multistream tests
    with pytest.raises(ProtocolError):
        for i in range(len(garbage)):  # byte by byte: no waiting for a length the garbage announced
            listener.receive_data(garbage[i : i + 1])
    assert listener.data_to_send() == b""  # never greeted an impostor
