"""What a forwarding failure means for the client's status.

``/v1/p2p/<peer>/…`` has one provider, named by the client: the peer is
unknown (404), busy behind a relay that refused or cut the connection (503
with the relay's reason), unreachable (502), or it failed (502)
(:func:`p2p_error`).

``/v1/service/<name>/…`` tries a provider and, when nothing reached it and
the body can be replayed, one more (:meth:`ocf.gateway.forward.Forwarder._forward_any`).
Each failure says something different about the network, and the client's
status must say which, because clients retry on it:

* nothing reached any provider (dial failed, backend down): 503 with
  ``Retry-After``, the capacity is not there right now;
* a provider took the request and then failed before answering: 502, the
  provider is at fault;
* a relay between us and the provider refused or cut the connection: 503
  naming the relay's reason (a fixed set of statuses, fit to show), since
  neither the provider nor the client did anything wrong.

The bookkeeping is pure, so that the loop reads as "pick, try, record".
The client learns which providers were tried, never what their addresses
answered: those are the peers' choice, and echoing them would make the node
a port scanner for whoever asks (the reasons go to the log instead).
"""

from __future__ import annotations

import attrs

from ..errors import GatewayRequestError, NoProviderAvailable, NotFound, ProviderFailed, UpstreamError
from .providers import ConnectFailed, RelayLimited, UnknownPeer, short


def p2p_error(peer: str, exc: ConnectFailed | UpstreamError, relay_cut: str | None) -> GatewayRequestError:
    """The client's error for a ``/v1/p2p`` request to ``peer`` that failed with ``exc``.

    ``relay_cut`` is set when a relay ended the connection the exchange ran on.
    """
    if isinstance(exc, UnknownPeer):
        return NotFound(f"peer {peer} is not connected and not in the node table", code="peer_not_found")
    if isinstance(exc, RelayLimited):
        # The peer is there; the relay in the way said no (its limits, or no reservation).
        return NoProviderAvailable(
            f"peer {peer} is reachable only through a relay, which refused: {exc.status}",
            retry_after=5,
            code="relay_refused",
        )
    if isinstance(exc, ConnectFailed):
        # Never what its addresses answered: they are the peer's choice.
        return ProviderFailed(f"peer {peer} is unreachable", code="peer_unreachable")
    if relay_cut is not None and not exc.response_started:
        return NoProviderAvailable(
            f"peer {peer} is reachable only through a relay, which ended the connection at {relay_cut}",
            retry_after=5,
            code="relay_limit",
        )
    return ProviderFailed(f"peer {peer} failed: {exc}", code="peer_failed")


@attrs.define(slots=True)
class Attempts:
    """The providers of one service request that failed before answering, and why."""

    service: str
    tried: set[str] = attrs.field(factory=set)
    reasons: list[str] = attrs.field(factory=list)
    relay_refusals: list[str] = attrs.field(factory=list)
    reached: bool = False  # some provider took the request (and failed)

    def failed(self, peer: str, exc: Exception, relay_cut: str | None = None) -> str:
        """Record that ``peer`` failed with ``exc`` before answering; returns the reason, for the log.

        ``relay_cut`` is set when a relay ended the connection the exchange
        ran on (its limit), which is the path's fault, not the provider's.
        """
        if isinstance(exc, RelayLimited):
            self.relay_refusals.append(exc.status)
        elif isinstance(exc, UpstreamError):
            if relay_cut is not None:
                self.relay_refusals.append(f"ended the connection at {relay_cut}")
            else:
                self.reached = True
        reason = f"{short(peer)}: {exc}"
        self.reasons.append(reason)
        return reason

    def error(self, candidates: int) -> GatewayRequestError:
        """The one error for the client once no provider answered."""
        name = self.service
        which = f" (tried {', '.join(short(p) for p in sorted(self.tried))})" if self.tried else ""
        if self.reached:
            return ProviderFailed(f"provider(s) of '{name}' failed before answering{which}", code="provider_failed")
        if self.relay_refusals:
            return NoProviderAvailable(
                f"provider(s) of '{name}' are reachable only through a relay, which said: "
                f"{', '.join(sorted(set(self.relay_refusals)))}{which}",
                retry_after=5,
                code="relay_refused",
            )
        return NoProviderAvailable(
            f"{candidates} provider(s) of '{name}' match this request but none is reachable and healthy right "
            f"now{which}",
            retry_after=5,
        )
