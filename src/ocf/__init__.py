"""ocf: a Trio-native node of a decentralized compute fabric.

``async with ocf.open_node(ocf.Config(...)) as node:`` runs a node inside the
caller's Trio run; ``python -m ocf start`` is the same from a shell.
"""

from .config import Config, ServiceSpec
from .node import Node, open_node
from .version import __version__

__all__ = ["Config", "Node", "ServiceSpec", "__version__", "open_node"]
