"""Test helpers for transport tests."""

from __future__ import annotations

from ocf.identity import Identity


def make_upgrader(identity: Identity):
    """The host's default upgrader (real multistream + Noise when available)."""
    return None
