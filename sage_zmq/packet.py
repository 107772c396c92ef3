"""The records that travel through queues: :class:`Packet` and :class:`EndOfStream`.

Any msgpack-able value can be a record; a ``Packet`` adds what routing and observability need
(input index, partition key and strategy, headers, creation time) around a payload.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["EndOfStream", "Packet"]


class Packet:
    """A payload plus routing metadata.

    ``partition_key`` may be any str/bytes/int/float/bool; falsy keys (``0``, ``""``) are keys.
    ``partition_strategy`` on a packet overrides the router's strategy for that packet.
    ``timestamp`` is wall-clock seconds at creation; queues use it for end-to-end latency.
    """

    __slots__ = (
        "headers",
        "input_index",
        "partition_key",
        "partition_strategy",
        "payload",
        "timestamp",
    )

    def __init__(
        self,
        payload: Any,
        input_index: int = 0,
        partition_key: Any = None,
        partition_strategy: str | None = None,
        headers: dict[str, Any] | None = None,
        timestamp: float | None = None,
    ) -> None:
        self.payload = payload
        self.input_index = input_index
        self.partition_key = partition_key
        self.partition_strategy = partition_strategy
        self.headers = headers
        self.timestamp = time.time() if timestamp is None else timestamp

    def copy_with(self, **changes: Any) -> Packet:
        """A shallow copy with some fields replaced (headers are copied, not shared)."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        if fields["headers"] is not None:
            fields["headers"] = dict(fields["headers"])
        fields.update(changes)
        return Packet(**fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Packet):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable value

    def __repr__(self) -> str:
        key = "" if self.partition_key is None else f", partition_key={self.partition_key!r}"
        return f"Packet(payload={self.payload!r}, input_index={self.input_index}{key})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Packet, tuple(getattr(self, n) for n in _PACKET_INIT_ORDER))


_PACKET_INIT_ORDER = (
    "payload",
    "input_index",
    "partition_key",
    "partition_strategy",
    "headers",
    "timestamp",
)


class EndOfStream:
    """End of one upstream's stream.

    A producer signals its end with ``qd.put(EndOfStream())``. The consumer's ``get`` returns an
    ``EndOfStream`` only after every upstream (``metadata["upstreams"]``) has ended, and from
    then on at once, like a file at EOF.
    """

    __slots__ = ("source",)

    def __init__(self, source: str | None = None) -> None:
        self.source = source

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EndOfStream)

    def __hash__(self) -> int:
        return hash(EndOfStream)

    def __repr__(self) -> str:
        return "EndOfStream()" if self.source is None else f"EndOfStream(source={self.source!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (EndOfStream, (self.source,))
