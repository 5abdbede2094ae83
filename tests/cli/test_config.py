from pathlib import Path

import pytest

from ocf.config import SETTINGS, Config, ServiceSpec, load
from ocf.errors import ConfigError

PEER = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


def test_defaults_match_ocf():
    cfg = load({}, env={})
    assert (cfg.mode, cfg.tcpport, cfg.udpport, cfg.port) == ("node", 43905, 59820, 8092)
    assert cfg.data_dir == Path("~/.ocf").expanduser()
    assert cfg == Config()


def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    f = tmp_path / "ocf.toml"
    f.write_text('tcpport = 1111\nport = 2222\nudpport = 3333\nmode = "local"\n')
    env = {"OCF_TCPPORT": "4444", "OCF_PORT": "5555"}
    cfg = load({"tcpport": "6666"}, env=env, config_file=f)
    assert cfg.tcpport == 6666  # flag
    assert cfg.port == 5555  # env
    assert cfg.udpport == 3333  # file
    assert cfg.mode == "local"  # file
    assert cfg.log_level == "info"  # default


def test_config_file_from_env_and_nested_keys(tmp_path):
    f = tmp_path / "ocf.toml"
    f.write_text(
        f'[bootstrap]\naddr = ["/ip4/1.2.3.4/tcp/43905/p2p/{PEER}"]\n'
        '[[services]]\nname = "llm"\nport = 8080\n'
        '[[services]]\nname = "foo"\nport = 9000\nhost = "127.0.0.1"\n'
        "[jobs]\nmax-stages = 3\n"
    )
    cfg = load({}, env={"OCF_CONFIG": str(f)})
    assert cfg.bootstrap_addrs == (f"/ip4/1.2.3.4/tcp/43905/p2p/{PEER}",)
    assert cfg.services == (ServiceSpec("llm", 8080), ServiceSpec("foo", 9000, "127.0.0.1"))
    assert cfg.jobs_max_stages == 3


def test_services_pair_flags_in_order():
    cfg = load({"service.name": ["llm", "foo"], "service.port": ["8080", "9000"]}, env={})
    assert cfg.services == (ServiceSpec("llm", 8080), ServiceSpec("foo", 9000))
    env_cfg = load({}, env={"OCF_SERVICE_NAME": "llm,foo", "OCF_SERVICE_PORT": "8080,9000"})
    assert env_cfg.services == cfg.services


def test_bootstrap_accepts_comma_list_and_urls():
    cfg = load({"bootstrap.addr": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER},https://boot.example/v1/dnt/bootstraps"]}, env={})
    assert cfg.bootstrap_addrs == (f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}", "https://boot.example/v1/dnt/bootstraps")


@pytest.mark.parametrize(
    "flags,env,names",
    [
        ({"tcpport": "abc"}, {}, "--tcpport"),
        ({"tcpport": "70000"}, {}, "--tcpport"),
        ({"port": "-1"}, {}, "--port"),
        ({"mode": "cluster"}, {}, "--mode"),
        ({"bootstrap.addr": ["/ip4/1.2.3.4/tcp/1"]}, {}, "--bootstrap.addr"),
        ({"bootstrap.addr": ["nonsense"]}, {}, "--bootstrap.addr"),
        ({"service.name": ["llm"]}, {}, "--service.name"),
        ({"service.name": ["llm"], "service.port": ["0"]}, {}, "--service.port"),
        ({"service.name": ["l l m"], "service.port": ["1"]}, {}, "--service.name"),
        ({"log-level": "loud"}, {}, "--log-level"),
        ({"request-timeout": "-3"}, {}, "--request-timeout"),
        ({"max-body-size": "lots"}, {}, "--max-body-size"),
        ({}, {"OCF_UDPPORT": "x"}, "OCF_UDPPORT (--udpport)"),
        ({"mode": "standalone", "bootstrap.addr": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}"]}, {}, "--bootstrap.addr"),
    ],
)
def test_bad_values_name_the_flag(flags, env, names):
    with pytest.raises(ConfigError) as info:
        load(flags, env=env)
    assert str(info.value).startswith(names)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="--config: file not found"):
        load({}, env={}, config_file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load({}, env={}, config_file=bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load({}, env={}, config_file=unknown)


def test_sizes_and_switches():
    cfg = load({"max-body-size": "64M", "cleanslate": True, "ws": False}, env={"OCF_JOBS": "yes"})
    assert cfg.max_body_size == 64 << 20
    assert cfg.cleanslate and not cfg.ws and cfg.jobs


def test_every_setting_has_help_and_env_name():
    for s in SETTINGS:
        assert s.help.endswith(".") or s.help.endswith(")"), s.flag
        assert s.env.startswith("OCF_") and s.env.isupper()


def test_nat_traversal_settings():
    cfg = load({"relay": True, "reachability": "Private", "relay-circuit-data": "64K"}, env={"OCF_MAX_RELAYS": "3"})
    assert (cfg.relay, cfg.reachability, cfg.relay_circuit_data, cfg.max_relays) == (True, "private", 64 << 10, 3)
    defaults = load({}, env={})
    assert (defaults.relay, defaults.reachability, defaults.relay_circuit_duration) == (False, "auto", 120)
    with pytest.raises(ConfigError, match="reachability"):
        load({"reachability": "maybe"}, env={})
