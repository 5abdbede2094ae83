"""Shared fixtures: free ports, temporary data dirs, node configs."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from ocf.config import Config

from .ports import free_port

__all__ = ["free_port"]

# A failure inside a whole node comes out wrapped in one exception group per nursery it crosses
# (host, bootstrap, DHT, membership, NAT, registrar, ...): more than the 10 levels tracebacks
# print by default, so the report ended in "... (max_group_depth is 10)" without the failure.
traceback.TracebackException.__init__.__kwdefaults__["max_group_depth"] = 40

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
