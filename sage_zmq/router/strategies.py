"""Routing strategies: pure objects that pick target instances for one packet.

A strategy never touches a socket. The router calls ``select(live, key, all_instances)`` once per
packet and sends to every instance in the returned tuple:

* ``live`` -- the ``parallel_index`` values of the downstream instances that are up now, in
  ascending order (other orders work; round robin then follows the given order);
* ``key`` -- the packet's partition key (only :class:`HashStrategy` needs it);
* ``all_instances`` -- every configured instance of the group, alive or not (only hash uses it).

An empty tuple means "nobody may take this packet now"; the router decides whether to hold the
packet until the target comes back or to raise :class:`~sage_zmq.errors.RoutingError`.
Strategies are not thread-safe: one strategy object per router (per sending thread).
"""

from __future__ import annotations

import contextlib
import difflib
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import mmh3

from sage_zmq.errors import RoutingError
from sage_zmq.router.keys import KEY_GROUP_DEFAULT, key_bytes
from sage_zmq.router.load import LoadTracker

_hash = mmh3.hash
_NOTHING = object()


@runtime_checkable
class Strategy(Protocol):
    """Chooses the target instances of one packet."""

    name: str
    #: True when one packet may go to several instances (the router copies it).
    fanout: bool

    def select(
        self,
        live: Sequence[int],
        key: object | None = None,
        all_instances: Sequence[int] | None = None,
    ) -> tuple[int, ...]:
        """Target instances for a packet; ``()`` when none may take it now."""
        ...


class RoundRobinStrategy:
    """Each packet to the next live instance, in turn.

    Fair when ``live`` changes between calls: the cursor remembers the last instance chosen,
    so after an addition or removal the cycle continues from that instance's successor.
    """

    __slots__ = ("_last", "_pos")
    name = "round_robin"
    fanout = False

    def __init__(self) -> None:
        self._pos = 0
        self._last: object = _NOTHING

    def select(
        self,
        live: Sequence[int],
        key: object | None = None,
        all_instances: Sequence[int] | None = None,
    ) -> tuple[int, ...]:
        """The next live instance after the previously chosen one."""
        n = len(live)
        if not n:
            return ()
        p = self._pos
        if p < n and live[p] == self._last:
            p += 1
        else:
            # Membership changed: resync on the last choice. If it was removed, its
            # successor has shifted into its old position, which is exactly ``p``.
            with contextlib.suppress(ValueError):
                p = live.index(self._last) + 1
        if p >= n:
            p = 0
        inst = live[p]
        self._pos = p
        self._last = inst
        return (inst,)


class HashStrategy:
    """Each key always to the same instance, by :func:`~sage_zmq.router.keys.instance_for_key`.

    The key groups are spread over the group's *configured* instances (``all_instances``,
    sorted), so a key keeps its owner while instances come and go. When the owner is not
    live, :meth:`select` returns ``()`` rather than re-mapping the key elsewhere (that would
    split a key's state across instances); the router then holds the packet until the owner
    is back, or raises :class:`~sage_zmq.errors.RoutingError`. If ``all_instances`` is not
    given, ``live`` is taken as the configuration, so keys move when membership changes.
    """

    __slots__ = ("_cfg_key", "_cfg_sorted", "_maxp", "_p")
    name = "hash"
    fanout = False

    def __init__(self, max_parallelism: int = KEY_GROUP_DEFAULT) -> None:
        if type(max_parallelism) is not int or max_parallelism < 1:
            raise RoutingError(
                f"max_parallelism must be an int >= 1, got {max_parallelism!r}; "
                f"the default is {KEY_GROUP_DEFAULT}"
            )
        self._maxp = max_parallelism
        self._cfg_key: tuple[int, ...] | None = None
        self._cfg_sorted: tuple[int, ...] = ()
        self._p = 0

    @property
    def max_parallelism(self) -> int:
        return self._maxp

    def _configure(self, instances: Sequence[int]) -> tuple[int, ...]:
        cfg = instances if type(instances) is tuple else tuple(instances)
        if cfg is self._cfg_key or cfg == self._cfg_key:
            return self._cfg_sorted
        ordered = tuple(sorted(cfg))
        if not ordered:
            raise RoutingError("hash routing needs at least one configured instance, got none")
        if len(set(ordered)) != len(ordered):
            raise RoutingError(f"configured instances contain duplicates: {list(cfg)}")
        if len(ordered) > self._maxp:
            raise RoutingError(
                f"{len(ordered)} instances exceed max_parallelism={self._maxp}; "
                "raise max_parallelism (it must stay fixed for the life of the keyed state)"
            )
        self._cfg_key = cfg
        self._cfg_sorted = ordered
        self._p = len(ordered)
        return ordered

    def target(self, key: object, all_instances: Sequence[int]) -> int:
        """The instance that owns ``key`` among ``all_instances``, alive or not."""
        ordered = self._configure(all_instances)
        maxp = self._maxp
        return ordered[(_hash(key_bytes(key), 0, False) % maxp) * self._p // maxp]

    def select(
        self,
        live: Sequence[int],
        key: object | None = None,
        all_instances: Sequence[int] | None = None,
    ) -> tuple[int, ...]:
        """``(owner,)`` if the key's owner is live, else ``()``."""
        if all_instances is None and not live:
            return ()
        ordered = self._configure(live if all_instances is None else all_instances)
        maxp = self._maxp
        inst = ordered[(_hash(key_bytes(key), 0, False) % maxp) * self._p // maxp]
        return (inst,) if inst in live else ()


class BroadcastStrategy:
    """Every packet to every live instance."""

    __slots__ = ()
    name = "broadcast"
    fanout = True

    def select(
        self,
        live: Sequence[int],
        key: object | None = None,
        all_instances: Sequence[int] | None = None,
    ) -> tuple[int, ...]:
        """All of ``live``."""
        return live if type(live) is tuple else tuple(live)


class LoadBalanceStrategy:
    """Each packet to the live instance with the least load per its :class:`LoadTracker`.

    Ties go round robin (the tracker rotates among equals). Choosing an instance counts as a
    send (``tracker.note_sent``) so consecutive packets between two load reports spread out;
    pass ``note_on_select=False`` if the router calls ``note_sent`` itself after the send.
    ``clock`` gives the ``now`` passed to the tracker (monotonic seconds).
    """

    __slots__ = ("_clock", "_note", "tracker")
    name = "load_balance"
    fanout = False

    def __init__(
        self,
        predictor: LoadTracker | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        note_on_select: bool = True,
    ) -> None:
        self.tracker = predictor if predictor is not None else LoadTracker()
        self._clock = clock
        self._note = note_on_select

    def select(
        self,
        live: Sequence[int],
        key: object | None = None,
        all_instances: Sequence[int] | None = None,
    ) -> tuple[int, ...]:
        """``(least loaded live instance,)``, or ``()`` when nothing is live."""
        if not live:
            return ()
        inst = self.tracker.least_loaded(live, self._clock())
        if self._note:
            self.tracker.note_sent(inst)
        return (inst,)


_FACTORIES: dict[str, Callable[..., Strategy]] = {
    "round_robin": RoundRobinStrategy,
    "hash": HashStrategy,
    "broadcast": BroadcastStrategy,
    "load_balance": LoadBalanceStrategy,
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_FACTORIES)


def make_strategy(name: str, **options: object) -> Strategy:
    """A new strategy by name; ``options`` go to its constructor.

    Names: ``round_robin``, ``hash`` (``max_parallelism=``), ``broadcast``,
    ``load_balance`` (``predictor=``, ``clock=``, ``note_on_select=``). ``-`` and case are
    forgiven (``"Round-Robin"`` works).
    """
    if not isinstance(name, str):
        raise RoutingError(
            f"strategy name must be a str, got {type(name).__name__}; "
            f"known: {', '.join(STRATEGY_NAMES)}"
        )
    norm = name.strip().lower().replace("-", "_").replace(" ", "_")
    factory = _FACTORIES.get(norm)
    if factory is None:
        close = difflib.get_close_matches(norm, STRATEGY_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RoutingError(
            f"unknown routing strategy {name!r}{hint}; known: {', '.join(STRATEGY_NAMES)}"
        )
    try:
        return factory(**options)
    except TypeError as exc:
        raise RoutingError(f"bad options for strategy {norm!r}: {exc}") from None


__all__ = [
    "STRATEGY_NAMES",
    "BroadcastStrategy",
    "HashStrategy",
    "LoadBalanceStrategy",
    "RoundRobinStrategy",
    "Strategy",
    "make_strategy",
]
