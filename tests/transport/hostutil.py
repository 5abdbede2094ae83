"""Test helpers for transport tests: which upgrader hosts use."""

from __future__ import annotations

from ocf.identity import Identity


def make_upgrader(identity: Identity):
    """The real libp2p upgrader once available; a plaintext stand-in before that."""
    try:
        from ocf.transport.host import Libp2pUpgrader  # noqa: F401

        return None  # default: real multistream + Noise
    except ImportError:
        from .plain import PlainUpgrader

        return PlainUpgrader(identity)
