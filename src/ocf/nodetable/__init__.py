"""The node table: who is in the network and what each peer offers (owner-signed, replicated)."""

from .table import PROTOCOL, NodeTable, open_nodetable

__all__ = ["PROTOCOL", "NodeTable", "open_nodetable"]
