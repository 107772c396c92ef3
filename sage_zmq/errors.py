"""The flat family of errors.

Callers catch by meaning: every error raised by sage-zmq is a :class:`SageZmqError`;
``Empty`` and ``Full`` are also ``queue.Empty`` / ``queue.Full`` so that existing worker loops
written against :mod:`queue` keep working unchanged.
"""

from __future__ import annotations

import queue as _stdlib_queue


class SageZmqError(Exception):
    """Base of every error raised by sage-zmq."""


class ConfigError(SageZmqError, ValueError):
    """A configuration value or key is wrong; the message names the key path."""


class DescriptorError(SageZmqError, ValueError):
    """A queue descriptor is malformed: unknown type, bad endpoint, bad metadata."""


class InvalidArgument(SageZmqError, ValueError):
    """A call got an argument it cannot use (e.g. ``get(timeout=-1)``); the message names it."""


class InvalidArgumentType(InvalidArgument, TypeError):
    """An argument of the wrong type (e.g. ``get(timeout="1")``): a ``TypeError`` as well."""


class Empty(SageZmqError, _stdlib_queue.Empty):
    """``get`` found nothing before its timeout."""


class Full(SageZmqError, _stdlib_queue.Full):
    """``put`` found no room (no credit from the consumer) before its timeout."""


class EncodeError(SageZmqError, TypeError):
    """A record could not be encoded for the wire; the message names its type.

    Raised by ``put``: ``accepted`` tells whether the record of that call was queued (``True``:
    do not put it again; ``False``: it was refused, or was itself among those left out), and
    ``records_dropped`` how many records were left out, that one included. Raised by
    ``close``/``flush``: ``records_dropped`` counts what was left out since the last report.
    """

    accepted: bool
    records_dropped: int

    def __init__(self, message: str = "", *, accepted: bool = False, records_dropped: int = 0):
        super().__init__(message)
        self.accepted = accepted
        self.records_dropped = records_dropped


class DecodeError(SageZmqError, ValueError):
    """Bytes from the wire are not a valid frame; the frame was rejected."""


class DeliveryError(SageZmqError):
    """Records accepted by ``put`` could not be confirmed as delivered.

    ``undelivered``: records (an unconfirmed end of stream counts as one) the consumer did not
    confirm receiving. ``may_be_lost``: those plus the records it confirmed receiving but had
    not consumed at its last report, which are gone too if the consumer died.
    """

    def __init__(self, message: str, undelivered: int = 0, may_be_lost: int | None = None) -> None:
        super().__init__(message)
        self.undelivered = undelivered
        self.may_be_lost = undelivered if may_be_lost is None else may_be_lost


class QueueClosed(SageZmqError):
    """The queue was closed in this process, while or before this call waited on it.

    ``close()`` from another thread ends a blocked ``get``/``put`` with this error (the record
    of a blocked ``put`` was not accepted). A later call through a descriptor opens the queue's
    end again, as the first call did (a descriptor is a value, not a connection).
    """


class RoutingError(SageZmqError):
    """A router could not deliver a packet to any connection that should receive it."""


class SecurityError(SageZmqError):
    """Authentication or a security policy refused an operation."""


class MissingDependency(SageZmqError, ImportError):
    """An optional extra is needed; the message says what to install."""


__all__ = [
    "ConfigError",
    "DecodeError",
    "DeliveryError",
    "DescriptorError",
    "Empty",
    "EncodeError",
    "Full",
    "InvalidArgument",
    "InvalidArgumentType",
    "MissingDependency",
    "QueueClosed",
    "RoutingError",
    "SageZmqError",
    "SecurityError",
]
