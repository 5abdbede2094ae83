"""Membership: who is alive, by SWIM probes and gossip over libp2p streams (liveness left the node table)."""

from .messages import PROTOCOL
from .swim import Swim, SwimConfig
from .update import Status, Update

__all__ = ["PROTOCOL", "Status", "Swim", "SwimConfig", "Update"]
