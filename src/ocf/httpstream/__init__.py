"""HTTP/1.1 over arbitrary byte streams: a sans-IO codec and bridge plus thin Trio drivers.

Used by the gateway for ``/libp2p-http`` transport streams (peer to peer, as
Open Compute Framework) and for keep-alive TCP connections to local backends.
"""

from .bridge import ClientBridge, ServerBridge, asgi_scope, forwardable, get_header

__all__ = ["ClientBridge", "ServerBridge", "asgi_scope", "forwardable", "get_header"]
