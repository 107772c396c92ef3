"""Routers: send each packet once to every downstream group, to the instance(s) a strategy picks.

Topology. Every connection is one downstream instance's input queue, reached through its
:class:`~sage_zmq.descriptor.QueueDescriptor`; in this process every distinct endpoint has one
producer, i.e. one credit-flow DEALER socket (``shm``/``tcp``) or one in-process channel
(``local``), however many connections or routers name it. The strategies choose *which*
producer gets a packet; they are deliberately not mapped onto ZeroMQ's own fan-out sockets,
because each of those loses or stalls packets in a way a router must not: PUB/SUB (broadcast)
drops at the high-water mark and loses a slow joiner's first messages; PUSH (round robin) blocks
on one slow peer without telling the sender and cannot skip a removed one; ROUTER without
``ROUTER_MANDATORY`` drops to unknown peers. Credit-based DEALERs never drop: a put either
succeeds, waits for room, or raises.

Failures. round_robin and load_balance skip removed and *stalled* instances (a put that found no
room within ``timeout``, or raised ``QueueClosed``/``DeliveryError``); the packet moves to the
next live instance, up to ``max_retries`` times. A stalled instance comes back after
``retry_interval``; its next put is a non-blocking probe. hash and broadcast have fixed
targets: if one cannot take the packet, :class:`NotDelivered` names it (a key never moves
silently to another instance). ``route`` never returns without having delivered to every group.

Dead instances. A reliable target (``sage``, or ``ack``/``persist`` metadata) declares its
consumer dead after ``heartbeat_interval * liveness`` of silence. The router stops sending to
it at once (a put waiting for its room gives up within ``_DEAD_CHECK`` s, and the packet fails
over) and, at its next ``route``, ``send_stop_signal`` or ``close``, a round_robin or
load_balance router takes back the records the instance had not acknowledged and routes them
to the group's live instances. A taken-back packet that cannot go elsewhere (a ``hash`` key of
the dead instance, or no live instance) is held by the router and put back when the instance
returns, or at ``close``, which raises naming how many could not be delivered. A moved record
that the dead consumer had received but not yet acknowledged is processed twice: delivery is
at least once across instances. A hash or broadcast router moves nothing: the dead instance's
producer keeps its records and resends them when the consumer returns; once ``maxsize`` are
held, ``route`` raises :class:`NotDelivered` naming it. An end of stream takes no room: a dead
instance's producer keeps it with the rest. The instance rejoins when its consumer is heard
again.

Threads: ``route``, ``send_stop_signal`` and ``close`` are for one thread at a time (the
operator's); ``add_connection``/``remove_connection``/``statistics`` may run in any thread
while packets flow.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from sage_zmq.config import Config, current_config, load_config
from sage_zmq.descriptor import QueueDescriptor, lookup_queue_type
from sage_zmq.errors import (
    DeliveryError,
    EncodeError,
    Full,
    QueueClosed,
    RoutingError,
    SageZmqError,
)
from sage_zmq.observe.logging import connection_event
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.router.connection import Connection
from sage_zmq.router.strategies import (
    STRATEGY_NAMES,
    LoadBalanceStrategy,
    Strategy,
    make_strategy,
)

__all__ = [
    "BaseRouter",
    "BroadcastRouter",
    "HashRouter",
    "LoadBalanceRouter",
    "NotDelivered",
    "RoundRobinRouter",
    "RouterStatistics",
    "make_router",
]

_PUT_FAILURES = (Full, QueueClosed, DeliveryError)
_HOUSEKEEPING_EVERY = 256  # packets between checks for stalled instances whose pause is over
_DEAD_CHECK = 0.25
"""Seconds a put to a reliable target waits between looks at whether its consumer died."""
_MOVABLE = frozenset({"round_robin", "load_balance"})


class NotDelivered(RoutingError):
    """A packet could not be delivered to every group (or every broadcast target).

    ``delivered`` lists the connections that did get it; ``failed`` names each target or group
    that did not, with the reason.
    """

    def __init__(
        self,
        message: str,
        delivered: tuple[Connection, ...] = (),
        failed: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.delivered = delivered
        self.failed = failed


@dataclass(frozen=True, slots=True)
class RouterStatistics:
    """A snapshot of one router.

    ``routed`` counts packets delivered to every group; ``delivered`` counts packets per
    connection slot ``(broadcast_index, parallel_index)``; ``failures`` counts ``route`` calls
    that raised; ``failovers`` counts puts that failed and moved on to another instance, and
    instances declared dead whose unacknowledged records were taken back (once per death, and
    not again when a put to it already failed over because of that death); ``by_strategy``
    counts routed packets per strategy actually used.

    The queue figures add up this process's ends of the router's target queues (each queue
    once): ``bytes_sent``, ``depth`` (records put and not yet consumed, or still waiting to
    leave), ``maxsize``, ``credit_waits``, ``retransmits``. ``uptime`` is the seconds since
    the router was made, so two snapshots give the routing rate between them.
    """

    strategy: str
    routed: int
    delivered: Mapping[tuple[int, int], int]
    failures: int
    failovers: int
    by_strategy: Mapping[str, int]
    stop_signals: int
    connections: int
    stalled: tuple[tuple[int, int], ...]
    bytes_sent: int = 0
    depth: int = 0
    maxsize: int = 0
    credit_waits: int = 0
    retransmits: int = 0
    uptime: float = 0.0

    @property
    def utilisation(self) -> float:
        """Depth as a fraction of the target queues' summed ``maxsize``."""
        return self.depth / self.maxsize if self.maxsize else 0.0

    @property
    def route_rate(self) -> float:
        """Packets routed per second, on average since the router was made."""
        return self.routed / self.uptime if self.uptime > 0 else 0.0


class _Target:
    """The router's state for one connection."""

    __slots__ = (
        "conn",
        "consumed",
        "counted",
        "delivered",
        "held",
        "index",
        "move_due",
        "probe",
        "qd",
        "reliable",
        "stalled_until",
        "used",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.qd: QueueDescriptor = conn.queue_descriptor
        self.index = conn.target_input_index
        self.delivered = 0
        self.consumed = 0  # as last reported to the load tracker
        self.used = False  # a put went through this router: a producer exists here
        self.stalled_until = 0.0  # > 0: stalled until then (monotonic), then probed
        self.probe = False  # next put is a non-blocking probe
        # The target's reliable producer (it tells when its consumer dies), once looked up;
        # False: looked up, not reliable.
        self.reliable: Any = None
        self.move_due = False  # its consumer was declared dead; unacked records not moved yet
        self.counted = False  # that death is already in ``failovers`` (a put to it failed over)
        self.held: list[Any] = []  # taken back from it, for it alone: put again on its return

    @property
    def dead(self) -> bool:
        """Its consumer is declared dead now (only reliable targets can tell)."""
        return bool(self.reliable) and bool(self.reliable.dead)


class _Group:
    """One downstream operator: its instances and one strategy object per strategy used."""

    __slots__ = (
        "configured",
        "connected",
        "index",
        "live",
        "next_refresh",
        "strategies",
        "targets",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.targets: dict[int, _Target] = {}
        self.configured: tuple[int, ...] = ()  # hash's instance set: kept when one is removed
        self.connected: tuple[int, ...] = ()
        self.live: tuple[int, ...] = ()  # connected and not stalled
        self.strategies: dict[str | None, Strategy] = {}
        self.next_refresh = 0.0

    def relive(self) -> None:
        targets = self.targets
        self.connected = tuple(sorted(targets))
        self.live = tuple(p for p in self.connected if not targets[p].stalled_until)


def _retarget(p: Packet, index: int) -> Packet:
    # copy_with, minus the generic field walk: fan-out pays this per target.
    h = p.headers
    return Packet(
        p.payload,
        index,
        p.partition_key,
        p.partition_strategy,
        None if h is None else dict(h),
        p.timestamp,
    )


def _resolve_config(config: Config | Mapping[str, Any] | None) -> Config:
    if config is None:
        return current_config()
    if isinstance(config, Config):
        return config
    if isinstance(config, Mapping):
        sections = {"communication", "performance", "reliability", "security", "observability"}
        if set(config) & sections:
            return load_config(config)
        # A bare router section: {"strategy": "hash", "max_parallelism": 256}
        return load_config({"communication": {"router": dict(config)}})
    raise RoutingError(
        f"router config must be a sage_zmq Config, a dict or None, got {type(config).__name__}"
    )


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise RoutingError(f"router {name} must be a number > 0, got {value!r}")
    return float(value)


class BaseRouter:
    """Sends packets to downstream groups through their instances' queue descriptors.

    ``strategy`` (a name) defaults to the subclass's, else ``communication.router.strategy``.
    ``timeout`` bounds how long one put may wait for room (default
    ``communication.queue.timeout``); ``max_retries`` (``communication.router.max_retries``)
    bounds failovers per packet; ``retry_interval`` (``communication.router.
    health_check_interval``) is how long a stalled instance is skipped. ``load_tracking`` are
    :class:`~sage_zmq.router.load.LoadTracker` options for load_balance; ``load_interval`` is
    how often (seconds) live load is read from the queues. ``ctx`` is the operator's context,
    used only for its ``name`` in messages.

    A packet delivered to one target is passed on as it is when its ``input_index`` already
    equals the connection's ``target_input_index``, else as a copy with that index; a packet
    delivered to several targets is copied for each (no target shares a mutable packet).
    """

    strategy_name: ClassVar[str | None] = None

    def __init__(
        self,
        ctx: Any = None,
        *,
        strategy: str | None = None,
        config: Config | Mapping[str, Any] | None = None,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry_interval: float | None = None,
        load_tracking: Mapping[str, Any] | None = None,
        load_interval: float = 0.001,
    ) -> None:
        cfg = _resolve_config(config)
        rcfg = cfg.communication.router
        fixed = type(self).strategy_name
        if strategy is not None and fixed is not None and _canonical(strategy) != fixed:
            raise RoutingError(
                f"{type(self).__name__} always routes by {fixed!r}, got strategy={strategy!r}; "
                "use BaseRouter(strategy=...) or make_router(name)"
            )
        name = _canonical(strategy or fixed or rcfg.strategy)
        self.ctx = ctx
        self.name = str(getattr(ctx, "name", None) or type(self).__name__)
        self.strategy = name
        self.max_parallelism = rcfg.max_parallelism
        self.timeout = _positive(
            "timeout", cfg.communication.queue.timeout if timeout is None else timeout
        )
        retries = rcfg.max_retries if max_retries is None else max_retries
        if type(retries) is not int or retries < 0:
            raise RoutingError(f"router max_retries must be an int >= 0, got {retries!r}")
        self.max_retries = retries
        self.retry_interval = _positive(
            "retry_interval",
            rcfg.health_check_interval if retry_interval is None else retry_interval,
        )
        self.load_interval = _positive("load_interval", load_interval)
        self._load_tracking = dict(load_tracking or {})
        self._check_load_tracking()
        self._lock = threading.Lock()
        self._groups: tuple[_Group, ...] = ()
        self._closed = False
        self._ended = False
        self._signalled: set[tuple[str, str]] = set()
        # Queues whose end was asked for at remove_connection while another connection still
        # fed them, and removed targets whose end failed: send_stop_signal tries those again.
        self._end_wanted: set[tuple[str, str]] = set()
        self._retiring: list[_Target] = []
        self._routed = 0
        self._made_at = time.monotonic()
        self._by_strategy: dict[str, int] = {}
        self._failures = 0
        self._failovers = 0
        self._stop_signals = 0
        self._tick = 0
        self._removed_delivered: dict[tuple[int, int], int] = {}
        self._deaths = 0  # bumped (any thread) when a target's consumer is declared dead
        self._deaths_seen = 0
        self._weak_self = weakref.ref(self)
        from sage_zmq.observe import metrics

        metrics.register_router(self, self.name)

    def _check_load_tracking(self) -> None:
        from sage_zmq.router.load import LoadTracker

        try:
            LoadTracker(**self._load_tracking)
        except TypeError as exc:
            raise RoutingError(f"bad load_tracking options: {exc}") from None

    # ------------------------------------------------------------------ connections
    def add_connection(self, conn: Connection) -> None:
        """Start sending to ``conn``'s instance (safe while packets flow)."""
        if not isinstance(conn, Connection):
            raise RoutingError(
                f"add_connection needs a sage_zmq.Connection, got {type(conn).__name__}"
            )
        qd = conn.queue_descriptor
        lookup_queue_type(qd.queue_type).check_usable_here(qd)
        with self._lock:
            self._check_open()
            group = self._group(conn.broadcast_index)
            if group is not None and conn.parallel_index in group.targets:
                have = group.targets[conn.parallel_index].conn
                raise RoutingError(
                    f"{self.name}: slot {conn.slot} is taken by {have.describe()}; "
                    "remove_connection() it first"
                )
            configured = tuple(sorted({*(group.configured if group else ()), conn.parallel_index}))
            if len(configured) > self.max_parallelism:
                raise RoutingError(
                    f"{self.name}: group {conn.broadcast_index} would have {len(configured)} "
                    f"instances, more than max_parallelism={self.max_parallelism}; raise "
                    "communication.router.max_parallelism"
                )
            if group is None:
                group = _Group(conn.broadcast_index)
                self._groups = tuple(sorted((*self._groups, group), key=lambda g: g.index))
            targets = dict(group.targets)
            targets[conn.parallel_index] = _Target(conn)
            group.targets = targets
            group.configured = configured
            group.relive()
            self._retain_load(group)

    def remove_connection(
        self, conn: Connection, *, rescale: bool = False, end_stream: bool = False
    ) -> int:
        """Stop sending to ``conn``'s instance (safe while packets flow).

        The instance gets no end of stream from this router unless ``end_stream=True`` (an
        instance being retired: its consumer then counts this router's end as at
        ``send_stop_signal``, which only reaches the connections still there). Leave it off
        for an instance that may come back.

        Returns how many records put through it are not yet reported consumed: they stay in
        that queue (delivered if its consumer reads them; a ``DeliveryError`` on the
        descriptor's ``close`` otherwise). With hash routing the instance stays in the group's
        key-group layout, so its keys raise instead of moving, unless ``rescale=True``: then
        the layout shrinks and keys move (keyed state must move with them); an instance
        removed without it can be removed again with it. Likewise a group
        whose last instance is removed keeps expecting packets (``route`` raises) unless the
        removals were ``rescale=True``: a group's share is never dropped silently.
        """
        if not isinstance(conn, Connection):
            raise RoutingError(
                f"remove_connection needs a sage_zmq.Connection, got {type(conn).__name__}"
            )
        with self._lock:
            group = self._group(conn.broadcast_index)
            target = None if group is None else group.targets.get(conn.parallel_index)
            if (
                rescale
                and group is not None
                and target is None
                and conn.parallel_index in group.configured
            ):
                # Removed earlier without rescale (its keys raise): now its share goes too.
                group.configured = tuple(p for p in group.configured if p != conn.parallel_index)
                group.relive()
                if not group.targets and not group.configured:
                    self._groups = tuple(g for g in self._groups if g is not group)
                return 0
            if group is None or target is None or not (target.conn is conn or target.conn == conn):
                raise RoutingError(
                    f"{self.name}: {conn.describe()} is not connected; connected: "
                    f"{', '.join(c.describe() for c in self.connections()) or 'none'}"
                )
            targets = dict(group.targets)
            del targets[conn.parallel_index]
            group.targets = targets
            if rescale:
                group.configured = tuple(p for p in group.configured if p != conn.parallel_index)
            group.relive()
            self._removed_delivered[conn.slot] = (
                self._removed_delivered.get(conn.slot, 0) + target.delivered
            )
            if not targets and not group.configured:
                self._groups = tuple(g for g in self._groups if g is not group)
            self._retain_load(group)
        self._end_removed(target, end_stream)
        return target.qd.backlog() if target.used else 0

    def _end_removed(self, target: _Target, asked: bool) -> None:
        key = target.conn.queue_key
        if asked and key not in self._signalled:
            self._end_wanted.add(key)
        if key not in self._end_wanted or any(c.queue_key == key for c in self.connections()):
            return  # no end asked for, or the queue is still fed through another connection
        self._end_wanted.discard(key)
        error = self._end_target(target)
        if error is not None:
            self._retiring.append(target)
            raise NotDelivered(
                f"{self.name}: {target.conn.describe()} was removed, but its end of stream (or "
                f"the {len(target.held)} records held for it) was not delivered: {error}; "
                "send_stop_signal tries again",
                (),
                (f"{target.conn.describe()}: {error}",),
            ) from error
        self._stop_signals += 1

    def _end_queue(self, conn: Connection) -> SageZmqError | None:
        """End of stream straight into ``conn``'s queue (no target tracks it)."""
        try:
            conn.queue_descriptor.put(EndOfStream(self.name), True, self.timeout)
        except SageZmqError as exc:
            return exc
        self._signalled.add(conn.queue_key)
        return None

    def _end_target(self, target: _Target) -> SageZmqError | None:
        """Put what is held for ``target``, then its end of stream; the error, if one failed."""
        try:
            self._return_held(target, self.timeout)
            self._put_to(target, EndOfStream(self.name), self.timeout)
        except SageZmqError as exc:
            return exc
        self._signalled.add(target.conn.queue_key)
        return None

    def connections(self) -> list[Connection]:
        """The connected connections, by group and instance."""
        groups = self._groups
        return [g.targets[p].conn for g in groups for p in sorted(g.targets)]

    def _group(self, index: int) -> _Group | None:
        for g in self._groups:
            if g.index == index:
                return g
        return None

    def _retain_load(self, group: _Group) -> None:
        for strategy in group.strategies.values():
            if isinstance(strategy, LoadBalanceStrategy):
                strategy.tracker.retain(group.targets)

    def _check_open(self) -> None:
        if self._closed:
            raise RoutingError(f"{self.name}: the router is closed")

    # ------------------------------------------------------------------ routing
    def route(self, packet: Any) -> list[Connection]:
        """Deliver ``packet`` once to every group; the connections it went to.

        A value that is not a :class:`Packet` is wrapped in one. Raises :class:`NotDelivered`
        (a :class:`RoutingError`) if any group could not take it, after trying every group.
        """
        if not isinstance(packet, Packet):
            if isinstance(packet, EndOfStream):
                raise RoutingError(
                    f"{self.name}: route() got an EndOfStream; call send_stop_signal() to end "
                    "the stream (it reaches every target queue once)"
                )
            packet = Packet(packet)
        if self._closed or self._ended:
            self._failures += 1
            self._check_open()
            raise RoutingError(
                f"{self.name}: send_stop_signal() was called; no packets may follow the end "
                "of stream"
            )
        if self._deaths != self._deaths_seen:
            self._fail_over_dead()
        groups = self._groups
        override = packet.partition_strategy
        self._tick += 1
        if self._tick % _HOUSEKEEPING_EVERY == 0:
            self._readmit(time.monotonic())
        if len(groups) == 1:
            try:
                delivered = self._send(groups[0], packet, override, False)
            except RoutingError:
                self._failures += 1
                raise
        elif groups:
            delivered = []
            failed: list[str] = []
            first: RoutingError | None = None
            for g in groups:
                try:
                    delivered.extend(self._send(g, packet, override, True))
                except RoutingError as exc:
                    failed.append(f"group {g.index}: {exc}")
                    first = first or exc
            if first is not None:
                self._failures += 1
                raise NotDelivered(
                    f"{self.name}: packet not delivered to {len(failed)} of {len(groups)} "
                    f"groups (delivered to {len(delivered)} connections): " + "; ".join(failed),
                    tuple(delivered),
                    tuple(failed),
                ) from first
        else:
            self._failures += 1
            raise RoutingError(
                f"{self.name}: no connections; add_connection() before routing packets"
            )
        self._routed += 1
        if override is not None:
            self._by_strategy[override] = self._by_strategy.get(override, 0) + 1
        return delivered

    def _strategy(self, group: _Group, name: str | None) -> Strategy:
        canonical = self.strategy if name is None else _canonical(name)
        strategy = group.strategies.get(canonical)
        if strategy is None:
            options: dict[str, Any] = {}
            if canonical == "hash":
                options["max_parallelism"] = self.max_parallelism
            elif canonical == "load_balance":
                from sage_zmq.router.load import LoadTracker

                options["predictor"] = LoadTracker(**self._load_tracking)
                options["note_on_select"] = False
            strategy = make_strategy(canonical, **options)
            group.strategies[canonical] = strategy
        group.strategies[name] = strategy
        return strategy

    def _send(self, g: _Group, packet: Packet, name: str | None, fan: bool) -> list[Connection]:
        strategy = g.strategies.get(name) or self._strategy(g, name)
        kind = strategy.name
        if kind == "hash":
            sel = strategy.select(g.connected, packet.partition_key, g.configured)
            if not sel:
                owner = strategy.target(packet.partition_key, g.configured)  # type: ignore[attr-defined]
                raise RoutingError(
                    f"{self.name}: key {packet.partition_key!r} belongs to instance {owner} of "
                    f"group {g.index}, which was removed; hash routing never moves a key "
                    "silently: add the instance back, or remove_connection(..., rescale=True)"
                )
            return [self._put_fixed(g, g.targets[sel[0]], packet, fan)]
        if kind == "broadcast":
            return self._broadcast(g, packet, fan)
        return self._put_any(g, strategy, packet, fan)

    def _item(self, t: _Target, packet: Packet, fan: bool) -> Packet:
        if fan or packet.input_index != t.index:
            return _retarget(packet, t.index)
        return packet

    def _put_fixed(self, g: _Group, t: _Target, packet: Packet, fan: bool) -> Connection:
        probe = t.probe
        error = self._try_put(g, t, self._item(t, packet, fan), self.timeout, movable=False)
        if error is not None:
            how = " (stalled after an earlier failure: probed without waiting)" if probe else ""
            raise RoutingError(
                f"{self.name}: {t.conn.describe()} could not take the packet{how}: {error}"
            ) from error
        return t.conn

    def _broadcast(self, g: _Group, packet: Packet, fan: bool) -> list[Connection]:
        targets = g.targets
        order = g.connected
        if not order:
            raise RoutingError(f"{self.name}: group {g.index} has no connected instance")
        fan = fan or len(order) > 1
        delivered: list[Connection] = []
        failed: list[str] = []
        for p in order:
            t = targets[p]
            error = self._try_put(g, t, self._item(t, packet, fan), self.timeout, movable=False)
            if error is None:
                delivered.append(t.conn)
            else:
                failed.append(f"{t.conn.describe()}: {error}")
        if failed:
            raise NotDelivered(
                f"{self.name}: broadcast in group {g.index} reached {len(delivered)} of "
                f"{len(order)} instances; failed: " + "; ".join(failed),
                tuple(delivered),
                tuple(failed),
            )
        return delivered

    def _put_any(
        self, g: _Group, strategy: Strategy, packet: Packet, fan: bool
    ) -> list[Connection]:
        lb = strategy.tracker if isinstance(strategy, LoadBalanceStrategy) else None
        if lb is not None:
            now = time.monotonic()
            if now >= g.next_refresh:
                self._refresh_load(g, lb, now)
        live = g.live
        if not live:
            self._readmit(time.monotonic())
            live = g.live or g.connected  # everyone stalled: probe them all
        sel = strategy.select(live, packet.partition_key, g.configured)
        tried: list[str] = []
        skip: set[int] = set()
        wait = self.timeout
        while sel:
            p = sel[0]
            t = g.targets.get(p)
            if t is None:  # removed by another thread since ``live`` was read
                skip.add(p)
            else:
                error = self._try_put(g, t, self._item(t, packet, fan), wait)
                if error is None:
                    if lb is not None:
                        lb.note_sent(p)
                    return [t.conn]
                tried.append(f"{t.conn.describe()}: {error}")
                skip.add(p)
                if len(tried) > self.max_retries:
                    break
                self._failovers += 1
                if t.move_due:
                    t.counted = True  # the move of its records is this same failover
                if isinstance(error, Full):
                    wait = 0.0  # the time was spent; the others get a non-blocking try
            live = tuple(i for i in (g.live or g.connected) if i not in skip)
            sel = strategy.select(live, packet.partition_key, g.configured)
        if not tried:
            raise RoutingError(f"{self.name}: group {g.index} has no connected instance")
        raise NotDelivered(
            f"{self.name}: no instance of group {g.index} took the packet; tried "
            + "; ".join(tried),
            (),
            tuple(tried),
        )

    def _try_put(
        self, g: _Group, t: _Target, item: Packet, wait: float, *, movable: bool = True
    ) -> SageZmqError | None:
        qd = t.qd
        if t.reliable is None:
            self._watch(g, t)
        try:
            if t.probe or t.stalled_until or wait <= 0:
                qd.put(item, False)
            elif t.reliable:
                self._put_to(t, item, wait)
            else:
                qd.put(item, True, wait)  # the common case, without a call more per packet
        except _PUT_FAILURES as exc:
            t.used = True
            self._stall(g, t, exc, movable)
            return exc
        except EncodeError as exc:
            # The record itself cannot travel: no other instance would do better.
            raise RoutingError(f"{self.name}: {t.conn.describe()}: {exc}") from exc
        t.used = True
        t.delivered += 1
        if (t.probe or t.stalled_until) and not t.dead:  # a dead one holds what it took
            self._recover(g, t)
        return None

    def _put_to(self, t: _Target, item: Any, wait: float) -> None:
        if not t.reliable:
            t.qd.put(item, True, wait)
            return
        # In slices: a consumer declared dead while we wait for its room (its producer finds
        # out inside this very put) ends the wait instead of holding route() for ``timeout``.
        deadline = time.monotonic() + wait
        while True:
            try:
                t.qd.put(item, True, min(_DEAD_CHECK, max(0.0, deadline - time.monotonic())))
                return
            except Full:
                if t.dead:
                    raise DeliveryError(
                        f"queue {t.qd.queue_id!r}: its consumer was declared dead (nothing "
                        "heard from it); held records go out when it returns"
                    ) from None
                if time.monotonic() >= deadline:
                    raise Full(
                        f"queue {t.qd.queue_id!r} is full: its consumer took nothing within "
                        f"{wait:g} s"
                    ) from None

    # ------------------------------------------------------------------ health
    def _watch(self, g: _Group, t: _Target) -> None:
        """Look up ``t``'s producer once; a reliable one reports its consumer's death to us."""
        try:
            producer = t.qd._handle().producer(t.qd)
        except SageZmqError:
            return  # the put itself will raise and name the problem; look again next time
        add = getattr(producer, "add_dead_callback", None)
        if add is None:
            t.reliable = False
            return
        t.reliable = producer
        weak_self = self._weak_self

        def dead(_producer: Any) -> None:
            # Any thread, possibly inside a put of ours: only flags; the move happens in
            # route(), send_stop_signal() or close(), on the routing thread.
            router = weak_self()
            if router is not None:
                router._on_dead(g, t)

        add(dead)

    def _on_dead(self, g: _Group, t: _Target) -> None:
        with self._lock:
            if g.targets.get(t.conn.parallel_index) is not t:
                return  # removed since
            t.move_due = True
            t.counted = False
            t.stalled_until = time.monotonic() + self.retry_interval
            t.probe = True
            g.relive()
            self._deaths += 1

    def _fail_over_dead(self) -> None:
        """Move what dead instances had not acknowledged to live ones (see the module doc)."""
        self._deaths_seen = self._deaths
        for g in self._groups:
            for t in list(g.targets.values()):
                if t.move_due:
                    self._move_unacked(g, t)

    def _move_unacked(self, g: _Group, t: _Target) -> None:
        t.move_due = False
        if _canonical(self.strategy) not in _MOVABLE:
            return  # hash, broadcast: its producer keeps them, and resends them on its return
        taken = t.reliable.take_unacked()
        moved = 0
        for record in taken:
            if isinstance(record, Packet):
                try:
                    self._send(g, record, record.partition_strategy, False)
                    moved += 1
                    continue
                except RoutingError:
                    pass  # a key of its own, or no live instance: it waits for the instance
            t.held.append(record)
        t.delivered -= moved  # counted where they went instead (each packet at one slot)
        if taken:
            # A failover like a failed put's, even when load_balance had already steered clear
            # of the instance and no put to it ever failed.
            if not t.counted:
                self._failovers += 1
            t.counted = False
            self._failover_event(
                t,
                f"its consumer was declared dead; moved {moved} unacknowledged records to the "
                "group's live instances"
                + (f", holding {len(t.held)} for its return" if t.held else ""),
                moved=moved,
                held=len(t.held),
            )

    def _return_held(self, t: _Target, wait: float) -> None:
        """Put back what was taken from ``t`` for ``t`` alone (its consumer is back)."""
        while t.held:
            self._put_to(t, t.held[0], wait)
            del t.held[0]

    def _stall(self, g: _Group, t: _Target, why: Exception, movable: bool = True) -> None:
        with self._lock:
            first = not t.probe  # a failed probe of a stalled instance is not news
            t.stalled_until = time.monotonic() + self.retry_interval
            t.probe = True
            g.relive()
        if first:
            # Only round robin and load balance may send a packet elsewhere: a key's owner
            # and a broadcast's every instance cannot be stood in for.
            then = (
                f"the group's other instances take its packets, and it is tried again in "
                f"{self.retry_interval:g} s"
                if movable
                else "its packets are never sent to another instance: until it takes one "
                "again, each is tried without waiting and reported as not delivered"
            )
            self._failover_event(t, f"{why}; {then}")

    def _failover_event(self, t: _Target, detail: str, **fields: Any) -> None:
        connection_event(
            "failover",
            queue=t.qd.queue_id,
            peer=t.conn.describe(),
            detail=f"{self.name}: {detail}",
            router=self.name,
            **fields,
        )

    def _recover(self, g: _Group, t: _Target) -> None:
        with self._lock:
            t.stalled_until = 0.0
            t.probe = False
            g.relive()
        connection_event(
            "peer_alive", queue=t.qd.queue_id, peer=t.conn.describe(), router=self.name
        )

    def _readmit(self, now: float) -> None:
        """Stalled instances whose pause is over rejoin (their next put is a probe)."""
        for g in self._groups:
            if len(g.live) == len(g.connected):
                continue
            back: list[_Target] = []
            with self._lock:
                for t in g.targets.values():
                    if t.stalled_until and t.stalled_until <= now:
                        if t.dead:
                            t.stalled_until = now + self.retry_interval  # not back yet
                        else:
                            t.stalled_until = 0.0
                            if t.held:
                                back.append(t)
                g.relive()
            for t in back:
                with contextlib.suppress(*_PUT_FAILURES):
                    self._return_held(t, 0.0)  # the rest on the next look, or at close

    def _refresh_load(self, g: _Group, tracker: Any, now: float) -> None:
        """Read each instance's live load: records not yet reported consumed by its receiver."""
        g.next_refresh = now + self.load_interval
        for p, t in g.targets.items():
            if not t.used:
                continue  # no producer here yet: full() would open a consumer instead
            qd = t.qd
            qd.full()  # reads the credits that arrived: the receiver's latest report
            depth = qd.backlog()
            # Consumed = what we put minus what is not yet consumed; exact while this router is
            # the only one in the process feeding that queue, and kept monotonic otherwise.
            consumed = max(t.delivered - depth, t.consumed)
            t.consumed = consumed
            tracker.observe(p, depth, now, consumed)

    # ------------------------------------------------------------------ end, stats, close
    def send_stop_signal(self) -> int:
        """End of stream to every distinct target queue, once; how many queues were signalled.

        The consumer of a queue fed by N upstream routers needs ``metadata['upstreams'] = N``.
        Connections that share one queue get one end of stream. Raises :class:`NotDelivered`
        naming the queues that could not take it (the others got it).
        """
        self._check_open()
        if self._deaths != self._deaths_seen:
            self._fail_over_dead()
        self._ended = True
        done: list[Connection] = []
        failed: list[str] = []
        # First the targets removed with end_stream=True whose end failed then.
        retiring, self._retiring = self._retiring, []
        ends: list[tuple[Connection, _Target | None]] = [(t.conn, t) for t in retiring]
        ends += [(conn, self._target_of(conn)) for conn in self.connections()]
        for conn, target in ends:
            if conn.queue_key in self._signalled:
                continue
            error = self._end_target(target) if target is not None else self._end_queue(conn)
            if error is None:
                done.append(conn)
            else:
                failed.append(f"{conn.describe()}: {error}")
                if target in retiring:
                    self._retiring.append(target)
        self._stop_signals += len(done)
        if failed:
            raise NotDelivered(
                f"{self.name}: end of stream not delivered to " + "; ".join(failed),
                tuple(done),
                tuple(failed),
            )
        return len(done)

    def _target_of(self, conn: Connection) -> _Target | None:
        g = self._group(conn.broadcast_index)
        t = None if g is None else g.targets.get(conn.parallel_index)
        return t if t is not None and t.conn is conn else None

    def statistics(self) -> RouterStatistics:
        delivered = dict(self._removed_delivered)
        stalled = []
        for g in self._groups:
            for p, t in g.targets.items():
                delivered[(g.index, p)] = delivered.get((g.index, p), 0) + t.delivered
                if t.stalled_until:
                    stalled.append((g.index, p))
        by_strategy = dict(self._by_strategy)
        default = self._routed - sum(by_strategy.values())
        merged: dict[str, int] = {}
        for name, n in ((self.strategy, default), *by_strategy.items()):
            key = _canonical(name)
            merged[key] = merged.get(key, 0) + n
        queues: dict[tuple[str, str], QueueDescriptor] = {}
        for g in self._groups:
            for t in g.targets.values():
                queues.setdefault((t.qd.queue_type, t.qd.queue_id), t.qd)
        totals = dict.fromkeys(("bytes_sent", "depth", "maxsize", "credit_waits", "retransmits"), 0)
        for qd in queues.values():
            if qd._existing_handle() is None:
                continue  # not opened here yet: nothing to add (and no handle to create)
            try:
                qs = qd.statistics()
            except SageZmqError:
                continue  # a queue that cannot report (closed elsewhere) adds nothing
            for name in totals:
                totals[name] += getattr(qs, name)
        return RouterStatistics(
            **totals,
            uptime=time.monotonic() - self._made_at,
            strategy=self.strategy,
            routed=self._routed,
            delivered=MappingProxyType(dict(sorted(delivered.items()))),
            failures=self._failures,
            failovers=self._failovers,
            by_strategy=MappingProxyType({k: v for k, v in merged.items() if v}),
            stop_signals=self._stop_signals,
            connections=sum(len(g.targets) for g in self._groups),
            stalled=tuple(stalled),
        )

    def close(self, timeout: float | None = None) -> None:
        """Flush every queue this router put to, then refuse further packets.

        The descriptors belong to the caller and stay open. Raises :class:`RoutingError` if a
        flush failed (after flushing the others).
        """
        if self._closed:
            return
        if self._deaths != self._deaths_seen and not self._ended:
            self._fail_over_dead()
        self._closed = True
        errors: list[str] = []
        seen: set[tuple[str, str]] = set()
        wait = self.timeout if timeout is None else timeout
        for g in self._groups:
            for t in g.targets.values():
                if t.held:
                    try:
                        self._return_held(t, wait)
                    except SageZmqError as exc:
                        errors.append(
                            f"{t.conn.describe()}: {len(t.held)} records taken back from it "
                            f"when its consumer died were not delivered: {exc}"
                        )
                key = t.conn.queue_key
                if not t.used or key in seen:
                    continue
                seen.add(key)
                try:
                    t.qd.flush(wait)
                except SageZmqError as exc:
                    errors.append(f"{t.conn.describe()}: {exc}")
        if errors:
            raise RoutingError(f"{self.name}: flush on close failed: " + "; ".join(errors))

    def __enter__(self) -> BaseRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, strategy={self.strategy!r}, "
            f"connections={sum(len(g.targets) for g in self._groups)})"
        )


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise RoutingError(
            f"strategy name must be a str, got {type(name).__name__}; "
            f"known: {', '.join(STRATEGY_NAMES)}"
        )
    norm = name.strip().lower().replace("-", "_").replace(" ", "_")
    if norm not in STRATEGY_NAMES:
        close = difflib.get_close_matches(norm, STRATEGY_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RoutingError(
            f"unknown routing strategy {name!r}{hint}; known: {', '.join(STRATEGY_NAMES)}"
        )
    return norm


class RoundRobinRouter(BaseRouter):
    """Each packet to the next live instance of each group."""

    strategy_name = "round_robin"


class HashRouter(BaseRouter):
    """Each packet to the instance owning its ``partition_key`` (stable key groups)."""

    strategy_name = "hash"


class BroadcastRouter(BaseRouter):
    """Each packet to every instance of each group."""

    strategy_name = "broadcast"


class LoadBalanceRouter(BaseRouter):
    """Each packet to the least-loaded live instance, from receiver-reported load.

    ``mode`` is ``"predictive"`` (EWMA trend and service rate) or ``"instantaneous"`` (current
    depth only); ``half_life`` (seconds) sets how fast the EWMAs forget.
    """

    strategy_name = "load_balance"

    def __init__(
        self,
        ctx: Any = None,
        *,
        mode: str = "predictive",
        half_life: float = 0.25,
        load_tracking: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        tracking = {"mode": mode, "half_life": half_life, **(load_tracking or {})}
        super().__init__(ctx, load_tracking=tracking, **options)


_ROUTERS: dict[str, type[BaseRouter]] = {
    "round_robin": RoundRobinRouter,
    "hash": HashRouter,
    "broadcast": BroadcastRouter,
    "load_balance": LoadBalanceRouter,
}


def make_router(
    config_or_name: str | Config | Mapping[str, Any] | None = None,
    ctx: Any = None,
    **options: Any,
) -> BaseRouter:
    """A router by strategy name, or as a Config (or config dict) says.

    A dict may be a whole config or just the router section (``{"strategy": "hash"}``).
    ``options`` go to the router's constructor.
    """
    if isinstance(config_or_name, str):
        return _ROUTERS[_canonical(config_or_name)](ctx, **options)
    cfg = _resolve_config(config_or_name)
    cls = _ROUTERS[_canonical(cfg.communication.router.strategy)]
    return cls(ctx, config=cfg, **options)
