"""The services registrar against real local HTTP backends."""

from __future__ import annotations

import logging

import pytest
import trio
from quart import jsonify
from quart_trio import QuartTrio

from ocf.config import ServiceSpec
from ocf.errors import ServiceRegistrationError
from ocf.node import open_node
from ocf.services import parse_models

from ..conftest import free_port
from ..gateway.util import load_mock_llm, running_mock_llm


def llm_record(node):
    return next((r for r in node.services.records() if r["name"] == "llm"), None)


async def test_backend_started_after_the_node_is_picked_up(node_config):
    port = free_port()
    config = node_config(services=(ServiceSpec("llm", port, "127.0.0.1"),))
    async with open_node(config) as node:  # startup does not wait for the backend
        assert node.services.status("llm") == "starting"
        await node.services.refresh()
        assert node.services.status("llm") == "starting" and llm_record(node) is None
        async with running_mock_llm(["m1", "m2"], port=port):
            await node.services.refresh()
            assert node.services.status("llm") == "healthy"
            assert llm_record(node) == {
                "name": "llm",
                "host": "127.0.0.1",
                "port": port,
                "status": "healthy",
                "identity_group": ["model=m1", "model=m2"],
            }
            if node.table is not None:
                own = node.table.own_entry()
                assert any(s["name"] == "llm" and "model=m1" in s["identity_group"] for s in own["service"])


async def test_models_added_removed_and_backend_down_update_the_record(node_config, caplog):
    caplog.set_level(logging.INFO, logger="ocf.services")
    port = free_port()
    async with (
        running_mock_llm(["m1"], port=port) as mock,
        open_node(node_config(services=(ServiceSpec("llm", port, "127.0.0.1"),))) as node,
    ):
        await node.services.refresh()
        assert llm_record(node)["identity_group"] == ["model=m1"]
        mock.models.append("m3")
        await node.services.refresh()
        assert llm_record(node)["identity_group"] == ["model=m1", "model=m3"]
        mock.models.remove("m1")
        await node.services.refresh()
        assert llm_record(node)["identity_group"] == ["model=m3"]
        mock.stop()
        await node.services.refresh()
        assert llm_record(node)["status"] == "unhealthy"
        assert llm_record(node)["identity_group"] == ["model=m3"]  # last known, so routing can say 503 not 404
        async with running_mock_llm(["m4"], port=port):
            await node.services.refresh()
            assert llm_record(node) == {
                "name": "llm",
                "host": "127.0.0.1",
                "port": port,
                "status": "healthy",
                "identity_group": ["model=m4"],
            }
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("service models changed name=llm models=m1,m3") for m in messages)
    assert any(m.startswith("service unhealthy name=llm") for m in messages)


async def test_non_llm_service_has_no_identity_groups(node_config):
    async with (
        running_mock_llm(["ignored"]) as mock,
        open_node(node_config(services=(ServiceSpec("foo", mock.port, "127.0.0.1"),))) as node,
    ):
        await node.services.refresh()
        assert node.services.records() == [
            {"name": "foo", "host": "127.0.0.1", "port": mock.port, "status": "healthy", "identity_group": []}
        ]


async def test_llm_without_health_route_counts_as_up_if_it_lists_models(node_config):
    app = QuartTrio("bare")

    @app.get("/v1/models")
    async def models():
        return jsonify(object="list", data=[{"id": "only"}])

    mock_llm = load_mock_llm()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(mock_llm.serve, app, "127.0.0.1", 0)
        async with open_node(node_config(services=(ServiceSpec("llm", port, "127.0.0.1"),))) as node:
            await node.services.refresh()
            assert llm_record(node)["identity_group"] == ["model=only"]
        nursery.cancel_scope.cancel()


async def test_gives_up_after_max_tries_until_refreshed(node_config, caplog):
    port = free_port()
    async with open_node(node_config(services=(ServiceSpec("llm", port, "127.0.0.1"),))) as node:
        node.services.max_health_tries = 2
        for _ in range(2):  # each refresh is at least one more try
            await node.services.refresh()
            if node.services.status("llm") == "failed":
                break
        assert node.services.status("llm") == "failed"
        assert any("service never became healthy; giving up" in r.getMessage() for r in caplog.records)
        async with running_mock_llm(["m1"], port=port):
            await node.services.refresh()  # an explicit refresh tries again
            assert node.services.status("llm") == "healthy"


async def test_internal_service_validation(node_config):
    async with open_node(node_config(services=(ServiceSpec("llm", 1, "127.0.0.1"),))) as node:
        services = node.services
        services.register_internal("jobs", "/v1/jobs")
        assert services.lookup("jobs").path_prefix == "/v1/jobs"
        with pytest.raises(ServiceRegistrationError):
            services.register_internal("jobs", "/v1/other")
        with pytest.raises(ServiceRegistrationError):
            services.register_internal("llm", "/v1/x")  # taken by a configured service
        with pytest.raises(ServiceRegistrationError):
            services.register_internal("bad name", "/v1/x")
        for prefix in ("/", "/v1/service/x", "/v1/_service/y", "/v1/p2p/z"):
            with pytest.raises(ServiceRegistrationError):
                services.register_internal("loop", prefix)
        await services.wait_published()
        assert [r["name"] for r in services.records()] == ["jobs"]
        services.unregister_internal("jobs")
        assert services.lookup("jobs") is None and services.names() == ["llm"]


def test_parse_models():
    assert parse_models(
        {"data": [{"id": "b"}, {"id": "a"}, {"id": "a"}, {"id": 3}, "c", {"x": 1}, {"id": "bad,comma"}]}
    ) == ("a", "b", "c")
    assert parse_models([{"id": "x"}]) == ("x",)
    with pytest.raises(Exception, match="no 'data' list"):
        parse_models({"models": []})


async def test_table_is_written_only_when_the_list_changes(node_config, caplog):
    caplog.set_level(logging.INFO, logger="ocf.services")
    async with (
        running_mock_llm(["m1"]) as mock,
        open_node(node_config(services=(ServiceSpec("llm", mock.port, "127.0.0.1"),))) as node,
    ):
        for _ in range(4):
            await node.services.refresh()  # polling an unchanged backend
        mock.models.append("m2")
        await node.services.refresh()
        await node.services.refresh()
    published = [r.getMessage() for r in caplog.records if r.getMessage().startswith("services published")]
    assert published == ["services published services=llm:healthy"] * 2
