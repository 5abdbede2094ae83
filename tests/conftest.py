"""Shared fixtures: free ports, temporary data dirs, node configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ocf.config import Config

from .ports import free_port

__all__ = ["free_port"]

# Hypothesis checks properties, not speed: on a loaded two-core machine its per-example deadline
# and "too slow" health check measure the scheduler, so neither applies here.
settings.register_profile("ocf", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ocf")


@pytest.fixture
def node_config(tmp_path: Path):
    """Factory: a Config for an isolated node on loopback with ephemeral ports."""
    counter = iter(range(10_000))

    def make(**overrides) -> Config:
        base = dict(
            mode="standalone",
            host="127.0.0.1",
            tcpport=0,
            port=0,
            data_dir=tmp_path / f"node{next(counter)}",
            log_level="debug",
        )
        base.update(overrides)
        return Config(**base)

    return make
