"""sage-zmq: the communication layer of the SAGE streaming dataflow runtime, on ZeroMQ.

The public face: a :class:`QueueDescriptor` names a queue (``local``, ``shm``, ``tcp``,
``sage``, ``ray``) that any process holding it can ``put`` to or ``get`` from; records are
plain msgpack values, :class:`Packet`, :class:`EndOfStream` or numpy arrays.
"""

from typing import TYPE_CHECKING

from sage_zmq._runtime import shutdown
from sage_zmq.config import Config, load_config
from sage_zmq.descriptor import QueueDescriptor, queue_types, register_queue_type
from sage_zmq.errors import (
    ConfigError,
    DecodeError,
    DeliveryError,
    DescriptorError,
    Empty,
    EncodeError,
    Full,
    InvalidArgument,
    InvalidArgumentType,
    MissingDependency,
    QueueClosed,
    RoutingError,
    SageZmqError,
    SecurityError,
)
from sage_zmq.packet import EndOfStream, Packet
from sage_zmq.queues.base import Capabilities, QueueStatistics

__version__ = "0.1.0"

if TYPE_CHECKING:  # imported lazily at run time (see __getattr__); typed like any other name
    from sage_zmq.router.connection import Connection


def __getattr__(name: str) -> object:
    # Routing pulls in more modules; import it only when asked for.
    if name == "Connection":
        from sage_zmq.router.connection import Connection

        return Connection
    raise AttributeError(f"module 'sage_zmq' has no attribute {name!r}")


__all__ = [
    "Capabilities",
    "Config",
    "ConfigError",
    "Connection",
    "DecodeError",
    "DeliveryError",
    "DescriptorError",
    "Empty",
    "EncodeError",
    "EndOfStream",
    "Full",
    "InvalidArgument",
    "InvalidArgumentType",
    "MissingDependency",
    "Packet",
    "QueueClosed",
    "QueueDescriptor",
    "QueueStatistics",
    "RoutingError",
    "SageZmqError",
    "SecurityError",
    "load_config",
    "queue_types",
    "register_queue_type",
    "shutdown",
]
