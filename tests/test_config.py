"""Settings are typed and range-checked wherever they come from (file, environment, flag, code),
and a refusal names what the user wrote and what was expected, never a secret."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import pytest

from crealia import Config, ConfigurationError
from crealia._config import _ENV, _Rule, load_config


def numeric_fields() -> list[attrs.Attribute[Any]]:
    return [f for f in attrs.fields(Config) if f.type in (int, float)]


def test_config_every_numeric_setting_has_a_range() -> None:
    fields = numeric_fields()
    assert len(fields) > 40  # the walk sees them
    for field in fields:
        assert isinstance(field.validator, _Rule), f"{field.name} has no range"
        default = field.default
        assert field.validator.accepts(default), f"{field.name}'s default is out of its range"
        for bad in (-(10**18), 10**18, math.inf, math.nan, True, "1", None):
            assert not field.validator.accepts(bad), f"{field.name} accepts {bad!r}"
            with pytest.raises(ConfigurationError, match=f"^{field.name} must be "):
                Config(**{field.name: bad})


#: The variables of numbers and flags (the others are text, checked by their own parsers).
TYPED_VARIABLES = [
    (name, field)
    for name, field, _kind in _ENV
    if getattr(attrs.fields(Config), field).type in (int, float, bool)
]


@pytest.mark.parametrize(("name", "field"), TYPED_VARIABLES)
def test_config_every_numeric_variable_is_checked_and_named(name: str, field: str) -> None:
    for raw in ("nonsense", "-1e300", "1e300"):
        if raw != "nonsense" and field == "dev":
            continue
        with pytest.raises(ConfigurationError) as refused:
            Config.from_env({name: raw})
        assert str(refused.value).startswith(f"{name}={raw!r}: {field} must be "), refused.value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('metrics_interval = "five"\n',
         "metrics_interval in {path} must be a number from 0 to 86400, got 'five'"),
        ('port = "4420"\n', "port in {path} must be an integer from 0 to 65535, got '4420'"),
        ("port = 4420.0\n", "port in {path} must be an integer from 0 to 65535, got 4420.0"),
        ("ws_port = 70000\n", "ws_port in {path} must be an integer from 0 to 65535, got 70000"),
        ("dev = 1\n", "dev in {path} must be true or false, got 1"),
        ("tick_ms = true\n", "tick_ms in {path} must be a number from 0 to 1000, got True"),
        ("host = 3\n", "host in {path} must be a string, got 3"),
        ("strategy_chain = [1, 2]\n",
         "strategy_chain in {path} must be a list of strings (or one comma-separated string), "
         "got [1, 2]"),
        ("strategy_options = 3\n", "strategy_options in {path} must be a table, got 3"),
        ('log_format = "xml"\n',
         "log_format in {path} must be one of json, text, got 'xml'"),
        ('jwt_secret = 12345\n', "jwt_secret in {path} must be a string, got (hidden)"),
        ('redis_url = "redis://:hunter2@h:port"\n',
         "redis_url in {path} must be a redis://host[:port], rediss://host[:port] or "
         "unix:///path URL, got 'redis://:***@h:port'"),
        ('allowed_hosts = ["a/b"]\n',
         "{path}: allowed_hosts: 'a/b' is not a host name: expected a name or an address "
         "without scheme or port, .domain for it and its subdomains, or *"),
    ],
)  # fmt: skip
def test_config_file_values_are_typed_and_named_with_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "crealia.toml"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as refused:
        Config.from_env({}, config_file=path)
    assert str(refused.value) == message.format(path=path)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CREALIA_TICK_MS": "-3"},
         "CREALIA_TICK_MS='-3': tick_ms must be a number from 0 to 1000"),
        ({"CREALIA_BATCH_FRAMES_PER_S": "10"},
         "CREALIA_BATCH_FRAMES_PER_S='10': batch_frames_per_s must be a number from 1000 to "
         "10000000"),
        ({"PORT": "eighty"}, "PORT='eighty': port must be an integer from 0 to 65535"),
        ({"WS_PORT": "70000"}, "WS_PORT='70000': ws_port must be an integer from 0 to 65535"),
        ({"CREALIA_DEV": "maybe"}, "CREALIA_DEV='maybe': dev must be true or false"),
        ({"CREALIA_HISTORY_LIMIT": "10"},
         "CREALIA_HISTORY_LIMIT='10': history_limit must be at least 1000 and at most 10000000"),
        ({"CREALIA_LOG_LEVEL": "loud"},
         "CREALIA_LOG_LEVEL='loud': log_level must be one of debug, info, warning, error"),
        ({"REDIS_URL": "redis://:hunter2@h:x"},
         "REDIS_URL='redis://:***@h:x': redis_url must be a redis://host[:port], "
         "rediss://host[:port] or unix:///path URL"),
        ({"WEBRTC_LISTEN_IPS": "10.0.0.1,nope"},
         "WEBRTC_LISTEN_IPS='10.0.0.1,nope': webrtc_listen_ips: 'nope' is not an IP address "
         "(e.g. 192.0.2.10)"),
        ({"WEBRTC_LISTEN_IPS": "0.0.0.0"},
         "WEBRTC_LISTEN_IPS='0.0.0.0': webrtc_listen_ips: '0.0.0.0' is a wildcard; name the "
         "addresses media should reach (leave the setting empty for every address of the "
         "machine)"),
        ({"WEBRTC_STUN_SERVERS": "http://x"},
         "WEBRTC_STUN_SERVERS='http://x': webrtc_stun_servers: 'http://x' is not a stun or "
         "stuns URL (e.g. stun:host.example.com:3478)"),
        ({"WEBRTC_TURN_SERVERS": "turn:"},
         "WEBRTC_TURN_SERVERS='turn:': webrtc_turn_servers: 'turn:' is not a turn or turns URL "
         "(e.g. turn:host.example.com:3478)"),
        ({"CREALIA_LIVE_RELAY_CPU_BUDGET": "0"},
         "CREALIA_LIVE_RELAY_CPU_BUDGET='0': live_relay_cpu_budget must be a number from 1 to "
         "6400"),
    ],
)  # fmt: skip
def test_config_variables_are_named_with_their_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Config.from_env(env)
    assert str(refused.value) == message
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"ws_port": ("--ws-port", "70000")},
         "--ws-port 70000: must be an integer from 0 to 65535"),
        ({"port": ("--port", "http")}, "--port http: must be an integer from 0 to 65535"),
        ({"tick_ms": ("--tick-ms", "-3")}, "--tick-ms -3: must be a number from 0 to 1000"),
        ({"batch_frames_per_s": ("--batch-frames-per-s", "many")},
         "--batch-frames-per-s many: must be a number from 1000 to 10000000"),
        ({"log_format": ("--log-format", "x m l")},
         "--log-format 'x m l': must be one of json, text"),
        ({"webrtc_listen_ips": ("--webrtc-listen-ip", "x.y")},
         "--webrtc-listen-ip x.y: webrtc_listen_ips: 'x.y' is not an IP address "
         "(e.g. 192.0.2.10)"),
    ],
)  # fmt: skip
def test_config_flags_are_read_like_variables_and_named(
    flags: dict[str, tuple[str, str]], message: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Config.from_env({}, flags=flags)
    assert str(refused.value) == message


def test_config_sources_win_in_order_and_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "crealia.toml"
    path.write_text('port = 4000\nws_port = 4001\nhost = "0.0.0.0"\nstrategy_chain = "manual"\n')
    env = {"PORT": "5000", "WS_PORT": "5001", "CREALIA_LOG_LEVEL": "INFO"}
    config, sources = load_config(env, config_file=path, flags={"port": ("--port", "6000")},
                                  tick_ms=0)  # fmt: skip
    assert (config.port, config.ws_port, config.host, config.tick_ms) == (6000, 5001, "0.0.0.0", 0)
    assert config.strategy_chain == ("manual",)  # one comma-separated string is a list
    assert config.log_level == "info"
    assert {name: (s.kind, s.name) for name, s in sources.items()} == {
        "port": ("flag", "--port"),
        "ws_port": ("env", "WS_PORT"),
        "host": ("file", str(path)),
        "strategy_chain": ("file", str(path)),
        "log_level": ("env", "CREALIA_LOG_LEVEL"),
        "tick_ms": ("code", "tick_ms"),
    }


def test_config_relations_between_settings_are_checked_once_all_are_known() -> None:
    # Either order of the two variables works: each alone is within its range.
    env = {"CREALIA_WAL_CHECKPOINT_BYTES": str(100 << 20), "CREALIA_WAL_MAX_BYTES": str(1 << 30)}
    assert Config.from_env(env).wal_checkpoint_bytes == 100 << 20
    with pytest.raises(ConfigurationError, match=r"wal_checkpoint_bytes \(104857600\) must not"):
        Config.from_env({"CREALIA_WAL_CHECKPOINT_BYTES": str(100 << 20)})
    with pytest.raises(ConfigurationError, match=r"snapshot_every .* must be below history_limit"):
        Config(history_limit=1000, snapshot_every=1000)


def test_config_unknown_settings_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown setting 'colour'"):
        Config.from_env({}, colour="blue")
    path = tmp_path / "crealia.toml"
    path.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigurationError, match="unknown setting 'colour'"):
        Config.from_env({}, config_file=path)


def test_config_webrtc_lists_are_read_from_comma_separated_variables() -> None:
    config = Config.from_env({"WEBRTC_LISTEN_IPS": "127.0.0.1, ::1",
                              "WEBRTC_STUN_SERVERS": "stun:a.example:3478,stuns:b.example",
                              "WEBRTC_TURN_CREDENTIAL": "hunter2"})  # fmt: skip
    assert config.webrtc_listen_ips == ("127.0.0.1", "::1")
    assert config.webrtc_stun_servers == ("stun:a.example:3478", "stuns:b.example")
    assert "hunter2" not in repr(config)


def test_config_secrets_are_kept_out_of_repr() -> None:
    config = Config(jwt_secret="hunter2-secret", redis_url="redis://:hunter2@localhost:6379/0",
                    alert_webhooks=("https://u:hunter2@hooks.example/x",))  # fmt: skip
    assert "hunter2" not in repr(config)
