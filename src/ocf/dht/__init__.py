"""Kademlia DHT for peer routing (libp2p kad-dht): find a peer's addresses by its ID.

:mod:`~ocf.dht.wire` is the sans-IO message codec and framing,
:mod:`~ocf.dht.table` the keyspace and bounded routing table,
:mod:`~ocf.dht.lookup` the iterative lookup state machine,
:mod:`~ocf.dht.limits` the budgets against hostile peers, and
:mod:`~ocf.dht.service` the Trio driver (:func:`open_dht`) that serves the
protocol and resolves addresses for the host's dials. docs/dht.md says why.
"""

from .limits import DhtLimits
from .service import Dht, choose_mode, open_dht

__all__ = ["Dht", "DhtLimits", "choose_mode", "open_dht"]
