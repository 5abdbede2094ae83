"""Typed exceptions for every failure a caller may want to tell apart.

Every error raised on purpose by ocf derives from :class:`OcfError`, so a
caller (the CLI, the gateway, a test) can catch "anything ocf refused" in one
place and still react to the specific kind when it matters.
"""

from __future__ import annotations


class OcfError(Exception):
    """Base class of all errors ocf raises on purpose."""


class ConfigError(OcfError):
    """A setting has a bad value; ``setting`` names the flag (e.g. ``--tcpport``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class IdentityError(OcfError):
    """A key, peer ID or signature is malformed or does not verify."""


class MultiaddrError(OcfError):
    """A multiaddr string or binary encoding is malformed or unsupported."""


class StoreError(OcfError):
    """The LMDB store cannot be used."""


class DataDirLocked(StoreError):
    """Another process (or node in this process) already holds the data directory."""


class StoreCorrupt(StoreError):
    """The store exists but cannot be read; start again with ``--cleanslate``."""
