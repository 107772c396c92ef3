"""Key partitioning: key -> key group -> instance, identical in every process and language.

This is a wire contract (see ``docs/partitioning.md`` and ``transports/vectors/partition.json``):
a key is turned into bytes by :func:`key_bytes`, hashed with MurmurHash3 x86 32-bit (seed 0,
unsigned), reduced to one of ``max_parallelism`` key groups, and key groups are spread over the
instances in contiguous ranges (Flink's scheme), so changing parallelism moves whole groups.
"""

from __future__ import annotations

import struct

import mmh3

from sage_zmq.errors import RoutingError

KEY_GROUP_DEFAULT = 128

_pack_double = struct.Struct(">d").pack
_hash = mmh3.hash


class KeyTypeError(RoutingError, TypeError):
    """A partition key has a type that has no defined byte form."""


def key_bytes(key: object) -> bytes:
    """The canonical bytes of a partition key (the part of the contract that is per type)."""
    t = type(key)
    # Exact-type checks first: they are the common case and keep the hot path short.
    if t is str:
        return _encode_str(key)  # type: ignore[arg-type]
    if t is bytes:
        return key  # type: ignore[return-value]
    if t is int:
        return b"%d" % key  # type: ignore[str-format]
    if t is bool:
        return b"true" if key else b"false"
    if t is float:
        return _pack_double(key)
    return _key_bytes_slow(key)


def _encode_str(key: str) -> bytes:
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise KeyTypeError(
            f"partition key {key!r} is not encodable as UTF-8 ({exc.reason}); "
            "pass a valid str or the key's bytes"
        ) from None


def _key_bytes_slow(key: object) -> bytes:
    # Subclasses (IntEnum, str subclasses, numpy.float64, ...) and buffer types.
    if key is None:
        raise RoutingError(
            "hash routing needs a partition_key, got None; "
            "set the packet's partition_key (str, bytes, int or float)"
        )
    if isinstance(key, bool):  # before int: bool is an int subclass
        return b"true" if key else b"false"
    if isinstance(key, str):
        return _encode_str(key)
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    if isinstance(key, int):
        return b"%d" % int(key)
    if isinstance(key, float):
        return _pack_double(float(key))
    raise KeyTypeError(
        f"cannot partition on a key of type {type(key).__module__}.{type(key).__qualname__}; "
        "pass str, bytes, int or float (convert e.g. numpy integers with int()), "
        "or a precomputed key such as str(key) or a stable id"
    )


def key_hash(key: object) -> int:
    """MurmurHash3 x86 32-bit, seed 0, unsigned, of :func:`key_bytes`."""
    return _hash(key_bytes(key), 0, False)


def _check(parallelism: int, max_parallelism: int) -> None:
    if type(max_parallelism) is not int or max_parallelism < 1:
        raise RoutingError(
            f"max_parallelism must be an int >= 1, got {max_parallelism!r}; "
            f"the default is {KEY_GROUP_DEFAULT}"
        )
    if type(parallelism) is not int or not 1 <= parallelism <= max_parallelism:
        raise RoutingError(
            f"parallelism must be an int in 1..max_parallelism ({max_parallelism}), "
            f"got {parallelism!r}; raise max_parallelism or lower the parallelism"
        )


def key_group(key: object, max_parallelism: int = KEY_GROUP_DEFAULT) -> int:
    """The key group of ``key``: ``key_hash(key) % max_parallelism``."""
    if type(max_parallelism) is not int or max_parallelism < 1:
        _check(1, max_parallelism)
    return _hash(key_bytes(key), 0, False) % max_parallelism


def instance_for_key(
    key: object, parallelism: int, max_parallelism: int = KEY_GROUP_DEFAULT
) -> int:
    """The instance position (0..parallelism-1) that owns ``key``.

    ``key_group * parallelism // max_parallelism``: each instance owns a contiguous range of
    key groups.
    """
    if (
        type(parallelism) is not int
        or type(max_parallelism) is not int
        or not 1 <= parallelism <= max_parallelism
    ):
        _check(parallelism, max_parallelism)
    return (_hash(key_bytes(key), 0, False) % max_parallelism) * parallelism // max_parallelism


def instance_for_group(
    group: int, parallelism: int, max_parallelism: int = KEY_GROUP_DEFAULT
) -> int:
    """The instance position owning a key group (for precomputed groups)."""
    _check(parallelism, max_parallelism)
    if type(group) is not int or not 0 <= group < max_parallelism:
        raise RoutingError(f"key group must be an int in 0..{max_parallelism - 1}, got {group!r}")
    return group * parallelism // max_parallelism


__all__ = [
    "KEY_GROUP_DEFAULT",
    "KeyTypeError",
    "instance_for_group",
    "instance_for_key",
    "key_bytes",
    "key_group",
    "key_hash",
]
