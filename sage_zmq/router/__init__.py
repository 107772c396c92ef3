"""Routing: send each record to downstream operator instances through their queue descriptors.

:class:`Connection` names one downstream instance; a router (:func:`make_router`, or one of the
classes) picks the instance(s) per packet with a strategy from :mod:`.strategies`.
"""

from sage_zmq.router.connection import Connection
from sage_zmq.router.router import (
    BaseRouter,
    BroadcastRouter,
    HashRouter,
    LoadBalanceRouter,
    NotDelivered,
    RoundRobinRouter,
    RouterStatistics,
    make_router,
)

__all__ = [
    "BaseRouter",
    "BroadcastRouter",
    "Connection",
    "HashRouter",
    "LoadBalanceRouter",
    "NotDelivered",
    "RoundRobinRouter",
    "RouterStatistics",
    "make_router",
]
