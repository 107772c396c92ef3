"""Tests for sage_zmq.config: defaults, loading, validation messages, replace, env."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sage_zmq import config as config_mod
from sage_zmq.config import (
    Config,
    CurveConfig,
    PerformanceConfig,
    QueueConfig,
    config_from_env,
    current_config,
    load_config,
    reset_config,
    set_config,
)
from sage_zmq.errors import ConfigError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No stray SAGE_ZMQ variables, and no process-wide config leaking between tests."""
    import os

    for var in list(os.environ):
        if var.startswith("SAGE_ZMQ"):
            monkeypatch.delenv(var)
    reset_config()
    yield
    reset_config()


def write(tmp_path: Path, text: str, name: str = "sage.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(leaves(v, path + "."))
        else:
            out[path] = v
    return out


# --- defaults -------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.communication.queue.default_type == "local"
    assert cfg.communication.queue.max_size == 10000
    assert cfg.communication.queue.timeout == 30.0
    assert cfg.communication.router.strategy == "round_robin"
    assert cfg.communication.router.health_check_interval == 5.0
    assert cfg.communication.router.max_retries == 3
    assert cfg.communication.router.max_parallelism == 128
    p = cfg.performance
    assert (p.batch_size, p.compression, p.compression_min_bytes, p.zero_copy) == (
        100,
        "auto",
        4096,
        True,
    )
    assert (p.memory_pool_size, p.shm_threshold, p.flush_interval, p.max_message_size) == (
        1024,
        65536,
        0.001,
        2147483648,
    )
    r = cfg.reliability
    assert (r.heartbeat_interval, r.liveness, r.reconnect_initial, r.reconnect_max) == (
        1.0,
        3,
        1.0,
        32.0,
    )
    assert (r.ack_timeout, r.max_in_flight, r.fsync, r.fsync_interval) == (1.0, 8, "batch", 0.1)
    assert cfg.security.allow_pickle is False
    assert cfg.security.bind_host == "127.0.0.1"
    assert cfg.security.curve == CurveConfig()
    assert cfg.security.curve.enabled is False
    assert cfg.security.curve.authorized_keys is None
    assert cfg.observability.metrics_port is None
    assert cfg.observability.trace_sample_rate == 0.0
    assert cfg.observability.log_level is None  # the application's logging decides


def test_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.performance.batch_size = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.performance = PerformanceConfig()  # type: ignore[misc]
    assert hash(cfg) == hash(Config())


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"communication\.queue\.max_size: got 0"):
        QueueConfig(max_size=0)
    with pytest.raises(ConfigError, match=r"performance\.batch_size"):
        dataclasses.replace(Config().performance, batch_size=-1)
    assert type(QueueConfig(timeout=2).timeout) is float


# --- loading --------------------------------------------------------------------------------


def test_load_file_partial_merges_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "performance:\n  batch_size: 10\n")
    for source in (path, str(path)):
        cfg = load_config(source)
        assert cfg.performance.batch_size == 10
        assert cfg.performance.compression == "auto"
        assert cfg.reliability == Config().reliability
        assert cfg == Config().replace(**{"performance.batch_size": 10})


def test_load_file_full_nested(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
communication:
  queue: {default_type: tcp, max_size: 5, timeout: 2}
  router: {strategy: hash, max_parallelism: 16}
performance: {compression: false, zero_copy: false}
reliability: {fsync: interval, fsync_interval: 0.5, reconnect_initial: 2, reconnect_max: 4}
security:
  allow_pickle: true
  curve: {enabled: true, server_secret_key: /keys/server.key_secret}
observability: {metrics_port: 9100, trace_sample_rate: 1, log_level: debug}
""",
    )
    cfg = load_config(path)
    assert cfg.communication.queue == QueueConfig(default_type="tcp", max_size=5, timeout=2.0)
    assert cfg.communication.router.strategy == "hash"
    assert cfg.communication.router.max_parallelism == 16
    assert cfg.performance.compression is False
    assert cfg.reliability.fsync == "interval"
    assert cfg.reliability.reconnect_max == 4.0
    assert isinstance(cfg.reliability.reconnect_max, float)
    assert cfg.security.curve.enabled is True
    assert cfg.security.curve.server_secret_key == "/keys/server.key_secret"
    assert cfg.observability.metrics_port == 9100
    assert cfg.observability.trace_sample_rate == 1.0
    assert cfg.observability.log_level == "DEBUG"


def test_empty_file_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "performance:\n", "b.yaml")) == Config()


def test_load_dict() -> None:
    cfg = load_config({"reliability": {"liveness": 7}, "security": {"curve": {"enabled": True}}})
    assert cfg.reliability.liveness == 7
    assert cfg.security.curve.enabled is True
    assert cfg.security.bind_host == "127.0.0.1"
    assert load_config({}) == Config()


def test_load_dict_accepts_section_objects_and_pathlike() -> None:
    queue = QueueConfig(max_size=3)
    key = Path("/keys/client.key")
    cfg = load_config(
        {"communication": {"queue": queue}, "security": {"curve": {"client_public_key": key}}}
    )
    assert cfg.communication.queue is queue
    assert cfg.security.curve.client_public_key == "/keys/client.key"


def test_config_returned_as_is() -> None:
    cfg = Config().replace(**{"performance.batch_size": 3})
    assert load_config(cfg) is cfg


def test_env_var_names_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "communication: {queue: {max_size: 42}}\n")
    monkeypatch.setenv("SAGE_ZMQ_CONFIG", str(path))
    assert load_config().communication.queue.max_size == 42
    assert load_config(None).communication.queue.max_size == 42
    assert current_config().communication.queue.max_size == 42


def test_env_var_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv("SAGE_ZMQ_CONFIG", str(missing))
    with pytest.raises(ConfigError) as info:
        load_config()
    assert str(missing) in str(info.value)
    assert "SAGE_ZMQ_CONFIG" in str(info.value)
    assert "does not exist" in str(info.value)


def test_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "performance: {batch_size: 10}\n")
    monkeypatch.setenv("SAGE_ZMQ_CONFIG", str(path))
    monkeypatch.setenv("SAGE_ZMQ__PERFORMANCE__COMPRESSION", "false")
    monkeypatch.setenv("SAGE_ZMQ__SECURITY__CURVE__ENABLED", "true")
    monkeypatch.setenv("SAGE_ZMQ__OBSERVABILITY__METRICS_PORT", "9100")
    cfg = load_config()
    assert cfg.performance.batch_size == 10
    assert cfg.performance.compression is False
    assert cfg.security.curve.enabled is True
    assert cfg.observability.metrics_port == 9100
    # an explicit environ replaces os.environ
    assert config_from_env({}) == Config()
    # raising both bounds past the default cap is fine even though one alone would not be
    both = {
        "SAGE_ZMQ__RELIABILITY__RECONNECT_INITIAL": "40",
        "SAGE_ZMQ__RELIABILITY__RECONNECT_MAX": "60",
    }
    r = config_from_env(both).reliability
    assert (r.reconnect_initial, r.reconnect_max) == (40.0, 60.0)


def test_env_override_errors() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_env({"SAGE_ZMQ__PERFORMANCE__BATCH_SISE": "1"})
    msg = str(info.value)
    assert "SAGE_ZMQ__PERFORMANCE__BATCH_SISE" in msg
    assert "did you mean SAGE_ZMQ__PERFORMANCE__BATCH_SIZE?" in msg
    with pytest.raises(ConfigError, match=r"SAGE_ZMQ__PERFORMANCE__BATCH_SIZE: .*got 'ten'"):
        config_from_env({"SAGE_ZMQ__PERFORMANCE__BATCH_SIZE": "ten"})
    with pytest.raises(ConfigError, match=r"reliability\.reconnect_max: got 0\.5"):
        config_from_env({"SAGE_ZMQ__RELIABILITY__RECONNECT_MAX": "0.5"})


def test_current_and_set_config(tmp_path: Path) -> None:
    first = current_config()
    assert first == Config()
    assert current_config() is first  # cached
    chosen = set_config({"performance": {"batch_size": 7}})
    assert current_config() is chosen
    assert chosen.performance.batch_size == 7
    path = write(tmp_path, "reliability: {liveness: 9}\n")
    assert set_config(path).reliability.liveness == 9
    assert current_config().reliability.liveness == 9
    cfg = Config()
    assert set_config(cfg) is cfg
    with pytest.raises(ConfigError):
        set_config({"nope": 1})
    assert current_config() is cfg  # a failed set leaves the old config in place


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"communication": {"queue": {"max_sise": 3}}},
            "unknown config key 'communication.queue.max_sise'; "
            "did you mean 'communication.queue.max_size'?",
        ),
        (
            {"performance": {"batchsize": 3}},
            "unknown config key 'performance.batchsize'; did you mean 'performance.batch_size'?",
        ),
        (
            {"performance": {"heartbeat_interval": 3}},
            "did you mean 'reliability.heartbeat_interval'?",
        ),
        (
            {"reliabilty": {}},
            "unknown config key 'reliabilty'; did you mean 'reliability'?",
        ),
        (
            {"security": {"curve": {"enabeld": True}}},
            "did you mean 'security.curve.enabled'?",
        ),
        (
            {"performance": {"heartbeat_intervl": 3}},
            "did you mean 'reliability.heartbeat_interval'?",
        ),
        (
            {"performance": {"xyzzy": 1}},
            "unknown config key 'performance.xyzzy'; known keys under 'performance': batch_size,",
        ),
    ],
)
def test_unknown_keys(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"performance": {"batch_size": 0}},
            "performance.batch_size: got 0; allowed: an integer from 1 to 100000",
        ),
        (
            {"performance": {"batch_size": 100001}},
            "performance.batch_size: got 100001; allowed: an integer from 1 to 100000",
        ),
        (
            {"performance": {"batch_size": True}},
            "performance.batch_size: got True; allowed: an integer",
        ),
        (
            {"performance": {"batch_size": "10"}},
            "performance.batch_size: got '10'; allowed: an integer from 1 to 100000 "
            "(this is a string, not a number",
        ),
        (
            {"performance": {"batch_size": 10.0}},
            "performance.batch_size: got 10.0; allowed: an integer",
        ),
        (
            {"communication": {"queue": {"timeout": False}}},
            "communication.queue.timeout: got False; allowed: a number > 0",
        ),
        (
            {"communication": {"queue": {"timeout": 0}}},
            "communication.queue.timeout: got 0; allowed: a number > 0",
        ),
        (
            {"communication": {"queue": {"timeout": "30"}}},
            "communication.queue.timeout: got '30'",
        ),
        (
            {"communication": {"queue": {"timeout": float("nan")}}},
            "communication.queue.timeout: got nan; allowed: a number > 0 (must be finite)",
        ),
        (
            {"communication": {"router": {"max_retries": -1}}},
            "communication.router.max_retries: got -1; allowed: an integer >= 0",
        ),
        (
            {"performance": {"max_message_size": 1023}},
            "performance.max_message_size: got 1023; allowed: an integer >= 1024",
        ),
        (
            {"performance": {"compression": "yes"}},
            "performance.compression: got 'yes'; allowed: true, false or 'auto'",
        ),
        (
            {"performance": {"compression": 1}},
            "performance.compression: got 1; allowed: true, false or 'auto'",
        ),
        (
            {"performance": {"compression": "Auto"}},
            "did you mean 'auto'?",
        ),
        (
            {"performance": {"zero_copy": "true"}},
            "performance.zero_copy: got 'true'; allowed: true or false",
        ),
        (
            {"communication": {"queue": {"default_type": "zmq"}}},
            "communication.queue.default_type: got 'zmq'; "
            "allowed: one of 'local', 'shm', 'tcp', 'ray', 'sage'",
        ),
        (
            {"communication": {"router": {"strategy": "round-robin"}}},
            "communication.router.strategy: got 'round-robin'; allowed: one of 'round_robin', "
            "'hash', 'broadcast', 'load_balance'; did you mean 'round_robin'?",
        ),
        (
            {"reliability": {"fsync": "always"}},
            "reliability.fsync: got 'always'; allowed: one of 'batch', 'interval', 'never'",
        ),
        (
            {"reliability": {"reconnect_initial": 10, "reconnect_max": 5}},
            "reliability.reconnect_max: got 5.0; allowed: a value >= "
            "reliability.reconnect_initial (10.0)",
        ),
        (
            {"reliability": {"liveness": 0}},
            "reliability.liveness: got 0; allowed: an integer >= 1",
        ),
        (
            {"observability": {"metrics_port": 70000}},
            "observability.metrics_port: got 70000; allowed: an integer from 1 to 65535 or null",
        ),
        (
            {"observability": {"trace_sample_rate": 1.5}},
            "observability.trace_sample_rate: got 1.5; allowed: a number from 0 to 1",
        ),
        (
            {"observability": {"log_level": "verbose"}},
            "observability.log_level: got 'verbose'; allowed: one of",
        ),
        (
            {"observability": {"log_level": "warnng"}},
            "did you mean 'WARNING'?",
        ),
        (
            {"security": {"bind_host": ""}},
            "security.bind_host: got ''; allowed: a non-empty string",
        ),
        (
            {"security": {"bind_host": None}},
            "security.bind_host: got None; allowed: a non-empty string",
        ),
        (
            {"security": {"curve": {"server_public_key": 5}}},
            "security.curve.server_public_key: got 5; allowed: a path string or null",
        ),
        (
            {"security": {"curve": {"enabled": None}}},
            "security.curve.enabled: got None; allowed: true or false",
        ),
        (
            {"performance": 5},
            "performance: got 5; allowed: a mapping of its keys (batch_size,",
        ),
        (
            {"performance": {"batch_size": {"value": 3}}},
            "performance.batch_size: got {'value': 3}",
        ),
        (
            {1: {}},
            "config keys must be strings; got 1 in the top level",
        ),
    ],
)
def test_bad_values(data: dict[Any, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    assert expected in str(info.value)


def test_ints_accepted_for_floats() -> None:
    cfg = load_config({"reliability": {"heartbeat_interval": 2, "ack_timeout": 3}})
    assert cfg.reliability.heartbeat_interval == 2.0
    assert type(cfg.reliability.heartbeat_interval) is float
    assert type(cfg.reliability.ack_timeout) is float


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "must hold a mapping of sections"),
        ("just a string\n", "not a str"),
        ("performance: {batch_size: 10\n", "is not valid YAML"),
        ("performance:\n  batch_size: 1\n  batch_size: 2\n", "duplicate key 'batch_size'"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "base: &b {batch_size: 5, zero_copy: false}\n",
    )
    # an unknown top-level anchor holder is still rejected...
    with pytest.raises(ConfigError, match="unknown config key 'base'"):
        load_config(path)
    # ...but overriding a merged key is legitimate YAML, not a duplicate
    data = yaml.load(
        "a: &b {x: 1}\nc:\n  <<: *b\n  x: 2\n",
        Loader=config_mod._strict_loader(),
    )
    assert data["c"] == {"x": 2}


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "communication:\n  queue:\n    max_sise: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "did you mean 'communication.queue.max_size'?" in msg


def test_bad_source_type() -> None:
    with pytest.raises(ConfigError, match="cannot load a configuration from a int"):
        load_config(3)  # type: ignore[arg-type]


# --- replace / to_dict ----------------------------------------------------------------------


def test_replace() -> None:
    cfg = Config()
    new = cfg.replace(**{"performance.batch_size": 10, "communication.queue.timeout": 5})
    assert new.performance.batch_size == 10
    assert new.communication.queue.timeout == 5.0
    assert cfg.performance.batch_size == 100  # the original is untouched
    assert new.reliability is cfg.reliability
    section = cfg.replace(performance={"batch_size": 11}, **{"security.curve.enabled": True})
    assert section.performance.batch_size == 11
    assert section.performance.zero_copy is True
    assert section.security.curve.enabled is True
    assert cfg.replace() == cfg


def test_replace_validates() -> None:
    with pytest.raises(ConfigError, match=r"performance\.batch_size: got 0"):
        Config().replace(**{"performance.batch_size": 0})
    with pytest.raises(ConfigError, match=r"did you mean 'performance\.batch_size'"):
        Config().replace(**{"performance.batch_sze": 5})
    with pytest.raises(ConfigError, match="conflicts"):
        Config().replace(**{"performance": 1, "performance.batch_size": 5})


def test_to_dict_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        {
            "performance": {"batch_size": 3, "compression": True},
            "security": {"curve": {"enabled": True, "authorized_keys": "/keys"}},
            "observability": {"metrics_port": 9000},
        }
    )
    d = cfg.to_dict()
    assert d["performance"]["batch_size"] == 3
    assert d["security"]["curve"]["authorized_keys"] == "/keys"
    assert load_config(d) == cfg
    path = write(tmp_path, yaml.safe_dump(d, sort_keys=False))
    assert load_config(path) == cfg
    assert set(leaves(d)) == set(leaves(Config().to_dict()))
    assert len(leaves(d)) == 35


# --- docs stay in step with the schema ------------------------------------------------------


def test_docs_reference_every_key_with_its_default() -> None:
    text = DOCS.read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_.]+)` \|[^|]*\| `([^`]*)` \|", text, flags=re.MULTILINE)
    documented = dict(rows)
    defaults = leaves(Config().to_dict())
    assert set(documented) == set(defaults)
    for path, default in defaults.items():
        assert yaml.safe_load(documented[path]) == default, path


def test_docs_full_example_is_the_defaults() -> None:
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    assert load_config(yaml.safe_load(blocks[-1])) == Config()
    assert yaml.safe_load(blocks[-1]) == Config().to_dict()
