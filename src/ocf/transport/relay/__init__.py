"""Circuit relay v2 (hop and stop), AutoNAT and DCUtR: reaching peers behind NAT.

- :mod:`.messages`: the wire messages, sans-IO;
- :mod:`.service`: the relay (``--relay``): reservations and circuits under go-libp2p's limits;
- :mod:`.client`: dialing ``/p2p-circuit`` addresses, accepting relayed connections, holding reservations.
"""

from .client import RelayClient, open_relay_client
from .messages import HOP, STOP
from .service import RelayLimits, RelayService, open_relay_service

__all__ = ["HOP", "STOP", "RelayClient", "RelayLimits", "RelayService", "open_relay_client", "open_relay_service"]
