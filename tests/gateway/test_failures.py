"""What a forwarding failure tells the client: the status and code for each way a provider can fail."""

from __future__ import annotations

import pytest

from ocf.errors import UpstreamError
from ocf.gateway.failures import Attempts, p2p_error
from ocf.gateway.providers import ConnectFailed, RelayLimited, UnknownPeer

PEER = "12D3KooWProviderAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
OTHER = "12D3KooWProviderBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"


@pytest.mark.parametrize(
    ("exc", "cut", "status", "code"),
    [
        (UnknownPeer("no address"), None, 404, "peer_not_found"),
        (RelayLimited("refused", status="RESOURCE_LIMIT_EXCEEDED"), None, 503, "relay_refused"),
        (ConnectFailed("dial failed: 10.0.0.7:4001 refused"), None, 502, "peer_unreachable"),
        (UpstreamError("reset", response_started=False), "128 KiB", 503, "relay_limit"),
        (UpstreamError("reset", response_started=True), "128 KiB", 502, "peer_failed"),
        (UpstreamError("reset", response_started=False), None, 502, "peer_failed"),
    ],
)
def test_p2p_failures(exc, cut, status, code):
    error = p2p_error(PEER, exc, cut)
    assert (error.status, error.code) == (status, code)
    assert "10.0.0.7" not in error.message  # what the peer's addresses answered stays in our log


def test_nothing_reached_any_provider_is_503_with_retry_after():
    attempts = Attempts("llm")
    attempts.tried |= {PEER, OTHER}
    attempts.failed(PEER, ConnectFailed("dial failed: 10.0.0.7:4001 refused"))
    attempts.failed(OTHER, ConnectFailed("no route"))
    error = attempts.error(candidates=2)
    assert (error.status, error.headers["Retry-After"]) == (503, "5")
    assert "10.0.0.7" not in error.message
    assert "tried" in error.message


def test_a_provider_that_took_the_request_and_failed_is_502():
    attempts = Attempts("llm")
    attempts.failed(PEER, ConnectFailed("no route"))
    attempts.failed(OTHER, UpstreamError("reset", response_started=False))
    error = attempts.error(candidates=2)
    assert (error.status, error.code) == (502, "provider_failed")


def test_a_relay_in_the_way_is_named():
    attempts = Attempts("llm")
    attempts.failed(PEER, RelayLimited("refused", status="NO_RESERVATION"))
    attempts.failed(OTHER, UpstreamError("reset", response_started=False), relay_cut="2 min")
    error = attempts.error(candidates=2)
    assert (error.status, error.code) == (503, "relay_refused")
    assert "NO_RESERVATION" in error.message and "ended the connection at 2 min" in error.message
