"""Node identity: Ed25519 keys, libp2p peer IDs and multiaddrs."""

from .keys import Identity, load_or_create
from .multiaddr import Multiaddr
from .peerid import PeerId

__all__ = ["Identity", "Multiaddr", "PeerId", "load_or_create"]
