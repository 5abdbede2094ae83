import tracemalloc

from ocf.identity import Identity
from ocf.membership.verify import DEFAULT_SIZE, SignatureCache


def test_the_signature_cache_is_bounded_in_entries_and_memory():
    """A node keeps at most DEFAULT_SIZE checked signatures: under 0.25 MiB however many it checks."""
    me = Identity.generate()
    peer = str(me.peer_id)
    signed = [(b"update %d" % i, me.sign(b"update %d" % i)) for i in range(2 * DEFAULT_SIZE)]
    cache = SignatureCache()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert all(cache(peer, data, sig) for data, sig in signed)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache._ok) == DEFAULT_SIZE
    assert grown < 0.25 * 2**20, f"{grown / 2**20:.2f} MiB"
    assert cache(peer, *signed[-1]) and cache.hits == 1  # the newest are the ones kept
    assert not cache(peer, b"forged", signed[0][1])
