"""Access-control settings: parsing, secrets kept out of reprs, and the log naming the real bind address."""

from __future__ import annotations

import logging

import pytest

from ocf.config import load
from ocf.errors import ConfigError
from ocf.node import open_node


def test_service_api_keys_pair_with_services_and_stay_out_of_reprs():
    flags = {
        "service.name": ["llm", "emb"],
        "service.port": ["8080", "8081"],
        "service.api-key": ["sk-backend-1", "sk-backend-2"],
    }
    config = load(flags, env={})
    assert [s.api_key for s in config.services] == ["sk-backend-1", "sk-backend-2"]
    config = load(dict(flags, **{"service.api-key": ["sk-one"]}), env={})
    assert [s.api_key for s in config.services] == ["sk-one", "sk-one"]  # one key for all
    with pytest.raises(ConfigError):
        load(dict(flags, **{"service.api-key": ["a", "b", "c"]}), env={})
    config = load(
        {"api-key": ["sk-a,sk-b", "sk-c"], "admin-token": "adm"}, env={"OCF_CORS_ORIGINS": "https://a.example"}
    )
    assert (
        config.api_keys == ("sk-a", "sk-b", "sk-c")
        and config.admin_token == "adm"
        and config.cors_origins == "https://a.example"
    )
    text = repr(config) + repr(load(flags, env={}))
    assert "sk-" not in text and "adm'" not in text


def test_defaults_are_closed_for_writes():
    config = load({}, env={})
    assert config.cors_origins == "" and config.api_keys == () and config.admin_token is None
    assert (config.admin_rate, config.admin_burst, config.register_rate, config.register_burst) == (10.0, 100, 5.0, 100)


async def test_the_log_names_the_address_really_bound(node_config, caplog):
    caplog.set_level(logging.INFO)
    async with open_node(node_config(host="0.0.0.0")) as node:
        port = node.gateway_url.rsplit(":", 1)[1]
    lines = [r.getMessage() for r in caplog.records if r.name == "ocf.gateway"]
    assert any("gateway listening" in line and f"0.0.0.0:{port}" in line for line in lines), lines
    assert any("without API keys" in line for line in lines)  # every interface and no key: say so
