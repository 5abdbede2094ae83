"""Embedded storage: one exclusively-locked LMDB environment per data dir."""

from .lmdbstore import Store

__all__ = ["Store"]
