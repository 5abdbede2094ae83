"""Secure multiplexed peer transport: libp2p wire protocols (multistream-select,
Noise XX, yamux) over TCP, WebSocket and an in-memory network.

Entry point: :func:`open_host` (see docs/internals.md for the contract).
"""

from .host import Connection, Host, PeerEvent, PeerInfo, open_host
from .memory import MemoryNetwork
from .muxer import MuxedConnection, MuxedStream

Stream = MuxedStream

__all__ = [
    "Connection",
    "Host",
    "MemoryNetwork",
    "MuxedConnection",
    "MuxedStream",
    "PeerEvent",
    "PeerInfo",
    "Stream",
    "open_host",
]
