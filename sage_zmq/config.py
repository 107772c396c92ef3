"""Typed configuration: frozen dataclasses loaded from YAML files, mappings or the environment.

The schema is the dataclasses themselves: field annotations give the accepted value types and
``_RULES`` adds ranges and allowed sets. Every leaf is checked in ``__post_init__``, so a section
built by hand is validated exactly like one loaded from a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import numbers
import os
import threading
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar, Union

from sage_zmq.errors import ConfigError

ENV_FILE = "SAGE_ZMQ_CONFIG"
"""Environment variable naming the YAML file that ``load_config(None)`` reads."""

ENV_PREFIX = "SAGE_ZMQ__"
"""Prefix of per-key overrides: ``SAGE_ZMQ__PERFORMANCE__BATCH_SIZE=10``."""

ConfigSource = Union["Config", Mapping[str, Any], str, "os.PathLike[str]", None]


@dataclass(frozen=True)
class Rule:
    """Constraints on one key beyond its annotated type."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()
    casefold: bool = False  # accept any case, store the canonical spelling
    path: bool = False  # also accept os.PathLike, stored as str


_LOG_LEVELS = tuple(logging.getLevelNamesMapping())

_RULES: dict[str, Rule] = {
    "communication.queue.default_type": Rule(choices=("local", "shm", "tcp", "ray", "sage")),
    "communication.queue.max_size": Rule(ge=1),
    "communication.queue.timeout": Rule(gt=0),
    "communication.router.strategy": Rule(
        choices=("round_robin", "hash", "broadcast", "load_balance")
    ),
    "communication.router.health_check_interval": Rule(gt=0),
    "communication.router.max_retries": Rule(ge=0),
    "communication.router.max_parallelism": Rule(ge=1),
    "performance.batch_size": Rule(ge=1, le=100_000),
    "performance.compression": Rule(choices=("auto",)),
    "performance.compression_min_bytes": Rule(ge=0),
    "performance.memory_pool_size": Rule(ge=0),
    "performance.shm_threshold": Rule(ge=0),
    "performance.flush_interval": Rule(gt=0),
    "performance.max_message_size": Rule(ge=1024),
    "performance.spin_wait": Rule(ge=0, le=0.01),
    "reliability.heartbeat_interval": Rule(gt=0),
    "reliability.liveness": Rule(ge=1),
    "reliability.reconnect_initial": Rule(gt=0),
    "reliability.reconnect_max": Rule(gt=0),
    "reliability.ack_timeout": Rule(gt=0),
    "reliability.max_in_flight": Rule(ge=1),
    "reliability.fsync": Rule(choices=("batch", "interval", "never")),
    "reliability.fsync_interval": Rule(gt=0),
    "security.curve.server_public_key": Rule(path=True),
    "security.curve.server_secret_key": Rule(path=True),
    "security.curve.client_public_key": Rule(path=True),
    "security.curve.client_secret_key": Rule(path=True),
    "security.curve.authorized_keys": Rule(path=True),
    "observability.metrics_port": Rule(ge=1, le=65535),
    "observability.trace_sample_rate": Rule(ge=0, le=1),
    "observability.log_level": Rule(choices=_LOG_LEVELS, casefold=True),
}

# key -> key in the same section that it may not be smaller than
_AT_LEAST: dict[str, str] = {
    "reliability.reconnect_max": "reliability.reconnect_initial",
}

_NO_RULE = Rule()


class _Section:
    """Validation shared by every config dataclass; ``_section`` is its dotted path."""

    _section = ""

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            path = _join(self._section, name)
            value = getattr(self, name)
            if _is_section(hint):
                if not isinstance(value, hint):
                    raise ConfigError(f"{path}: got {value!r}; allowed: a {hint.__name__}")
                continue
            # frozen dataclass: normalising (int -> float, case, PathLike -> str) needs this
            object.__setattr__(self, name, _check(path, value, hint))
        for key, floor in _AT_LEAST.items():
            section, _, name = key.rpartition(".")
            if section != self._section:
                continue
            floor_name = floor.rpartition(".")[2]
            if getattr(self, name) < getattr(self, floor_name):
                raise ConfigError(
                    f"{key}: got {getattr(self, name)!r}; allowed: a value >= {floor} "
                    f"({getattr(self, floor_name)!r})"
                )


@dataclass(frozen=True)
class QueueConfig(_Section):
    _section = "communication.queue"
    default_type: str = "local"
    max_size: int = 10000
    timeout: float = 30.0


@dataclass(frozen=True)
class RouterConfig(_Section):
    _section = "communication.router"
    strategy: str = "round_robin"
    health_check_interval: float = 5.0
    max_retries: int = 3
    max_parallelism: int = 128


@dataclass(frozen=True)
class CommunicationConfig(_Section):
    _section = "communication"
    queue: QueueConfig = field(default_factory=QueueConfig)
    router: RouterConfig = field(default_factory=RouterConfig)


@dataclass(frozen=True)
class PerformanceConfig(_Section):
    _section = "performance"
    batch_size: int = 100
    compression: bool | str = "auto"
    compression_min_bytes: int = 4096
    zero_copy: bool = True
    memory_pool_size: int = 1024
    shm_threshold: int = 65536
    flush_interval: float = 0.001
    max_message_size: int = 2147483648
    spin_wait: float = 0.0002


@dataclass(frozen=True)
class ReliabilityConfig(_Section):
    _section = "reliability"
    heartbeat_interval: float = 1.0
    liveness: int = 3
    reconnect_initial: float = 1.0
    reconnect_max: float = 32.0
    ack_timeout: float = 1.0
    max_in_flight: int = 8
    fsync: str = "batch"
    fsync_interval: float = 0.1


@dataclass(frozen=True)
class CurveConfig(_Section):
    _section = "security.curve"
    enabled: bool = False
    server_public_key: str | None = None
    server_secret_key: str | None = None
    client_public_key: str | None = None
    client_secret_key: str | None = None
    authorized_keys: str | None = None


@dataclass(frozen=True)
class SecurityConfig(_Section):
    _section = "security"
    allow_pickle: bool = False
    bind_host: str = "127.0.0.1"
    curve: CurveConfig = field(default_factory=CurveConfig)


@dataclass(frozen=True)
class ObservabilityConfig(_Section):
    _section = "observability"
    metrics_port: int | None = None
    trace_sample_rate: float = 0.0
    log_level: str | None = None  # None: leave the level to the application (root logger)


@dataclass(frozen=True)
class Config(_Section):
    """The whole configuration; build it with :func:`load_config`."""

    communication: CommunicationConfig = field(default_factory=CommunicationConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    reliability: ReliabilityConfig = field(default_factory=ReliabilityConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)

    def to_dict(self) -> dict[str, Any]:
        """Every key, nested; ``load_config(cfg.to_dict()) == cfg``."""
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        """A new validated Config with dotted-path overrides.

        ``cfg.replace(**{"performance.batch_size": 10})``; a path naming a section takes a
        mapping that is merged into that section.
        """
        return _build(Config, _nest(overrides), self)


# --- schema introspection -------------------------------------------------------------------

S = TypeVar("S", bound=_Section)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass's fields, in declaration order."""
    if cls not in _HINTS:
        resolved = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: resolved[f.name] for f in dataclasses.fields(cls)}
    return _HINTS[cls]


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, _Section)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _types_of(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


@cache
def _all_paths(cls: type = Config) -> tuple[str, ...]:
    """Every section and leaf path, depth first."""

    def walk(c: type) -> Iterator[str]:
        for name, hint in _hints(c).items():
            path = _join(c._section, name)  # type: ignore[attr-defined]
            yield path
            if _is_section(hint):
                yield from walk(hint)

    return tuple(walk(cls))


def _children(parent: str) -> list[str]:
    """Names of the keys directly under section ``parent`` ("" = top level)."""
    depth = parent.count(".") + 1 if parent else 0
    prefix = f"{parent}." if parent else ""
    return [
        p[len(prefix) :] for p in _all_paths() if p.startswith(prefix) and p.count(".") == depth
    ]


def _suggest(path: str) -> str | None:
    """The known path most likely meant by ``path``, or None."""
    parent, _, name = path.rpartition(".")
    # right key, wrong section
    moved = [p for p in _all_paths() if p.rpartition(".")[2] == name]
    if len(moved) == 1:
        return moved[0]
    siblings = _children(parent) if parent in ("", *_all_paths()) else []
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return _join(parent, close[0])
    # a near-miss of a key in another section
    by_name = {p.rpartition(".")[2]: p for p in _all_paths()}
    close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.75)
    return by_name[close[0]] if close else None


def _unknown_key(path: str) -> ConfigError:
    guess = _suggest(path)
    if guess is not None:
        return ConfigError(f"unknown config key {path!r}; did you mean {guess!r}?")
    parent = path.rpartition(".")[0]
    where = f"under {parent!r}" if parent else "at the top level"
    return ConfigError(
        f"unknown config key {path!r}; known keys {where}: {', '.join(_children(parent))}"
    )


# --- value checking -------------------------------------------------------------------------


def _describe(hint: Any, rule: Rule) -> str:
    """What a key accepts, in words, for error messages."""
    parts: list[str] = []
    for t in _types_of(hint):
        if t is bool:
            parts += ["true", "false"]
        elif t in (int, float):
            noun = "an integer" if t is int else "a number"
            low = f"> {rule.gt:g}" if rule.gt is not None else None
            if rule.ge is not None:
                low = f">= {rule.ge:g}"
            if rule.ge is not None and rule.le is not None:
                parts.append(f"{noun} from {rule.ge:g} to {rule.le:g}")
            elif low and rule.le is not None:
                parts.append(f"{noun} {low} and <= {rule.le:g}")
            elif low or rule.le is not None:
                parts.append(f"{noun} {low or f'<= {rule.le:g}'}")
            else:
                parts.append(noun)
        elif t is str:
            if rule.choices:
                parts.append(
                    "one of " + ", ".join(repr(c) for c in rule.choices)
                    if len(rule.choices) > 1
                    else repr(rule.choices[0])
                )
            elif rule.path:
                parts.append("a path string")
            else:
                parts.append("a non-empty string")
        elif t is type(None):
            parts.append("null")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _check(path: str, value: Any, hint: Any) -> Any:
    """The validated (and normalised) value of leaf ``path``; ConfigError if not allowed."""
    allowed = _types_of(hint)
    rule = _RULES.get(path, _NO_RULE)

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(f"{path}: got {value!r}; allowed: {_describe(hint, rule)}{extra}")

    if value is None:
        if type(None) in allowed:
            return None
        raise fail()
    if isinstance(value, bool):
        if bool in allowed:
            return value
        raise fail()
    if isinstance(value, numbers.Integral) and int in allowed:
        return _in_range(int(value), rule, fail)
    if isinstance(value, numbers.Real) and float in allowed:
        number = float(value)
        if not math.isfinite(number):
            raise fail(" (must be finite)")
        return _in_range(number, rule, fail)
    if isinstance(value, os.PathLike) and rule.path:
        value = os.fspath(value)
    if isinstance(value, str) and str in allowed:
        return _in_choices(value, rule, fail)
    if isinstance(value, str) and (int in allowed or float in allowed) and _looks_numeric(value):
        raise fail(" (this is a string, not a number: write numbers without quotes)")
    raise fail()


def _in_range(number: float, rule: Rule, fail: typing.Callable[[str], ConfigError]) -> Any:
    if (
        (rule.ge is not None and number < rule.ge)
        or (rule.gt is not None and number <= rule.gt)
        or (rule.le is not None and number > rule.le)
    ):
        raise fail("")
    return number


def _in_choices(text: str, rule: Rule, fail: typing.Callable[[str], ConfigError]) -> str:
    if not rule.choices:
        if not text.strip():
            raise fail("")
        return text
    if text in rule.choices:
        return text
    folded = {c.casefold(): c for c in rule.choices}
    if rule.casefold and text.casefold() in folded:
        return folded[text.casefold()]
    close = difflib.get_close_matches(text.casefold(), list(folded), n=1, cutoff=0.6)
    raise fail(f"; did you mean {folded[close[0]]!r}?" if close else "")


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- building -------------------------------------------------------------------------------


def _build(cls: type[S], data: Mapping[Any, Any], base: S) -> S:
    """``base`` with the keys in ``data`` (nested, partial) laid over it, validated."""
    hints = _hints(cls)
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            where = repr(cls._section) if cls._section else "the top level"
            raise ConfigError(f"config keys must be strings; got {key!r} in {where}")
        path = _join(cls._section, key)
        if key not in hints:
            raise _unknown_key(path)
        hint = hints[key]
        if not _is_section(hint) or isinstance(value, hint):
            changes[key] = value
        elif value is None:
            continue  # an empty section in YAML ("performance:") keeps its defaults
        elif isinstance(value, Mapping):
            changes[key] = _build(hint, value, getattr(base, key))
        else:
            raise ConfigError(
                f"{path}: got {value!r}; allowed: a mapping of its keys "
                f"({', '.join(_children(path))})"
            )
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


def _nest(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``; unknown paths are left for ``_build`` to name."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = nested
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                prefix = ".".join(parents[: i + 1])
                raise ConfigError(f"override {dotted!r} conflicts with override {prefix!r}")
            node = child
        if isinstance(node.get(leaf), dict) and isinstance(value, Mapping):
            node[leaf].update(value)
        elif leaf in node:
            raise ConfigError(f"override {dotted!r} conflicts with another override of it")
        else:
            node[leaf] = value
    return nested


@cache
def _strict_loader() -> type[Any]:
    """A SafeLoader that rejects duplicate keys, which PyYAML would otherwise silently drop.

    Built on first use: PyYAML costs ~20 ms to import, and most processes never read YAML.
    """
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: set[str] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key_node.value)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def _load_file(source: str | os.PathLike[str], via: str | None = None) -> Config:
    path = Path(source).expanduser()
    label = f"config file {str(path)!r}" + (f" (named by {via})" if via else "")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label} does not exist; check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{label} is a directory; give the path of a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {label}: {exc}") from None
    import yaml

    try:
        data = yaml.load(text, Loader=_strict_loader())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label} is not valid YAML: {exc}") from None
    if data is None:  # an empty file means "all defaults"
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{label} must hold a mapping of sections (e.g. 'performance: {{batch_size: 10}}'), "
            f"not a {type(data).__name__}"
        )
    try:
        return _build(Config, data, Config())
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from None


# --- public entry points --------------------------------------------------------------------


def config_from_env(environ: Mapping[str, str] | None = None) -> Config:
    """The file named by ``SAGE_ZMQ_CONFIG`` (else defaults) with ``SAGE_ZMQ__*`` overrides.

    ``SAGE_ZMQ__PERFORMANCE__BATCH_SIZE=10`` overrides ``performance.batch_size``; the value
    is read as a YAML scalar, so ``10`` is an int, ``true`` a bool and ``null`` is None.
    """
    env = os.environ if environ is None else environ
    file = env.get(ENV_FILE)
    cfg = _load_file(file, via=ENV_FILE) if file else Config()
    overrides: dict[str, Any] = {}
    for var in sorted(v for v in env if v.startswith(ENV_PREFIX)):
        path = ".".join(var[len(ENV_PREFIX) :].lower().split("__"))
        if path not in _all_paths():
            guess = _suggest(path)
            hint = f"; did you mean {_env_name(guess)}?" if guess else ""
            raise ConfigError(f"environment variable {var} names unknown key {path!r}{hint}")
        import yaml

        try:
            overrides[path] = yaml.safe_load(env[var])
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment variable {var}: not a YAML value: {exc}") from None
        try:
            cfg.replace(**{path: overrides[path]})
        except ConfigError as exc:
            # a lone override can trip a cross-key rule that the full set satisfies
            if path not in _AT_LEAST and path not in _AT_LEAST.values():
                raise ConfigError(f"environment variable {var}: {exc}") from None
    try:
        return cfg.replace(**overrides)
    except ConfigError as exc:
        raise ConfigError(f"with {ENV_PREFIX}* environment overrides: {exc}") from None


def _env_name(path: str) -> str:
    return ENV_PREFIX + path.upper().replace(".", "__")


def load_config(path_or_dict: ConfigSource = None) -> Config:
    """A validated Config from a YAML file path, a (partial) mapping, a Config, or None.

    None reads the environment (see :func:`config_from_env`): the file named by
    ``SAGE_ZMQ_CONFIG`` if set, else the defaults.
    """
    source = path_or_dict
    if source is None:
        return config_from_env()
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return _build(Config, source, Config())
    if isinstance(source, (str, os.PathLike)):
        return _load_file(source)
    raise ConfigError(
        f"cannot load a configuration from a {type(source).__name__}; "
        "give a YAML file path, a mapping, a Config or None"
    )


_lock = threading.Lock()
_current: Config | None = None


def current_config() -> Config:
    """The process-wide Config: the one given to :func:`set_config`, else ``load_config(None)``."""
    global _current
    with _lock:
        if _current is None:
            _current = load_config(None)
        return _current


def set_config(cfg_or_path_or_dict: ConfigSource) -> Config:
    """Make ``load_config(cfg_or_path_or_dict)`` the process-wide Config and return it."""
    global _current
    cfg = load_config(cfg_or_path_or_dict)
    with _lock:
        _current = cfg
    return cfg


def reset_config() -> None:
    """Forget the process-wide Config; the next :func:`current_config` reloads it."""
    global _current
    with _lock:
        _current = None


__all__ = [
    "ENV_FILE",
    "ENV_PREFIX",
    "CommunicationConfig",
    "Config",
    "ConfigSource",
    "CurveConfig",
    "ObservabilityConfig",
    "PerformanceConfig",
    "QueueConfig",
    "ReliabilityConfig",
    "RouterConfig",
    "Rule",
    "SecurityConfig",
    "config_from_env",
    "current_config",
    "load_config",
    "reset_config",
    "set_config",
]
