"""Tests for sage_zmq.router.keys: the byte form, the hash, key groups, and the shared vectors.

Regenerate transports/vectors/partition.json (only when the case list changes, never to make a
failing test pass) with: python tests/test_router_keys.py --write
"""

from __future__ import annotations

import enum
import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sage_zmq.errors import RoutingError
from sage_zmq.router.keys import (
    KEY_GROUP_DEFAULT,
    KeyTypeError,
    instance_for_group,
    instance_for_key,
    key_bytes,
    key_group,
    key_hash,
)

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "transports" / "vectors" / "partition.json"
PARALLELISMS = (1, 2, 3, 7, 128)

CASES: list[tuple[str, Any]] = [
    ("str", ""),
    ("str", "a"),
    ("str", "ab"),
    ("str", "abc"),
    ("str", "abcd"),
    ("str", "abcde"),
    ("str", "hello"),
    ("str", "user-12345"),
    ("str", "Hello, world!"),
    ("str", "The quick brown fox jumps over the lazy dog"),
    ("str", "x" * 100),
    ("str", "héllo"),
    ("str", "日本語キー"),
    ("str", "😀 emoji"),
    ("str", "0"),
    ("str", "42"),
    ("str", "true"),
    ("bytes_hex", ""),
    ("bytes_hex", "00"),
    ("bytes_hex", "00000000"),
    ("bytes_hex", "ffffffffffffff"),
    ("bytes_hex", "000102030405060708090a0b0c0d0e0f"),
    ("bytes_hex", "757365722d3132333435"),
    ("int", 0),
    ("int", 1),
    ("int", -1),
    ("int", 42),
    ("int", -42),
    ("int", 2**31 - 1),
    ("int", -(2**31)),
    ("int", 2**32),
    ("int", 2**63 - 1),
    ("int", -(2**63)),
    ("int", 2**64),
    ("int", 2**64 + 1),
    ("int", 10**30),
    ("int", -(10**30)),
    ("float", 0.0),
    ("float", -0.0),
    ("float", 1.0),
    ("float", -1.5),
    ("float", 0.1),
    ("float", math.pi),
    ("float", 1e-300),
    ("float", 5e-324),
    ("float", 1.7976931348623157e308),
    ("float", math.inf),
    ("float", -math.inf),
    ("bool", True),
    ("bool", False),
]


def _json_key(key_type: str, key: Any) -> Any:
    # Ints and floats travel as text so JSON readers without big ints / Infinity stay exact.
    if key_type == "int":
        return str(key)
    if key_type == "float":
        if math.isinf(key):
            return "Infinity" if key > 0 else "-Infinity"
        return repr(key)
    return key


def _python_key(key_type: str, key: Any) -> Any:
    if key_type == "bytes_hex":
        return bytes.fromhex(key)
    if key_type == "int":
        return int(key)
    if key_type == "float":
        return float(key)
    return key


def build_vectors() -> list[dict[str, Any]]:
    out = []
    for key_type, raw in CASES:
        key = _python_key(key_type, raw)
        out.append(
            {
                "key": _json_key(key_type, raw),
                "key_type": key_type,
                "key_bytes_hex": key_bytes(key).hex(),
                "hash": key_hash(key),
                "max_parallelism": KEY_GROUP_DEFAULT,
                "group": key_group(key),
                "instance": {str(p): instance_for_key(key, p) for p in PARALLELISMS},
            }
        )
    return out


def _dump(vectors: list[dict[str, Any]]) -> str:
    lines = (json.dumps(v, ensure_ascii=False) for v in vectors)
    return "[\n " + ",\n ".join(lines) + "\n]\n"


def _murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """A plain reference implementation, independent of the mmh3 package."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & mask

    h = seed
    body = len(data) - len(data) % 4
    for i in range(0, body, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = rotl((k * c1) & mask, 15) * c2 & mask
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & mask
    tail = data[body:]
    if tail:
        k = int.from_bytes(tail, "little")
        h ^= rotl((k * c1) & mask, 15) * c2 & mask
    h ^= len(data)
    h = ((h ^ (h >> 16)) * 0x85EBCA6B) & mask
    h = ((h ^ (h >> 13)) * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


# -- the shared vectors ------------------------------------------------------------------------


def test_vectors_file_matches_code() -> None:
    on_disk = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert on_disk == build_vectors()
    assert len(on_disk) >= 40
    assert {v["key_type"] for v in on_disk} == {"str", "bytes_hex", "int", "float", "bool"}


def test_vectors_recompute_from_their_own_fields() -> None:
    # Read each case only through its JSON fields, as another language would.
    for case in json.loads(VECTORS.read_text(encoding="utf-8")):
        key = _python_key(case["key_type"], case["key"])
        assert key_bytes(key).hex() == case["key_bytes_hex"], case
        assert key_hash(key) == case["hash"], case
        assert case["hash"] % case["max_parallelism"] == case["group"], case
        for p, inst in case["instance"].items():
            assert instance_for_key(key, int(p)) == inst, case
            assert case["group"] * int(p) // case["max_parallelism"] == inst, case


def test_vectors_agree_with_reference_murmur3() -> None:
    for case in json.loads(VECTORS.read_text(encoding="utf-8")):
        assert _murmur3_x86_32(bytes.fromhex(case["key_bytes_hex"])) == case["hash"], case


def test_vector_keys_cover_the_awkward_cases() -> None:
    keys = [_python_key(t, k) for t, k in CASES]
    assert any(isinstance(k, int) and not isinstance(k, bool) and k > 2**64 for k in keys)
    assert any(isinstance(k, str) and any(ord(c) > 0xFFFF for c in k) for k in keys)
    for falsy in ("", b"", 0, 0.0, False):
        assert any(type(k) is type(falsy) and k == falsy for k in keys), falsy


# -- the function ------------------------------------------------------------------------------


def test_murmur3_known_answers() -> None:
    # Published MurmurHash3_x86_32 (seed 0) values: the hash is the reference algorithm.
    assert key_hash(b"") == 0
    assert key_hash(b"test") == 0xBA6BD213
    assert key_hash(b"Hello, world!") == 0xC0363E43
    assert key_hash("The quick brown fox jumps over the lazy dog") == 0x2E4FF723
    assert _murmur3_x86_32(b"Hello, world!", 1234) == 0xFAF6CDB3
    assert _murmur3_x86_32(b"test") == 0xBA6BD213


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("héllo", "héllo".encode()),
        (b"\x00\xff", b"\x00\xff"),
        (bytearray(b"ab"), b"ab"),
        (memoryview(b"abc"), b"abc"),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (-42, b"-42"),
        (2**70, str(2**70).encode()),
        (1.5, struct.pack(">d", 1.5)),
        (-0.0, b"\x80" + b"\x00" * 7),
        ("", b""),
    ],
)
def test_key_bytes_per_type(key: object, expected: bytes) -> None:
    assert key_bytes(key) == expected


def test_subclasses_use_their_base_type_form() -> None:
    class Color(enum.IntEnum):
        RED = 7

    class Name(str):
        pass

    assert key_bytes(Color.RED) == b"7"
    assert key_bytes(Name("ab")) == b"ab"
    assert key_hash(Color.RED) == key_hash(7)


def test_bool_is_not_its_int() -> None:
    assert key_bytes(True) != key_bytes(1)
    assert key_bytes(False) != key_bytes(0)


def test_falsy_keys_are_ordinary_keys() -> None:
    for key in (0, "", b"", False, 0.0):
        assert 0 <= instance_for_key(key, 3) < 3
    assert key_bytes(0) != key_bytes(0.0) != key_bytes(False)


def test_none_key_is_a_clear_error() -> None:
    with pytest.raises(RoutingError, match="partition_key"):
        key_bytes(None)
    with pytest.raises(RoutingError, match="partition_key"):
        instance_for_key(None, 4)


@pytest.mark.parametrize("key", [object(), [1, 2], (1,), {"a": 1}, 1 + 2j, {1}])
def test_unsupported_key_type_names_type_and_remedy(key: object) -> None:
    with pytest.raises(KeyTypeError) as err:
        key_hash(key)
    assert isinstance(err.value, RoutingError)
    assert isinstance(err.value, TypeError)
    msg = str(err.value)
    assert type(key).__qualname__ in msg
    assert "str, bytes, int or float" in msg
    assert "precomputed key" in msg


def test_unencodable_str_is_a_routing_error() -> None:
    # mmh3 itself crashes the interpreter on lone surrogates, so this must never reach it.
    with pytest.raises(KeyTypeError, match="UTF-8"):
        instance_for_key("bad\ud800", 2)


def test_groups_and_instances_in_range_and_contiguous() -> None:
    keys = [f"k{i}" for i in range(2000)]
    for p in (1, 2, 5, 128):
        owners: dict[int, int] = {}
        for k in keys:
            g = key_group(k)
            inst = instance_for_key(k, p)
            assert 0 <= g < KEY_GROUP_DEFAULT and 0 <= inst < p
            assert owners.setdefault(g, inst) == inst
            assert instance_for_group(g, p) == inst
        # Key groups map to instances in contiguous, non-decreasing ranges.
        ordered = [owners[g] for g in sorted(owners)]
        assert ordered == sorted(ordered)
    assert len({key_group(k) for k in keys}) == KEY_GROUP_DEFAULT


def test_spread_is_roughly_even() -> None:
    counts = [0] * 4
    for i in range(8000):
        counts[instance_for_key(f"user-{i}", 4)] += 1
    assert min(counts) > 1600, counts


def test_custom_max_parallelism() -> None:
    assert key_group("abc", 7) == key_hash("abc") % 7
    assert instance_for_key("abc", 3, 7) == (key_hash("abc") % 7) * 3 // 7
    assert instance_for_key("abc", 1, 1) == 0


@pytest.mark.parametrize(
    ("parallelism", "max_parallelism", "match"),
    [
        (0, 128, "parallelism must be"),
        (-1, 128, "parallelism must be"),
        (129, 128, "raise max_parallelism"),
        (2.0, 128, "parallelism must be"),
        (True, 128, "parallelism must be"),
        (1, 0, "max_parallelism must be"),
        (1, 128.0, "max_parallelism must be"),
    ],
)
def test_bad_parallelism_is_a_clear_error(
    parallelism: Any, max_parallelism: Any, match: str
) -> None:
    with pytest.raises(RoutingError, match=match):
        instance_for_key("k", parallelism, max_parallelism)


def test_bad_group_and_max_parallelism() -> None:
    with pytest.raises(RoutingError, match="key group"):
        instance_for_group(128, 2)
    with pytest.raises(RoutingError, match="max_parallelism"):
        key_group("k", 0)


def test_stable_across_processes() -> None:
    # Python's own hash() is salted per process; ours must not be.
    code = (
        "from sage_zmq.router.keys import key_hash;"
        "print(key_hash('user-12345'), key_hash(-42), key_hash(2.5))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert [int(x) for x in out] == [key_hash("user-12345"), key_hash(-42), key_hash(2.5)]


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_router_keys.py --write")
    VECTORS.write_text(_dump(build_vectors()), encoding="utf-8")
    print(f"wrote {VECTORS}")
