"""The Python codec against the golden frames in ``transports/vectors/frames.json``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sage_zmq.errors import DecodeError
from sage_zmq.wire.codec import Codec
from sage_zmq.wire.frame import Kind

VECTORS = Path(__file__).resolve().parent.parent / "transports" / "vectors"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mv = _load_generator()
DATA = json.loads((VECTORS / "frames.json").read_text(encoding="utf-8"))
VALID = DATA["valid"]
INVALID = DATA["invalid"]


def _expected_fields(vector: dict[str, Any]) -> dict[str, Any]:
    """The typed body minus the keys a receiver ignores."""
    body = vector["body"]
    ignored = vector.get("ignored_keys")
    if not ignored:
        return body
    return {"map": [kv for kv in body["map"] if mv.from_typed(kv[0]) not in ignored]}


def test_vector_file_is_current() -> None:
    # LZ4 output may change with the lz4 library, so non-canonical frames are compared by body.
    def strip(doc: dict[str, Any]) -> dict[str, Any]:
        out = json.loads(json.dumps(doc))
        for v in out["valid"]:
            if not v["canonical"]:
                v.pop("hex")
        return out

    assert strip(mv.build()) == strip(DATA), "run transports/vectors/make_vectors.py"


def test_vectors_cover_every_kind_and_extension() -> None:
    kinds = {v["kind"] for v in VALID}
    assert kinds == {int(k) for k in Kind}
    text = json.dumps(VALID)
    for tag in ('"packet"', '"ndarray"', '"eos"', '"bin"', '"float"', '"map"'):
        assert tag in text
    assert len(INVALID) >= 30


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_decode_gives_meaning(vector: dict[str, Any]) -> None:
    msg = Codec().decode(bytes.fromhex(vector["hex"]))
    assert int(msg.kind) == vector["kind"]
    fields = msg.fields if isinstance(msg.fields, dict) else list(msg.fields)
    assert mv.to_typed(fields) == _expected_fields(vector)


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_encode_gives_bytes(vector: dict[str, Any]) -> None:
    codec = Codec()
    kind = Kind(vector["kind"])
    body = mv.from_typed(vector["body"])
    if kind is Kind.DATA:
        frame, sent, errors = codec.encode_batch(
            body[0], body[1], body[2], compress=bool(vector["flags"] & 1)
        )
        assert not errors and len(sent) == len(body[2])
    else:
        frame = codec.encode_control(kind, body)
    assert frame[4] == vector["flags"]
    if vector["canonical"]:
        assert frame.hex() == vector["hex"]
    else:
        again = codec.decode(frame).fields
        assert mv.to_typed(list(again)) == vector["body"]


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_frames_are_rejected(vector: dict[str, str]) -> None:
    with pytest.raises(DecodeError):
        Codec().decode(bytes.fromhex(vector["hex"]))


def test_typed_tree_round_trip_keeps_types() -> None:
    value = [1, 1.0, True, "1", b"1", None, {"1": 1, 1: "1"}, -(2**63), 2**64 - 1]
    typed = mv.to_typed(value)
    assert mv.to_typed(mv.from_typed(typed)) == typed
    assert typed["array"][0] == {"int": 1} and typed["array"][1] == {"float": 1.0}
    assert typed["array"][-1] == {"int": str(2**64 - 1)}
    with pytest.raises(ValueError, match="unknown typed tag"):
        mv.from_typed({"decimal": "1.0"})
