"""QueueDescriptor as a value: validation of bad input, endpoints, conversions."""

from __future__ import annotations

import itertools
import json
import pickle
from typing import Any

import pytest

from sage_zmq import DescriptorError, QueueDescriptor, SageZmqError, _runtime, queue_types
from sage_zmq import testing as conf


def _sockets() -> int:
    ctx = _runtime._context
    return 0 if ctx is None else sum(1 for s in list(ctx._sockets) if not s.closed)


def _assert_descriptor_error(exc: pytest.ExceptionInfo[DescriptorError], *needles: str) -> None:
    assert isinstance(exc.value, SageZmqError) and isinstance(exc.value, ValueError)
    message = str(exc.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in the error: {message}"


# ----------------------------------------------------------------------------- queue_type
def test_unknown_queue_type_lists_known_types() -> None:
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor("q", "zeromq")
    _assert_descriptor_error(exc, "zeromq", *queue_types())


def test_misspelt_queue_type_suggests_the_right_one() -> None:
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor("q", "tpc")
    _assert_descriptor_error(exc, "'tcp'")


@pytest.mark.parametrize("bad", [5, None.__class__, b"local"])
def test_non_string_queue_type(bad: Any) -> None:
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor("q", bad)
    _assert_descriptor_error(exc, "queue_type")


@pytest.mark.parametrize("bad", ["", 5, "x" * 201, b"q"])
def test_bad_queue_id(bad: Any) -> None:
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor(bad, "local")
    _assert_descriptor_error(exc, "queue_id")


# ----------------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("maxsize", "10"),
        ("maxsize", 0),
        ("maxsize", -5),
        ("maxsize", True),
        ("maxsize", 1.5),
        ("upstreams", 0),
        ("upstreams", "3"),
        ("batch_size", None),
        ("timeout", 0),
        ("timeout", -1.0),
        ("timeout", "1"),
        ("timeout", False),
        ("flush_interval", "fast"),
        ("endpoint", 5555),
    ],
)
def test_wrong_typed_metadata(queue_type: str, key: str, value: Any) -> None:
    before = _sockets()
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor("q", queue_type, {key: value})
    _assert_descriptor_error(exc, key, repr(value))
    assert _sockets() == before, "a rejected descriptor left a socket open"


def test_wrong_typed_metadata_as_keyword_options() -> None:
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor("q", "local", maxsize="big")
    _assert_descriptor_error(exc, "maxsize")


@pytest.mark.parametrize("bad", ["maxsize=3", [("maxsize", 3)], 3])
def test_metadata_not_a_mapping(bad: Any) -> None:
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor("q", "local", bad)
    _assert_descriptor_error(exc, "metadata")


@pytest.mark.parametrize("queue_type", ["local", "shm", "tcp", "sage"])
def test_a_new_descriptor_carries_the_maxsize_every_end_must_agree_on(queue_type: str) -> None:
    from sage_zmq.config import current_config, reset_config, set_config

    default = current_config().communication.queue.max_size
    made = [QueueDescriptor(queue_type=queue_type)]
    qd = made[0]
    try:
        assert qd.metadata["maxsize"] == default
        assert json.loads(qd.to_json())["metadata"]["maxsize"] == default
        # A process with another config (here: this one, after a change) still agrees.
        set_config({"communication": {"queue": {"max_size": 7}}})
        assert QueueDescriptor.from_json(qd.to_json()).maxsize == default
        made.append(QueueDescriptor(queue_type=queue_type))
        assert made[-1].maxsize == 7
    finally:
        reset_config()
        conf.close_quietly(*made)


def test_keyword_options_land_in_metadata() -> None:
    qd = QueueDescriptor("q", "local", {"upstreams": 2}, maxsize=7)
    assert qd.metadata["maxsize"] == 7 and qd.maxsize == 7
    assert qd.settings().upstreams == 2


# ----------------------------------------------------------------------------- endpoints
@pytest.mark.parametrize(
    ("queue_type", "endpoint", "needle"),
    [
        ("tcp", "tcp://nohost", "nohost"),
        ("tcp", "tcp://127.0.0.1:70000", "70000"),
        ("tcp", "tcp://127.0.0.1", "127.0.0.1"),
        ("tcp", "http://x", "http://x"),
        ("tcp", "ipc:///tmp/q.sock", "shm"),
        ("tcp", "tcp://*:5555", "bind"),
        ("shm", "ipc://" + "x" * 200, "x" * 40),
        ("shm", "ipc://", "ipc://"),
        ("shm", "http://x", "http://x"),
        ("shm", "tcp://127.0.0.1:5555", "tcp"),
        ("local", "http://x", "http://x"),
        ("local", "tcp://127.0.0.1:5555", "tcp"),
        ("local", "ipc:///tmp/q.sock", "shm"),
    ],
)
def test_malformed_or_wrong_scheme_endpoint(queue_type: str, endpoint: str, needle: str) -> None:
    before = _sockets()
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor("q", queue_type, {"endpoint": endpoint})
    _assert_descriptor_error(exc, needle)
    assert _sockets() == before, "a rejected descriptor left a socket open"


def test_explicit_tcp_endpoint_is_kept_and_not_bound() -> None:
    before = _sockets()
    qd = QueueDescriptor("q", "tcp", {"endpoint": "tcp://127.0.0.1:5999"})
    assert qd.endpoint == "tcp://127.0.0.1:5999"
    assert _sockets() == before, "a descriptor with a full endpoint must bind lazily"
    qd.close()


def test_explicit_ipc_endpoint_is_kept(tmp_path: Any) -> None:
    endpoint = f"ipc://{tmp_path}/q.sock"
    qd = QueueDescriptor("q", "shm", {"endpoint": endpoint})
    assert qd.endpoint == endpoint
    qd.close()


def test_tcp_port_zero_binds_a_real_port() -> None:
    with conf.released(QueueDescriptor("q", "tcp", {"endpoint": "tcp://127.0.0.1:0"})) as qd:
        assert qd.endpoint is not None and not qd.endpoint.endswith(":0")


def test_local_descriptor_gets_an_inproc_endpoint() -> None:
    a, b = QueueDescriptor("same", "local"), QueueDescriptor("same", "local")
    assert str(a.endpoint).startswith("inproc://")
    assert a != b, "two queues created with one id must not collide"


def test_default_queue_type_comes_from_config() -> None:
    qd = QueueDescriptor("q")
    assert qd.queue_type == "local"
    assert QueueDescriptor().queue_id  # an id is made up when none is given


# ----------------------------------------------------------------------------- conversions
def test_round_trips_keep_everything(queue_type: str) -> None:
    meta = {"maxsize": 12, "upstreams": 2, "timeout": 1.5, "custom": {"x": [1, 2]}}
    with conf.released(QueueDescriptor("rt", queue_type, meta)) as qd:
        d = qd.to_dict()
        assert d["queue_id"] == "rt" and d["queue_type"] == queue_type
        assert {k: d["metadata"][k] for k in meta} == meta
        assert QueueDescriptor.from_dict(d) == qd
        assert QueueDescriptor.from_json(qd.to_json()) == qd
        assert json.loads(qd.to_json()) == d
        assert pickle.loads(pickle.dumps(qd)) == qd
        assert qd.with_options(maxsize=3).maxsize == 3 and qd.maxsize == 12
        assert "rt" in repr(qd)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ([1, 2], "mapping"),
        ({"queue_id": "q"}, "queue_type"),
        ({"queue_id": "q", "queue_type": "local", "extra": 1}, "extra"),
        ({"queue_id": "q", "queue_type": "nope"}, "nope"),
        ({"queue_id": "q", "queue_type": "local", "metadata": {"maxsize": "1"}}, "maxsize"),
    ],
)
def test_from_dict_rejects_bad_documents(data: Any, needle: str) -> None:
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor.from_dict(data)
    _assert_descriptor_error(exc, needle)


@pytest.mark.parametrize(
    ("queue_type", "endpoint"),
    [("tcp", "tcp://x"), ("tcp", "http://x"), ("shm", "tcp://127.0.0.1:1"), ("local", "http://x")],
)
def test_from_dict_checks_the_endpoint(queue_type: str, endpoint: str) -> None:
    data = {"queue_id": "q", "queue_type": queue_type, "metadata": {"endpoint": endpoint}}
    with pytest.raises(DescriptorError) as exc:
        QueueDescriptor.from_dict(data)
    _assert_descriptor_error(exc, endpoint)


@pytest.mark.parametrize("text", ["", "{", "[1]", "null"])
def test_from_json_rejects_bad_documents(text: str) -> None:
    with pytest.raises(DescriptorError):
        QueueDescriptor.from_json(text)


def test_to_json_of_unserialisable_metadata_is_a_descriptor_error() -> None:
    qd = QueueDescriptor("q", "local", {"thing": object()})
    with pytest.raises(DescriptorError) as exc:
        qd.to_json()
    _assert_descriptor_error(exc, "JSON")


def test_metadata_changed_after_creation_is_checked_at_first_use() -> None:
    # metadata is a plain dict: a bad value put there later is refused when the queue opens,
    # not turned into a queue with "room for -5 records".
    qd = QueueDescriptor(queue_type="local")
    qd.metadata["maxsize"] = -5
    with pytest.raises(DescriptorError, match=r"metadata\['maxsize'\] must be an integer >= 1"):
        qd.put(1)
    qd.metadata["maxsize"] = 5
    qd.put(1)
    assert qd.get(timeout=5) == 1
    qd.close()


def test_two_queues_cannot_share_an_endpoint_in_one_process() -> None:
    # The second name used to share the first queue's ends: records went to the wrong queue.
    first = QueueDescriptor("first", "tcp")  # binds its endpoint now
    stray = QueueDescriptor("second", "tcp", {"endpoint": first.endpoint})
    try:
        with pytest.raises(DescriptorError, match=r"which queue 'first' already uses"):
            stray.put(1)
        first.put(2)
        assert first.get(timeout=5) == 2  # the first queue is untouched
        with pytest.raises(DescriptorError, match=r"which queue 'first' already uses"):
            stray.get(timeout=1)
    finally:
        stray.close()
        first.close()


def test_a_bad_close_timeout_is_refused_before_anything_closes() -> None:
    from sage_zmq import InvalidArgument

    qd = QueueDescriptor(queue_type="tcp")
    qd.put(1)
    for bad in ("x", -1, float("nan")):
        with pytest.raises(InvalidArgument, match=r"close\(timeout=\.\.\.\)"):
            qd.close(timeout=bad)
    assert qd.get(timeout=5) == 1  # nothing was closed, nothing lost
    qd.close()


def test_from_json_given_a_dict_points_to_from_dict() -> None:
    with pytest.raises(DescriptorError, match=r"for a dict use QueueDescriptor\.from_dict"):
        QueueDescriptor.from_json({"queue_id": "x"})  # type: ignore[arg-type]


@pytest.mark.parametrize("queue_type", ["local", "shm", "tcp"])
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"shape": 4, "timeout": "x"}, r"alloc\(timeout=\.\.\.\) must be a number"),
        ({"shape": 4, "timeout": -1}, r"alloc\(timeout=\.\.\.\) must be a number"),
        ({"shape": 4, "timeout": float("nan")}, r"alloc\(timeout=\.\.\.\) must be a number"),
        ({"shape": (2.5,)}, r"alloc\(shape=\.\.\.\) must be an int or a sequence of ints"),
        ({"shape": "abc"}, r"alloc\(shape=\.\.\.\) must be an int or a sequence of ints"),
        ({"shape": (3, -1)}, r"must not have negative dimensions"),
        ({"shape": 4, "dtype": "zz"}, r"alloc\(dtype=\.\.\.\) is not a numpy dtype"),
        ({"shape": 4, "dtype": object}, r"holds Python objects"),
    ],
)
def test_alloc_refuses_bad_arguments_alike_on_every_type(
    queue_type: str, kwargs: dict[str, Any], needle: str
) -> None:
    from sage_zmq import InvalidArgument

    # Before, a bad timeout was ignored, a float dimension truncated and an object dtype
    # allowed wherever the pool did not serve the buffer.
    qd = QueueDescriptor(queue_type=queue_type)
    try:
        with pytest.raises(InvalidArgument, match=needle):
            qd.alloc(**kwargs)
        buf = qd.alloc((2, 3), "f4", timeout=float("inf"))
        assert buf.shape == (2, 3) and buf.dtype == "f4"
    finally:
        qd.close()


@pytest.mark.parametrize("queue_type", ["shm", "tcp"])
def test_alloc_folds_a_subarray_dtype_and_refuses_impossible_sizes(queue_type: str) -> None:
    from sage_zmq import InvalidArgument

    qd = QueueDescriptor(queue_type=queue_type)
    try:
        buf = qd.alloc(4, ("f8", (3,)))  # as numpy.empty does: the item shape is appended
        assert buf.shape == (4, 3) and buf.dtype == "f8"
        with pytest.raises(InvalidArgument, match="more bytes than this process can address"):
            qd.alloc((10**10, 10**10))
    finally:
        qd.close()


def test_alloc_layout_fast_path_answers_as_the_general_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A shape that is an int or a tuple of ints skips the numbers-ABC checks; whatever the
    # shape and dtype, the result (or the error, type and message) is what the general path
    # gives.
    import enum

    import numpy as np

    from sage_zmq.wire import dtypes as dtypes_module
    from sage_zmq.wire.dtypes import alloc_layout

    def general(shape: Any, dtype: Any) -> tuple[tuple[int, ...], Any]:
        with monkeypatch.context() as patch:
            patch.setattr(dtypes_module, "_plain_shape", lambda shape: None)
            return alloc_layout(shape, dtype)

    class Dim(enum.IntEnum):
        THREE = 3

    class Shape(tuple):  # type: ignore[type-arg]  # a tuple subclass, as torch.Size is
        pass

    shapes: list[Any] = [
        4, 0, -1, (), (0,), (2, 3), (3, -1), [2, 3], range(3), Shape((2, 3)),
        np.int32(5), (np.int64(2), 3), tuple(np.arange(1, 3)), Dim.THREE, (Dim.THREE, 2),
        True, (True, 2), (2, False), 2.5, (2.0,), "abc", None, (2, None),
        (10**10, 10**10), (2**70,), 2**70, (-(2**70),),
    ]  # fmt: skip
    dtypes: list[Any] = [
        np.uint8, "u1", "f4", float, None, np.dtype("f8"), np.dtype(">i4"), "M8[ns]",
        ("f8", (3,)), "(2,3)i4", np.dtype(("u1", (2, 2))),
        np.dtype([("a", "u1"), ("b", "f8")], align=True),
        np.dtype("f8", metadata={"unit": "m"}), object, "O", [("a", "O")], "zz", 3.5,
    ]  # fmt: skip
    for shape, dtype in itertools.product(shapes, dtypes):
        try:
            want: Any = general(shape, dtype)
        except Exception as exc:
            with pytest.raises(type(exc)) as got_exc:
                alloc_layout(shape, dtype)
            assert str(got_exc.value) == str(exc), (shape, dtype)
            continue
        layout, dt = alloc_layout(shape, dtype)
        assert layout == want[0] and all(type(d) is int for d in layout), (shape, dtype)
        assert type(layout) is tuple, (shape, dtype)
        assert dt == want[1] and dt.metadata == want[1].metadata, (shape, dtype)
        assert (dt is dtype) == (want[1] is dtype), (shape, dtype)  # a dtype given is kept


@pytest.mark.parametrize("queue_type", ["local", "shm", "tcp"])
def test_alloc_binds_the_descriptor_once(queue_type: str) -> None:
    # Each alloc used to bind qd.put anew (a bound method is a new object on every read),
    # keeping one more weak reference per call for the life of the queue.
    qd = QueueDescriptor(queue_type=queue_type)
    try:
        for _ in range(5):
            qd.alloc(1 << 16)
        assert len(qd._handle()._bound) == 1
    finally:
        qd.close()
