"""The ``sage-zmq`` command: demo, bench, keys, run, stats, top, trace.

``demo``, ``bench`` and ``keys`` hand their arguments to their own modules (each has its own
``--help``); the others are defined here. Every command returns a process exit code: 0 on
success, 1 when the work failed, 2 for bad usage.

The global options ``--config FILE`` and ``--log-level LEVEL`` go before the command. They
apply to this process and, through the environment (``SAGE_ZMQ_CONFIG`` and
``SAGE_ZMQ__OBSERVABILITY__LOG_LEVEL``), to every process the command starts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

from sage_zmq.cli._args import finite_number, whole_number
from sage_zmq.errors import SageZmqError

__all__ = ["build_parser", "main"]

# command -> (module, function, what to install if the module is missing)
_DELEGATES: dict[str, tuple[str, str, str]] = {
    "demo": ("sage_zmq.demo", "main", "the demo ships with sage-zmq; reinstall it"),
    "bench": ("sage_zmq.bench", "main", "the benchmark ships with sage-zmq; reinstall it"),
    "keys": ("sage_zmq.security", "keys_main", "key management ships with sage-zmq security"),
}
_HELP = {
    "demo": "run the demo pipeline: source -> 2 workers -> sink across processes",
    "bench": "run the benchmarks (--quick, --json, --plot FILE.png, --ray, --only SECTION)",
    "keys": "manage CURVE keys (keys generate DIR)",
}
# The global options that take a value: the command is the first word that is neither one of
# them, nor their value, nor another option.
_GLOBAL_VALUE_OPTIONS = ("--log-level", "--config")
_LOG_LEVEL_ENV = "SAGE_ZMQ__OBSERVABILITY__LOG_LEVEL"


def _err(message: str) -> int:
    print(f"sage-zmq: error: {message}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------ option value checks
def _seconds(text: str) -> float:
    """A finite number of seconds > 0 (a negative wait means forever to ZeroMQ's poll)."""
    value = finite_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def _count(text: str) -> int:
    return whole_number(text, 0)


def _log_level(text: str) -> str:
    level = text.upper()
    if not isinstance(logging.getLevelName(level), int) or level == "NOTSET":
        known = ", ".join(n for n in logging.getLevelNamesMapping() if n != "NOTSET")
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}; use one of {known}")
    return level


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sage-zmq",
        description="The sage-zmq communication layer: run pipelines and watch them.",
        # '--log INFO demo' must not pass for '--log-level INFO': the command is found by
        # exact option names (see _command_position).
        allow_abbrev=False,
    )
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        type=_log_level,
        help="log level of sage-zmq's logging, in this process and every process it starts "
        "(default: observability.log_level)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a sage-zmq YAML configuration for this process and every process it starts "
        "(default: $SAGE_ZMQ_CONFIG, else defaults)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, text in _HELP.items():
        sub.add_parser(name, help=text, add_help=False)

    run = sub.add_parser("run", help="run a topology described in YAML until it ends")
    run.add_argument("topology", metavar="TOPOLOGY.yaml")
    run.add_argument("--timeout", type=_seconds, default=3600.0, help="give up after S seconds")
    run.add_argument("--trace-log", metavar="FILE", help="append sampled traces to FILE")
    run.add_argument("--stats", metavar="ENDPOINT", help="stats endpoint (tcp://HOST:PORT)")
    run.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON (alone on stdout: what instances print goes to stderr)",
    )

    stats = sub.add_parser("stats", help="print the queues of a running topology once")
    stats.add_argument("endpoint", nargs="?", help="stats endpoint (default: the one running)")
    stats.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    stats.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for it")

    top = sub.add_parser("top", help="a live view of a running topology's queues")
    top.add_argument("endpoint", nargs="?", help="stats endpoint (default: the one running)")
    top.add_argument("--interval", type=_seconds, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one view and exit")
    top.add_argument("--count", type=_count, default=0, help="exit after N views (0: never)")
    top.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for answers")

    trace = sub.add_parser("trace", help="show the hops of sampled records")
    trace.add_argument(
        "source", nargs="?", help="a trace log file or a stats endpoint (default: running one)"
    )
    trace.add_argument("--id", dest="trace_id", help="only this trace id")
    trace.add_argument("--limit", type=_count, default=20, help="the last N traces (0: all)")
    trace.add_argument("--json", action="store_true", help="print traces as JSON lines")
    trace.add_argument("--timeout", type=_seconds, default=3.0, help="seconds to wait for answers")
    return parser


def _command_position(args: Sequence[str]) -> int | None:
    """Where the command is in ``args``: global options and their values come before it."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in _GLOBAL_VALUE_OPTIONS:
            i += 2  # the option and its value ('--log-level INFO')
        elif arg.startswith("-"):
            i += 1  # '--log-level=INFO', '--help', or an unknown option argparse will name
        else:
            return i
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sage-zmq`` and ``python -m sage_zmq``; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Delegated commands take every argument after their name, --help included.
    position = _command_position(args_list)
    if position is not None and args_list[position] in _DELEGATES:
        command = args_list[position]
        head = parser.parse_args(args_list[:position])
        rest = args_list[position + 1 :]
        with _global_options(head):
            try:
                _setup(head)
            except SageZmqError as exc:
                # A bad usage is reported before a bad configuration, as for the commands
                # defined here (argparse checks them before _setup runs).
                usage = _usage_error(command, rest)
                return usage if usage is not None else _err(str(exc))
            return _delegate(command, rest)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    with _global_options(args):
        try:
            _setup(args)
            handler: Callable[[argparse.Namespace], int] = _COMMANDS[args.command]
            return handler(args)
        except SageZmqError as exc:
            return _err(str(exc))
        except KeyboardInterrupt:
            return 130


@contextlib.contextmanager
def _global_options(args: argparse.Namespace) -> Iterator[None]:
    """``--config`` / ``--log-level`` in the environment while the command runs.

    Processes the command starts (topology instances, demo workers, benchmark peers) read
    their configuration from the environment, so that is where the global options must be;
    the previous values come back afterwards (``main`` may be called in-process).
    """
    changes: dict[str, str] = {}
    if args.config:
        from sage_zmq.config import ENV_FILE

        changes[ENV_FILE] = os.path.abspath(args.config)
    if args.log_level:
        changes[_LOG_LEVEL_ENV] = args.log_level
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _setup(args: argparse.Namespace) -> None:
    from sage_zmq.config import current_config, load_config, set_config
    from sage_zmq.observe.logging import configure_logging

    if args.config:
        load_config(args.config)  # its own errors name the file, not SAGE_ZMQ_CONFIG
        # The file with the environment's SAGE_ZMQ__* overrides (--log-level among them):
        # the configuration every process the command starts reads.
        set_config(load_config(None))
    elif args.log_level:
        set_config(current_config().replace(**{"observability.log_level": args.log_level}))
    configure_logging(args.log_level)


class _ArgumentsChecked(BaseException):
    """Raised once a delegated command has parsed its arguments: stop before it works."""


def _usage_error(command: str, rest: list[str]) -> int | None:
    """The exit code of ``command rest`` if its arguments are bad (it prints why), else None.

    The delegated commands parse their arguments inside their own ``main``; stopping right
    after that parse is the only way to ask them without running them.
    """
    fn = _delegate_function(command)
    if isinstance(fn, int):
        return None
    real_parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> Any:
        real_parse(self, *a, **kw)
        raise _ArgumentsChecked

    try:
        with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
            result = fn(rest)
    except _ArgumentsChecked:
        return None
    except SystemExit as exc:  # argparse's usage error (or --help)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # Some commands catch argparse's SystemExit themselves and return its code.
    return int(result or 0)


def _delegate_function(command: str) -> Callable[[list[str]], Any] | int:
    """The function behind a delegated command, or the exit code after saying it is missing."""
    module_name, attr, advice = _DELEGATES[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name != module_name:
            raise
        return _err(f"'{command}' is not available: module {module_name} is missing ({advice})")
    fn = getattr(module, attr, None)
    if fn is None:
        return _err(f"'{command}' is not available: {module_name} has no {attr}() ({advice})")
    return fn


def _delegate(command: str, rest: list[str]) -> int:
    fn = _delegate_function(command)
    if isinstance(fn, int):
        return fn
    try:
        result = fn(rest)
    except SystemExit as exc:  # argparse inside the command (--help, bad usage)
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except SageZmqError as exc:  # e.g. a configuration error met once the work started
        return _err(str(exc))
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


# ---------------------------------------------------------------------------- commands
def _endpoint(given: str | None) -> str:
    from sage_zmq.observe.stats_server import StatsError, check_endpoint, discover

    if given:
        return check_endpoint(given)
    found = discover()
    if not found:
        raise StatsError(
            "no running topology advertises a stats endpoint here; give ENDPOINT "
            "(sage-zmq run prints it) or start one with: sage-zmq run TOPOLOGY.yaml"
        )
    if len(found) > 1:
        listing = ", ".join(f"{f['name']} (pid {f['pid']}): {f['endpoint']}" for f in found)
        raise StatsError(f"several topologies are running; pick one ENDPOINT: {listing}")
    return str(found[0]["endpoint"])


class _Terminated(SystemExit):
    """SIGTERM arrived: unwind like Ctrl-C, so that the pipeline's processes are stopped."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into an exception (once), so ``finally`` blocks stop what we started.

    Python's default for SIGTERM ends the process at once: a runner stopped that way left
    every instance process running. Later signals are ignored while the first unwinds, so a
    second one cannot cut the clean-up short.
    """
    if not _in_main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr: the instances (spawned, inheriting it) print there.

    ``run --json`` owes its stdout to the JSON summary alone; the ``print`` sink, or any user
    function that prints, writes to the instance's stdout.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 at all: nothing of ours to keep clean
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _cmd_run(args: argparse.Namespace) -> int:
    from sage_zmq.observe.stats_server import advertise
    from sage_zmq.topology import load_topology, run_topology

    topo = load_topology(args.topology)
    changes: dict[str, Any] = {}
    if args.trace_log:
        changes["trace_log"] = os.path.abspath(args.trace_log)
    elif topo.trace_log:
        changes["trace_log"] = os.path.abspath(topo.trace_log)
    if args.stats:
        changes["stats"] = args.stats
    if changes:
        from dataclasses import replace

        topo = replace(topo, **changes)
    advert: list[str] = []

    def started(endpoint: str | None) -> None:
        if endpoint is not None:
            advert.append(advertise(endpoint, topo.name))
            print(
                f"{topo.name}: running; stats at {endpoint} (sage-zmq top {endpoint})",
                file=sys.stderr,
                flush=True,
            )

    n = sum(op.parallelism for op in topo.operators)
    print(f"{topo.name}: starting {n} processes", file=sys.stderr, flush=True)
    quiet_stdout = _stdout_to_stderr() if args.json else contextlib.nullcontext()
    try:
        with _stop_on_sigterm(), quiet_stdout:
            result = run_topology(topo, timeout=args.timeout, on_started=started)
    except _Terminated as exc:
        print(f"{topo.name}: stopped (SIGTERM)", file=sys.stderr, flush=True)
        return int(exc.code or 1)
    finally:
        for path in advert:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    if args.json:
        from dataclasses import asdict

        print(
            json.dumps(
                {
                    "topology": result.topology,
                    "elapsed": result.elapsed,
                    "instances": [asdict(i) for i in result.instances],
                }
            )
        )
        return 0
    print(f"{result.topology}: finished in {result.elapsed:.2f} s")
    for op in topo.operators:
        parts = result.by_operator(op.name)
        received = sum(p.received for p in parts)
        emitted = sum(p.emitted for p in parts)
        busy = max((p.elapsed for p in parts), default=0.0)
        rate = (received or emitted) / busy if busy > 0 else 0.0
        print(
            f"  {op.name:<16} x{op.parallelism:<3} in {received:>10}  out {emitted:>10}  "
            f"{rate:>12,.0f} rec/s"
        )
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from sage_zmq.cli.views import format_queues
    from sage_zmq.observe.stats_server import query

    endpoint = _endpoint(args.endpoint)
    reply = query(endpoint, "snapshot", timeout=args.timeout)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(format_queues(reply.get("processes") or []))
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from sage_zmq.cli.views import format_queues, rates_between
    from sage_zmq.observe.stats_server import query

    endpoint = _endpoint(args.endpoint)
    before = query(endpoint, "snapshot", timeout=args.timeout).get("processes") or []
    shown = 0
    limit = 1 if args.once else args.count
    tty = sys.stdout.isatty()
    while True:
        time.sleep(args.interval)  # the refresh period of a live view
        after = query(endpoint, "snapshot", timeout=args.timeout).get("processes") or []
        view = format_queues(after, rates_between(before, after))
        if tty and not args.once:
            sys.stdout.write("\x1b[H\x1b[2J")
        print(f"sage-zmq top  {endpoint}  {time.strftime('%H:%M:%S')}\n{view}", flush=True)
        before = after
        shown += 1
        if limit and shown >= limit:
            return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from sage_zmq.cli.views import format_trace, load_trace_file, select_traces
    from sage_zmq.observe.stats_server import StatsError, query

    source = args.source
    if source and not source.startswith(("tcp://", "ipc://")):
        if not os.path.exists(source):
            raise StatsError(
                f"no trace log {source!r} (no trace finished yet?); give a trace log file "
                "or a stats endpoint (tcp://HOST:PORT)"
            )
        try:
            traces: list[Any] = load_trace_file(source)
        except ValueError as exc:
            raise StatsError(str(exc)) from None
    else:
        traces = query(_endpoint(source), "traces", timeout=args.timeout).get("traces") or []
    chosen = select_traces(traces, args.trace_id, args.limit)
    if not chosen:
        if args.trace_id:
            return _err(
                f"trace {args.trace_id} not found: sampling is "
                "observability.trace_sample_rate (0 = off)"
            )
        # Not an error, but not output either: stdout stays empty (or pure JSON lines).
        print(
            "no traces yet: no sampled record has finished its path (sampling is "
            "observability.trace_sample_rate; 0 = off)",
            file=sys.stderr,
        )
        return 0
    for trace in chosen:
        print(json.dumps(trace) if args.json else format_trace(trace))
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "stats": _cmd_stats,
    "top": _cmd_top,
    "trace": _cmd_trace,
}
