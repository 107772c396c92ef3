"""``Connection``: one downstream instance's input queue, as a router sees it.

A downstream operator is a *group* (``broadcast_index``); its parallel instances are told apart
by ``parallel_index``. ``target_handle`` is whatever the caller holds for the instance: a
:class:`~sage_zmq.descriptor.QueueDescriptor`, or a task object exposing one as ``input_qd`` or
``queue_descriptor``. Connections are plain values: they pickle when the handle does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sage_zmq.descriptor import QueueDescriptor
from sage_zmq.errors import RoutingError

__all__ = ["Connection", "resolve_descriptor"]

_HANDLE_ATTRS = ("input_qd", "queue_descriptor")


def resolve_descriptor(handle: object) -> QueueDescriptor:
    """The input queue descriptor behind ``handle`` (a descriptor or an object exposing one)."""
    if isinstance(handle, QueueDescriptor):
        return handle
    for attr in _HANDLE_ATTRS:
        qd = getattr(handle, attr, None)
        if isinstance(qd, QueueDescriptor):
            return qd
    raise RoutingError(
        f"target_handle {type(handle).__module__}.{type(handle).__qualname__} is not a "
        "QueueDescriptor and exposes none as 'input_qd' or 'queue_descriptor'; pass "
        "queue_descriptor=... or a handle with one of those attributes"
    )


def _index(name: str, value: object) -> int:
    if type(value) is not int or value < 0:
        raise RoutingError(f"Connection {name} must be an int >= 0, got {value!r}")
    return value


@dataclass(frozen=True, eq=False)
class Connection:
    """Where a router sends one downstream instance's share of the stream.

    ``target_input_index`` is written into every packet delivered through this connection as
    ``Packet.input_index`` (which input of the downstream operator it feeds). Two connections
    are equal when they name the same slot (group, instance) and the same queue.
    """

    broadcast_index: int
    parallel_index: int
    target_name: str
    target_handle: Any = field(default=None, repr=False)
    target_input_index: int = 0
    queue_descriptor: QueueDescriptor = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _index("broadcast_index", self.broadcast_index)
        _index("parallel_index", self.parallel_index)
        _index("target_input_index", self.target_input_index)
        if not isinstance(self.target_name, str) or not self.target_name:
            raise RoutingError(
                f"Connection target_name must be a non-empty str, got {self.target_name!r}"
            )
        qd = self.queue_descriptor
        if qd is None:
            if self.target_handle is None:
                raise RoutingError(
                    f"Connection to {self.target_name!r} needs target_handle= (a "
                    "QueueDescriptor or an object with 'input_qd') or queue_descriptor="
                )
            qd = resolve_descriptor(self.target_handle)
        elif not isinstance(qd, QueueDescriptor):
            raise RoutingError(
                f"Connection queue_descriptor must be a QueueDescriptor, got {type(qd).__name__}"
            )
        object.__setattr__(self, "queue_descriptor", qd)

    @property
    def slot(self) -> tuple[int, int]:
        """``(broadcast_index, parallel_index)``: the router holds one connection per slot."""
        return (self.broadcast_index, self.parallel_index)

    @property
    def queue_key(self) -> tuple[str, str]:
        """The queue as this process's runtime keys it: descriptors with one key share a socket."""
        qd = self.queue_descriptor
        return (qd.queue_type, str(qd.metadata.get("endpoint", qd.queue_id)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Connection):
            return NotImplemented
        return (
            self.slot == other.slot
            and self.target_name == other.target_name
            and self.target_input_index == other.target_input_index
            and self.queue_descriptor == other.queue_descriptor
        )

    def __hash__(self) -> int:
        return hash((self.broadcast_index, self.parallel_index, self.target_name))

    def describe(self) -> str:
        """``'name' [group.instance]`` for messages."""
        return f"{self.target_name!r} [{self.broadcast_index}.{self.parallel_index}]"
