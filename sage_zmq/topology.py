"""Pipelines of operators described in YAML, run as one process per operator instance.

A topology is a list of operators. Each one is a ``source``, ``map``, ``keyed`` worker or
``sink``; it runs ``parallelism`` instances, each in its own (spawned) process with its own input
queue; its ``inputs`` name earlier operators. Every upstream instance sends through one router
per downstream operator (``strategy``: ``round_robin`` by default, ``hash`` on ``key`` for keyed
workers), and a downstream instance ends when every upstream instance has ended.

Functions are built-ins (``range``/``words`` sources, ``identity``/``upper`` maps,
``count_by_key``, ``print``/``collect``/``discard`` sinks) or ``module:function``:

* source: ``fn(ctx) -> Iterable[record]`` (``ctx.index``, ``ctx.parallelism``, ``ctx.args``);
* map: ``fn(record) -> record`` (``None`` drops the record);
* keyed: ``fn(state, record) -> record | None`` with ``state`` a dict kept per key; an
  optional ``fn.on_end(states) -> Iterable[record]`` runs at end of stream;
* sink: ``fn(record) -> None``.

Start-up is a handshake, not a guess: each instance opens its input queue and reports the
descriptor; only when all have done so does the runner hand every instance its downstream
descriptors and let records flow.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sage_zmq.errors import ConfigError, SageZmqError

__all__ = [
    "KINDS",
    "InstanceResult",
    "OperatorContext",
    "OperatorSpec",
    "RunResult",
    "Topology",
    "TopologyError",
    "builtin_functions",
    "load_topology",
    "run_topology",
]

KINDS = ("source", "map", "keyed", "sink")
STRATEGIES = ("round_robin", "hash", "broadcast", "load_balance")
CROSS_PROCESS_TYPES = ("shm", "tcp", "sage")


class TopologyError(SageZmqError, ValueError):
    """A topology description is wrong, or one of its instances failed."""


# ------------------------------------------------------------------------------- model
_OP_KEYS = (
    "name",
    "kind",
    "function",
    "parallelism",
    "inputs",
    "strategy",
    "key",
    "args",
    "queue_type",
    "queue_size",
)
_TOP_KEYS = (
    "name",
    "operators",
    "queue_type",
    "queue_size",
    "trace_log",
    "stats",
    "report_interval",
    "config",
)


def _unknown(keys: Iterable[str], known: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(known)}"
            raise TopologyError(f"{where}: unknown key {key!r}{extra}")


@dataclass(frozen=True)
class OperatorSpec:
    """One operator of a topology (see the module docstring)."""

    name: str
    kind: str
    function: str
    parallelism: int = 1
    inputs: tuple[str, ...] = ()
    strategy: str | None = None
    key: str | None = None
    args: Mapping[str, Any] = field(default_factory=dict)
    queue_type: str | None = None
    queue_size: int | None = None

    @classmethod
    def from_dict(cls, data: Any, position: int) -> OperatorSpec:
        where = f"operators[{position}]"
        if not isinstance(data, Mapping):
            raise TopologyError(f"{where}: expected a mapping with name, kind, function")
        _unknown(data, _OP_KEYS, where)
        for required in ("name", "kind", "function"):
            if not isinstance(data.get(required), str) or not data[required]:
                raise TopologyError(f"{where}: {required!r} must be a non-empty string")
        where = f"operator {data['name']!r}"
        kind = data["kind"]
        if kind not in KINDS:
            hint = difflib.get_close_matches(kind, KINDS, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise TopologyError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}{extra}")
        par = data.get("parallelism", 1)
        if isinstance(par, bool) or not isinstance(par, int) or par < 1:
            raise TopologyError(f"{where}: parallelism must be an integer >= 1, got {par!r}")
        inputs = data.get("inputs", ())
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list | tuple) or not all(isinstance(i, str) for i in inputs):
            raise TopologyError(f"{where}: inputs must be a list of operator names")
        strategy = data.get("strategy")
        if strategy is not None and strategy not in STRATEGIES:
            hint = difflib.get_close_matches(str(strategy), STRATEGIES, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            raise TopologyError(
                f"{where}: strategy {strategy!r} is not one of {', '.join(STRATEGIES)}{extra}"
            )
        key = data.get("key")
        if key is not None and not isinstance(key, str):
            raise TopologyError(f"{where}: key must be the name of a record field, got {key!r}")
        args = data.get("args") or {}
        if not isinstance(args, Mapping):
            raise TopologyError(f"{where}: args must be a mapping, got {args!r}")
        qtype = data.get("queue_type")
        if qtype is not None:
            _check_queue_type(qtype, where)
        qsize = data.get("queue_size")
        bad_size = isinstance(qsize, bool) or not isinstance(qsize, int) or qsize < 1
        if qsize is not None and bad_size:
            raise TopologyError(f"{where}: queue_size must be an integer >= 1, got {qsize!r}")
        return cls(
            name=data["name"],
            kind=kind,
            function=data["function"],
            parallelism=par,
            inputs=tuple(inputs),
            strategy=strategy,
            key=key,
            args=dict(args),
            queue_type=qtype,
            queue_size=qsize,
        )

    @property
    def routing(self) -> str:
        """How upstream instances pick this operator's instance for a record."""
        return self.strategy or ("hash" if self.kind == "keyed" else "round_robin")


def _check_queue_type(qtype: Any, where: str) -> None:
    if qtype not in CROSS_PROCESS_TYPES:
        extra = (
            " (local queues cannot connect processes, and every instance is a process)"
            if qtype == "local"
            else ""
        )
        raise TopologyError(
            f"{where}: queue_type {qtype!r} cannot be used here{extra}; use one of "
            f"{', '.join(CROSS_PROCESS_TYPES)}"
        )


@dataclass(frozen=True)
class Topology:
    """A validated pipeline description; build it with :func:`load_topology`."""

    name: str
    operators: tuple[OperatorSpec, ...]
    queue_type: str = "shm"
    queue_size: int = 1000
    trace_log: str | None = None
    stats: str | None = "tcp://127.0.0.1:0"
    report_interval: float = 0.5
    config: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any) -> Topology:
        if not isinstance(data, Mapping):
            raise TopologyError("a topology must be a mapping with 'name' and 'operators'")
        _unknown(data, _TOP_KEYS, "topology")
        name = data.get("name", "topology")
        if not isinstance(name, str) or not name:
            raise TopologyError(f"topology name must be a non-empty string, got {name!r}")
        raw_ops = data.get("operators")
        if not isinstance(raw_ops, list) or not raw_ops:
            raise TopologyError("topology 'operators' must be a non-empty list")
        ops = tuple(OperatorSpec.from_dict(d, i) for i, d in enumerate(raw_ops))
        qtype = data.get("queue_type", "shm")
        _check_queue_type(qtype, "topology")
        qsize = data.get("queue_size", 1000)
        if isinstance(qsize, bool) or not isinstance(qsize, int) or qsize < 1:
            raise TopologyError(f"topology queue_size must be an integer >= 1, got {qsize!r}")
        interval = data.get("report_interval", 0.5)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise TopologyError(f"report_interval must be a number > 0, got {interval!r}")
        stats = data.get("stats", "tcp://127.0.0.1:0")
        if stats is not None:
            from sage_zmq.observe.stats_server import StatsError, check_endpoint

            try:
                check_endpoint(stats)
            except StatsError as exc:
                raise TopologyError(f"topology stats: {exc}") from None
        config = data.get("config")
        if config is not None:
            from sage_zmq.config import load_config

            try:
                load_config(config)
            except ConfigError as exc:
                raise TopologyError(f"topology config: {exc}") from None
        trace_log = data.get("trace_log")
        if trace_log is not None and not isinstance(trace_log, str):
            raise TopologyError(f"trace_log must be a file path, got {trace_log!r}")
        topo = cls(name, ops, qtype, qsize, trace_log, stats, float(interval), config)
        topo._check_graph()
        return topo

    def _check_graph(self) -> None:
        seen: dict[str, OperatorSpec] = {}
        for op in self.operators:
            if op.name in seen:
                raise TopologyError(f"two operators are named {op.name!r}; names must be unique")
            if op.kind == "source" and op.inputs:
                raise TopologyError(f"operator {op.name!r}: a source has no inputs")
            if op.kind != "source" and not op.inputs:
                raise TopologyError(f"operator {op.name!r}: a {op.kind} needs 'inputs'")
            for name in op.inputs:
                if name not in seen:
                    known = [n for n in seen] or ["(none)"]
                    later = any(o.name == name for o in self.operators)
                    why = "it must be declared before" if later else "no such operator"
                    raise TopologyError(
                        f"operator {op.name!r}: input {name!r}: {why}; earlier operators: "
                        f"{', '.join(known)}"
                    )
                if seen[name].kind == "sink":
                    raise TopologyError(f"operator {op.name!r}: input {name!r} is a sink")
            resolve_function(op)  # fail here, in the parent, not in a child process
            seen[op.name] = op

    def operator(self, name: str) -> OperatorSpec:
        for op in self.operators:
            if op.name == name:
                return op
        raise TopologyError(f"no operator named {name!r}")

    def downstream(self, name: str) -> list[OperatorSpec]:
        return [op for op in self.operators if name in op.inputs]

    def upstream_instances(self, op: OperatorSpec) -> int:
        return sum(self.operator(n).parallelism for n in op.inputs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["operators"] = [
            {**asdict(o), "inputs": list(o.inputs), "args": dict(o.args)} for o in self.operators
        ]
        return data


def load_topology(source: str | os.PathLike[str] | Mapping[str, Any]) -> Topology:
    """A :class:`Topology` from a YAML file or a mapping; :class:`TopologyError` if invalid."""
    if isinstance(source, Mapping):
        return Topology.from_dict(source)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"cannot read topology file {str(path)!r}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(f"topology file {str(path)!r} is not valid YAML: {exc}") from None
    try:
        return Topology.from_dict(data)
    except TopologyError as exc:
        raise TopologyError(f"topology file {str(path)!r}: {exc}") from None


# --------------------------------------------------------------------------- functions
@dataclass(frozen=True)
class OperatorContext:
    """What an operator instance knows about itself."""

    name: str
    index: int
    parallelism: int
    args: Mapping[str, Any]
    output_dir: str | None = None


class _Operator:
    """An instance's behaviour: records in, records out."""

    def source(self) -> Iterable[Any]:
        return ()

    def process(self, record: Any) -> Iterable[Any]:
        return ()

    def end(self) -> Iterable[Any]:
        return ()

    def close(self) -> None:
        """Release what the operator holds (files)."""


def _record_key(record: Any, field_name: str | None, where: str) -> Any:
    if field_name is None:
        key = record
    elif isinstance(record, Mapping) and field_name in record:
        key = record[field_name]
    else:
        raise TopologyError(f"{where}: record {record!r} has no field {field_name!r} to key by")
    if key is not None and not isinstance(key, str | bytes | int | float | bool):
        raise TopologyError(
            f"{where}: key {key!r} of type {type(key).__name__} cannot be hashed for routing; "
            "keys must be str, bytes, int, float or bool (set 'key' to a field holding one)"
        )
    return key


class _RangeSource(_Operator):
    def __init__(self, ctx: OperatorContext) -> None:
        self.start = int(ctx.args.get("start", 0))
        self.count = int(ctx.args.get("count", 1000))
        self.ctx = ctx

    def source(self) -> Iterable[Any]:
        # Instances interleave, so together they produce start .. start+count-1 once.
        return range(self.start + self.ctx.index, self.start + self.count, self.ctx.parallelism)


_WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


class _WordsSource(_Operator):
    def __init__(self, ctx: OperatorContext) -> None:
        self.count = int(ctx.args.get("count", 1000))
        self.vocab = tuple(ctx.args.get("vocabulary", _WORDS))
        self.ctx = ctx

    def source(self) -> Iterable[Any]:
        n = len(self.vocab)
        return (self.vocab[i % n] for i in range(self.ctx.index, self.count, self.ctx.parallelism))


class _MapOp(_Operator):
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def process(self, record: Any) -> Iterable[Any]:
        out = self.fn(record)
        return () if out is None else (out,)


def _upper(record: Any) -> Any:
    return record.upper() if isinstance(record, str) else str(record).upper()


def _identity(record: Any) -> Any:
    return record


class _KeyedOp(_Operator):
    def __init__(self, fn: Any, key_field: str | None, where: str) -> None:
        self.fn = fn
        self.key_field = key_field
        self.where = where
        self.states: dict[Any, dict[str, Any]] = {}

    def process(self, record: Any) -> Iterable[Any]:
        key = _record_key(record, self.key_field, self.where)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = {}
        out = self.fn(state, record)
        return () if out is None else (out,)

    def end(self) -> Iterable[Any]:
        on_end = getattr(self.fn, "on_end", None)
        return on_end(self.states) if on_end is not None else ()


def count_by_key(state: dict[str, Any], record: Any) -> None:
    """Count records per key; the counts are emitted at end of stream (``on_end``)."""
    state["count"] = state.get("count", 0) + 1


def _count_on_end(states: dict[Any, dict[str, Any]]) -> Iterator[Any]:
    for key, state in states.items():
        yield {"key": key, "count": state["count"]}


count_by_key.on_end = _count_on_end  # type: ignore[attr-defined]


class _SinkOp(_Operator):
    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def process(self, record: Any) -> Iterable[Any]:
        self.fn(record)
        return ()


class _PrintSink(_Operator):
    def __init__(self, ctx: OperatorContext) -> None:
        self.prefix = f"{ctx.name}[{ctx.index}]"

    def process(self, record: Any) -> Iterable[Any]:
        print(f"{self.prefix}: {record!r}", flush=True)
        return ()


class _CollectSink(_Operator):
    """Writes records as JSON lines; the runner returns them in ``RunResult.collected``."""

    def __init__(self, ctx: OperatorContext) -> None:
        if ctx.output_dir is None:
            raise TopologyError(f"operator {ctx.name!r}: 'collect' needs the runner's output dir")
        path = os.path.join(ctx.output_dir, f"{ctx.name}.{ctx.index}.jsonl")
        self.fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def process(self, record: Any) -> Iterable[Any]:
        self.fh.write(json.dumps(record, default=repr) + "\n")
        return ()

    def close(self) -> None:
        self.fh.close()


_BUILTINS: dict[str, dict[str, Callable[[OperatorContext, OperatorSpec], _Operator]]] = {
    "source": {
        "range": lambda ctx, spec: _RangeSource(ctx),
        "words": lambda ctx, spec: _WordsSource(ctx),
    },
    "map": {
        "identity": lambda ctx, spec: _MapOp(_identity),
        "upper": lambda ctx, spec: _MapOp(_upper),
    },
    "keyed": {
        "count_by_key": lambda ctx, spec: _KeyedOp(count_by_key, spec.key, spec.name),
    },
    "sink": {
        "print": lambda ctx, spec: _PrintSink(ctx),
        "collect": lambda ctx, spec: _CollectSink(ctx),
        "discard": lambda ctx, spec: _SinkOp(lambda record: None),
    },
}


def builtin_functions() -> dict[str, list[str]]:
    """Built-in function names per operator kind."""
    return {kind: sorted(names) for kind, names in _BUILTINS.items()}


def resolve_function(spec: OperatorSpec) -> Callable[[OperatorContext], _Operator]:
    """A factory of ``spec``'s operator instances; a clear error if the function is unknown."""
    name = spec.function
    builtins = _BUILTINS[spec.kind]
    if name in builtins:
        make = builtins[name]
        return lambda ctx: make(ctx, spec)
    if ":" not in name:
        hint = difflib.get_close_matches(name, list(builtins), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise TopologyError(
            f"operator {spec.name!r}: unknown {spec.kind} function {name!r}{extra}; built-ins: "
            f"{', '.join(sorted(builtins))}, or give module:function"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TopologyError(
            f"operator {spec.name!r}: cannot import module {module_name!r} for {name!r}: {exc} "
            "(is it on PYTHONPATH?)"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TopologyError(f"operator {spec.name!r}: {module_name} has no function {attr!r}")
    if spec.kind == "source":
        return lambda ctx: _UserSource(fn, ctx)
    if spec.kind == "map":
        return lambda ctx: _MapOp(fn)
    if spec.kind == "keyed":
        return lambda ctx: _KeyedOp(fn, spec.key, spec.name)
    return lambda ctx: _SinkOp(fn)


class _UserSource(_Operator):
    def __init__(
        self, fn: Callable[[OperatorContext], Iterable[Any]], ctx: OperatorContext
    ) -> None:
        self.fn = fn
        self.ctx = ctx

    def source(self) -> Iterable[Any]:
        return self.fn(self.ctx)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class InstanceResult:
    """What one operator instance did."""

    operator: str
    index: int
    pid: int
    input_queue: str | None
    received: int
    emitted: int
    elapsed: float


@dataclass(frozen=True)
class RunResult:
    """The outcome of :func:`run_topology`."""

    topology: str
    elapsed: float
    instances: tuple[InstanceResult, ...]
    collected: dict[str, list[Any]]
    stats_endpoint: str | None
    final_snapshot: list[dict[str, Any]]

    def by_operator(self, name: str) -> list[InstanceResult]:
        return sorted((i for i in self.instances if i.operator == name), key=lambda i: i.index)


# ----------------------------------------------------------------------------- workers
_GET_POLL = 0.25
"""Longest an instance waits in one ``get``: how soon it notices a stop request while idle."""
_RUNNER_POLL = 0.5
"""How often an instance checks that its runner is still there."""
_ORPHAN_GRACE = 5.0
"""How long an instance whose runner died may take to stop before it exits hard."""
_NOTHING = object()  # get() timed out (a record may be None)


class _StopRequest:
    """A stop asked of an instance: SIGTERM / SIGINT from the runner, or the runner's death.

    The first signal raises ``SystemExit`` at once, to interrupt whatever the instance waits in
    (a put waiting for credit, a user function), except while the instance reads its input
    queue (``in_read``, :meth:`reading`): an exception between the frames of one ZeroMQ
    message (the queue reads a routing id, then the frame, in two calls) leaves the
    rest of that message in the socket, and the queue's close then reads it out of step
    ("rejected a frame from peer 535a0103...: expected one frame per message"). There only the
    flag is set; the input loop checks it after each ``get``, which returns at least every
    ``_GET_POLL`` seconds. Later signals are ignored: they must not cut the clean-up short.
    """

    def __init__(self) -> None:
        self.requested = False
        self.code = 0
        self.in_read = False  # set by the input loop itself: a context manager per record costs

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.requested:
            return
        self.requested = True
        self.code = 128 + signum
        if not self.in_read:
            raise SystemExit(self.code)

    def check(self) -> None:
        if self.requested:
            raise SystemExit(self.code)

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        before, self.in_read = self.in_read, True
        try:
            yield
        finally:
            self.in_read = before


def _instance_main(conn: Any, plan: dict[str, Any]) -> None:
    """Entry point of one operator instance (a spawned process)."""
    import signal

    stop = _StopRequest()
    # SIGINT too: Ctrl-C reaches every process of the terminal's group, and a KeyboardInterrupt
    # could land inside a queue read just like SIGTERM. The runner decides; we unwind.
    signal.signal(signal.SIGTERM, stop.on_signal)
    signal.signal(signal.SIGINT, stop.on_signal)
    own_files: list[dict[str, Any]] = []
    if plan.get("runner_pid"):
        _watch_runner(int(plan["runner_pid"]), own_files)
    try:
        summary = _run_instance(conn, plan, stop, own_files)
    except (_Aborted, SystemExit):
        if stop.requested:
            sys.exit(stop.code)  # stopped: 128 + the signal, as if the signal had ended us
        return
    except BaseException as exc:  # report everything to the runner, then fail
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        sys.exit(1)
    conn.send(("done", summary))


def _watch_runner(runner_pid: int, own_files: list[dict[str, Any]]) -> None:
    """Stop this instance when its runner is gone, even killed by SIGKILL.

    Nobody else would: the runner's clean-up died with it, and an orphan would keep running
    (busy, if it is a source) with its socket files. The parent pid changes when the runner
    dies (the orphan is re-parented), which a thread can watch on every platform.
    """
    import signal
    import threading

    def watch() -> None:
        while os.getppid() == runner_pid:
            time.sleep(_RUNNER_POLL)
        os.kill(os.getpid(), signal.SIGTERM)  # the main thread unwinds as when stopped
        time.sleep(_ORPHAN_GRACE)
        # Still here (stuck in a wait nobody will end): go, without the graceful closes.
        _remove_socket_files({"own": own_files})
        os._exit(1)

    threading.Thread(target=watch, name="sage-zmq-runner-watch", daemon=True).start()


class _Aborted(Exception):
    pass


def _run_instance(
    conn: Any, plan: dict[str, Any], stop: _StopRequest, own_files: list[dict[str, Any]]
) -> dict[str, Any]:
    from sage_zmq import observe
    from sage_zmq.config import load_config, set_config
    from sage_zmq.descriptor import QueueDescriptor
    from sage_zmq.errors import Empty
    from sage_zmq.observe import tracing
    from sage_zmq.observe.stats_server import Reporter
    from sage_zmq.packet import EndOfStream

    cfg = load_config(plan["config"])
    # The runner serves metrics for the whole topology; instances must not fight for the port.
    cfg = cfg.replace(**{"observability.metrics_port": None})
    set_config(cfg)
    observe.activate(cfg, force=True)
    topo = Topology.from_dict(plan["topology"])
    spec = topo.operator(plan["operator"])
    index = plan["index"]
    where = f"{spec.name}[{index}]"
    ctx = OperatorContext(spec.name, index, spec.parallelism, spec.args, plan["output_dir"])
    op = resolve_function(spec)(ctx)
    if topo.trace_log:
        tracing.set_trace_log(topo.trace_log)
    reporter = None
    if plan["stats"]:
        meta = {"operator": spec.name, "instance": index, "topology": topo.name}
        reporter = Reporter(plan["stats"], topo.report_interval, meta)
    qd_in = None
    outputs: list[_Output] = []
    completed = False
    try:
        if spec.kind != "source":
            qd_in = QueueDescriptor(
                f"{topo.name}.{spec.name}.{index}",
                spec.queue_type or topo.queue_type,
                {
                    "maxsize": spec.queue_size or topo.queue_size,
                    "upstreams": topo.upstream_instances(spec),
                },
            )
            with stop.reading():
                qd_in.qsize()  # opens the consumer end now: producers find it bound
            own_files.append(qd_in.to_dict())
        conn.send(("ready", qd_in.to_dict() if qd_in is not None else None, os.getpid()))
        msg = conn.recv()
        if msg[0] != "go":
            raise _Aborted()
        outputs = [_Output(o, where) for o in msg[1]]
        received = emitted = 0
        start = time.perf_counter()
        if spec.kind == "source":
            for record in op.source():
                emitted += _emit(outputs, record, None, True)
        else:
            assert qd_in is not None
            finish = spec.kind == "sink"
            get = qd_in.get
            while True:
                # get() with a timeout, not iteration: the loop must come back to see a stop
                # request that arrived while it read (see _StopRequest).
                stop.in_read = True
                try:
                    packet = get(True, _GET_POLL)
                except Empty:
                    packet = _NOTHING
                finally:
                    stop.in_read = False
                if stop.requested:
                    stop.check()
                if packet is _NOTHING:
                    continue
                if isinstance(packet, EndOfStream):
                    break  # every upstream instance has ended
                received += 1
                record = packet.payload if packet.__class__.__name__ == "Packet" else packet
                sent = 0
                for out in op.process(record):
                    sent += _emit(outputs, out, packet, False)
                emitted += sent
                if finish or not sent:
                    # The record's path ends here: at a sink, or absorbed (a keyed aggregation
                    # that emits only at end of stream, a map that drops it). Its trace is
                    # finished here, or a sampled record would vanish from `sage-zmq trace`.
                    tracing.finish(packet, where)
            for out in op.end():
                emitted += _emit(outputs, out, None, False)
        for o in outputs:
            o.end()
            o.flush()
        if reporter is not None:
            reporter.close()  # the final report, while the queue ends still exist
        completed = True
    finally:
        _release(op, outputs, qd_in, reporter, stop, graceful=completed)
    return asdict(
        InstanceResult(
            spec.name,
            index,
            os.getpid(),
            qd_in.queue_id if qd_in is not None else None,
            received,
            emitted,
            time.perf_counter() - start,
        )
    )


def _release(
    op: _Operator,
    outputs: list[_Output],
    qd_in: Any,
    reporter: Any,
    stop: _StopRequest,
    graceful: bool,
) -> None:
    """Close what an instance holds; without waiting for delivery unless it completed.

    Failed or stopped, the run is over: waiting (up to ``queue.timeout`` per queue) for
    downstream instances that are stopping too would only delay the error report, or the exit
    past the runner's patience. A stop that arrives during a graceful close ends it the same
    way.
    """
    try:
        _close_all(op, outputs, qd_in, reporter, stop, graceful and not stop.requested)
    except SystemExit:
        _close_all(op, outputs, qd_in, reporter, stop, graceful=False)
        raise


def _close_all(
    op: _Operator,
    outputs: list[_Output],
    qd_in: Any,
    reporter: Any,
    stop: _StopRequest,
    graceful: bool,
) -> None:
    wait = None if graceful else 0.0
    op.close()
    for o in outputs:
        o.close(wait)
    if qd_in is not None:
        with stop.reading():  # its close reads what arrived last: no interruption there
            qd_in.close(wait)
    if reporter is not None:
        reporter.close(final=graceful)


class _Output:
    """One downstream operator as an instance sees it: a router over its instances' queues."""

    def __init__(self, plan: dict[str, Any], where: str) -> None:
        from types import SimpleNamespace

        from sage_zmq.descriptor import QueueDescriptor
        from sage_zmq.observe import metrics
        from sage_zmq.router import Connection, make_router

        self.name = f"{where}->{plan['target']}"
        self.key_field = plan["key"]
        self.keyed = plan["strategy"] == "hash"
        self.router = make_router(plan["strategy"], SimpleNamespace(name=self.name))
        self.qds = [QueueDescriptor.from_dict(d) for d in plan["queues"]]
        for i, qd in enumerate(self.qds):
            self.router.add_connection(
                Connection(
                    broadcast_index=0,
                    parallel_index=i,
                    target_name=plan["target"],
                    queue_descriptor=qd,
                    target_input_index=plan["input_index"],
                )
            )
        metrics.register_router(self.router, self.name)

    def end(self) -> None:
        self.router.send_stop_signal()

    def flush(self) -> None:
        self.router.close()

    def close(self, timeout: float | None = None) -> None:
        """Close the router and the queue ends; ``timeout`` 0: deliver nothing more, now."""
        with contextlib.suppress(SageZmqError):
            self.router.close(timeout)
        for qd in self.qds:
            if timeout is None:
                qd.close()
            else:
                with contextlib.suppress(SageZmqError):  # undelivered records: given up on
                    qd.close(timeout)


def _emit(outputs: list[_Output], record: Any, parent: Any, sample: bool) -> int:
    from sage_zmq.observe import tracing
    from sage_zmq.packet import Packet

    first: Any = None
    for out in outputs:
        key = _record_key(record, out.key_field, out.name) if out.keyed else None
        packet = Packet(record, partition_key=key)
        if first is None:
            first = packet
            if parent is not None:
                tracing.propagate(parent, packet)
            elif sample:
                tracing.maybe_trace(packet)
        else:
            tracing.propagate(first, packet)
        out.router.route(packet)
    return 1


# ------------------------------------------------------------------------------ runner
def _recv(conn: Any, proc: Any, deadline: float, what: str) -> Any:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TopologyError(f"{what}: no answer before the timeout")
        if conn.poll(min(left, 0.2)):
            try:
                return conn.recv()
            except EOFError:
                raise TopologyError(f"{what}: exited (code {proc.exitcode})") from None
        if not proc.is_alive() and not conn.poll(0):
            raise TopologyError(f"{what}: exited with code {proc.exitcode} before answering")


def run_topology(
    topology: Topology | str | os.PathLike[str] | Mapping[str, Any],
    *,
    timeout: float = 300.0,
    config: Any = None,
    on_started: Callable[[str | None], None] | None = None,
) -> RunResult:
    """Run a topology to completion (every source exhausted, every instance ended).

    ``config`` (a Config, mapping or path; default the process config, overlaid with the
    topology's ``config``) goes to every instance. If ``observability.metrics_port`` is set,
    this process serves the metrics of all instances on it. ``on_started`` is called with the
    stats endpoint once every instance is running.
    """
    from sage_zmq.config import current_config, load_config
    from sage_zmq.observe.stats_server import StatsServer

    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise TopologyError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if timeout == float("inf"):
        timeout = 10.0 * 365 * 24 * 3600  # "no limit": a deadline that monotonic() can hold
    topo = topology if isinstance(topology, Topology) else load_topology(topology)
    base = current_config() if config is None else load_config(config)
    cfg = base.replace(**_flatten(topo.config)) if topo.config else base
    server = (
        StatsServer(topo.stats, include_local=False, meta={"topology": topo.name})
        if (topo.stats)
        else None
    )
    exporter = None
    if cfg.observability.metrics_port is not None and server is not None:
        from sage_zmq.observe.prometheus import start_metrics_server

        exporter = start_metrics_server(cfg.observability.metrics_port, source=server.processes)
    output_dir = tempfile.mkdtemp(prefix=f"sage-zmq-{topo.name}-")
    mp = multiprocessing.get_context("spawn")
    procs: list[tuple[OperatorSpec, int, Any, Any]] = []
    queues: dict[str, list[dict[str, Any]]] = {}
    start = time.monotonic()
    deadline = start + timeout
    try:
        for spec in topo.operators:
            for i in range(spec.parallelism):
                parent, child = mp.Pipe()
                plan = {
                    "topology": topo.to_dict(),
                    "operator": spec.name,
                    "index": i,
                    "config": cfg.to_dict(),
                    "stats": server.endpoint if server is not None else None,
                    "output_dir": output_dir,
                    # Instances watch for this process's death (_watch_runner).
                    "runner_pid": os.getpid(),
                }
                proc = mp.Process(
                    target=_instance_main,
                    args=(child, plan),
                    name=f"sage-zmq:{topo.name}:{spec.name}[{i}]",
                )
                proc.start()
                child.close()
                procs.append((spec, i, proc, parent))
        for spec, i, proc, conn in procs:
            msg = _recv(conn, proc, deadline, f"{spec.name}[{i}] start-up")
            _raise_if_error(msg, spec, i)
            if msg[1] is not None:
                queues.setdefault(spec.name, []).append(msg[1])
        for spec, _i, _proc, conn in procs:
            outputs = []
            for down in topo.downstream(spec.name):
                outputs.append(
                    {
                        "target": down.name,
                        "strategy": down.routing,
                        "key": down.key,
                        "input_index": down.inputs.index(spec.name),
                        "queues": queues[down.name],
                    }
                )
            conn.send(("go", outputs))
        if on_started is not None:
            on_started(server.endpoint if server is not None else None)
        results = _collect_results(procs, deadline)
        for _spec, _i, proc, _conn in procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        final: list[dict[str, Any]] = []
        if server is not None:
            server.wait_final(len(procs), 5.0)
            final = server.processes()
        collected = _read_collected(output_dir)
        return RunResult(
            topo.name,
            time.monotonic() - start,
            tuple(results),
            collected,
            server.endpoint if server is not None else None,
            final,
        )
    finally:
        _stop_all(procs)
        _remove_socket_files(queues)
        if exporter is not None:
            exporter.close()
        if server is not None:
            server.close()
        shutil.rmtree(output_dir, ignore_errors=True)


_STOP_GRACE = 3.0
"""How long stopped instances get, all together, to close their queues before SIGKILL."""


def _stop_all(procs: list[tuple[OperatorSpec, int, Any, Any]]) -> None:
    """End instances still running: abort (start-up) or SIGTERM (they unwind), then kill.

    One grace period for all of them, not one each: they stop in parallel, and the runner's
    own end (``--timeout``, Ctrl-C, SIGTERM) must come soon after it is asked for.
    """
    for _spec, _i, proc, conn in procs:
        if proc.is_alive():
            with contextlib.suppress(Exception):
                conn.send(("abort",))
            proc.terminate()
    deadline = time.monotonic() + _STOP_GRACE
    for _spec, _i, proc, _conn in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for _spec, _i, proc, conn in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()


def _remove_socket_files(queues: Mapping[str, list[dict[str, Any]]]) -> None:
    # A killed instance leaves its bound ipc socket file behind; every instance is gone now.
    for descriptors in queues.values():
        for d in descriptors:
            endpoint = str(d.get("metadata", {}).get("endpoint", ""))
            if endpoint.startswith("ipc://"):
                with contextlib.suppress(OSError):
                    os.unlink(endpoint[len("ipc://") :])


def _collect_results(
    procs: list[tuple[OperatorSpec, int, Any, Any]], deadline: float
) -> list[InstanceResult]:
    """Every instance's result, failing as soon as any instance reports an error or dies."""
    from multiprocessing.connection import wait

    pending = {conn: (spec, i, proc) for spec, i, proc, conn in procs}
    results: list[InstanceResult] = []
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(f"{s.name}[{i}]" for s, i, _ in pending.values())
            raise TopologyError(f"timed out waiting for {names} to finish")
        for conn in wait(list(pending), min(left, 0.5)):
            spec, i, proc = pending.pop(conn)
            msg = _recv(conn, proc, deadline, f"{spec.name}[{i}]")
            _raise_if_error(msg, spec, i)
            results.append(InstanceResult(**msg[1]))
    return results


def _raise_if_error(msg: Any, spec: OperatorSpec, index: int) -> None:
    if msg[0] == "error":
        raise TopologyError(f"{spec.name}[{index}] failed: {msg[1]}\n{msg[2]}")


def _read_collected(output_dir: str) -> dict[str, list[Any]]:
    collected: dict[str, list[Any]] = {}
    for entry in sorted(os.listdir(output_dir)):
        if not entry.endswith(".jsonl"):
            continue
        name = entry.rsplit(".", 2)[0]
        with open(os.path.join(output_dir, entry), encoding="utf-8") as fh:
            collected.setdefault(name, []).extend(json.loads(line) for line in fh if line.strip())
    return collected


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat
