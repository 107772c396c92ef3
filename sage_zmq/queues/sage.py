"""``sage``: the reliable queue, DEALER producers and a ROUTER consumer over ipc or tcp.

Always on: windowed acks, retransmission, in-order dedup, heartbeats and reconnects (see
:mod:`sage_zmq.flow.reliable` and ``transports/PROTOCOL.md`` §5). ``metadata["persist"] = DIR``
adds a producer write-ahead log and a consumer dedup file under ``DIR``.

Endpoint: without one, a private ipc path is derived as for ``shm``; with
``metadata["transport"] = "tcp"`` the creating process binds ``127.0.0.1`` on a free port as
for ``tcp`` (and so becomes the consumer). An explicit ``ipc://`` or ``tcp://`` endpoint is used
as given. Reliability options (``heartbeat_interval``, ``liveness``, ``reconnect_initial``,
``reconnect_max``, ``ack_timeout``, ``fsync``, ``fsync_interval``, ``producer_id``) may be
given in metadata and override ``reliability.*`` from the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from sage_zmq.errors import DescriptorError
from sage_zmq.flow.reliable import ReliabilitySettings
from sage_zmq.queues._socket_type import wants_reliability
from sage_zmq.queues._zmq import check_ipc_endpoint, derive_ipc_endpoint
from sage_zmq.queues.base import Capabilities
from sage_zmq.queues.tcp import TcpQueueType

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor

_TRANSPORTS = ("ipc", "tcp")


class SageQueueType(TcpQueueType):
    name: ClassVar[str] = "sage"
    capabilities: ClassVar[Capabilities] = Capabilities(
        cross_process=True,
        cross_host=True,
        reliable=True,
        extra="acks, retransmit, dedup, heartbeats, reconnect; persist=DIR adds a WAL",
    )
    reliable_by_default: ClassVar[bool] = True
    metadata_keys: ClassVar[frozenset[str]] = TcpQueueType.metadata_keys | {"transport"}

    def validate(self, descriptor: QueueDescriptor) -> None:
        # A restored descriptor (from_dict/from_json) carries either transport's endpoint.
        endpoint = descriptor.metadata.get("endpoint")
        if isinstance(endpoint, str) and endpoint.startswith("ipc://"):
            check_ipc_endpoint(endpoint)
            return
        if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
            raise DescriptorError(
                f"queue_type 'sage' needs an ipc:// or tcp:// endpoint, got {endpoint!r}"
            )
        super().validate(descriptor)

    def prepare(self, descriptor: QueueDescriptor) -> dict[str, Any]:
        meta = dict(descriptor.metadata)
        transport = meta.get("transport")
        if transport is not None and transport not in _TRANSPORTS:
            raise DescriptorError(
                f"metadata['transport'] for queue_type 'sage' must be 'ipc' or 'tcp', "
                f"got {transport!r}"
            )
        wants_reliability(meta)  # validates 'ack'
        ReliabilitySettings.from_metadata(meta)  # bad options fail here, not at first put
        endpoint = meta.get("endpoint")
        if endpoint is None:
            if transport == "tcp":
                return super().prepare(descriptor)
            meta["endpoint"] = derive_ipc_endpoint(descriptor.queue_id)
            return meta
        if isinstance(endpoint, str) and endpoint.startswith("ipc://"):
            if transport == "tcp":
                raise DescriptorError(
                    f"metadata['transport'] is 'tcp' but the endpoint {endpoint!r} is ipc; "
                    "drop one of them"
                )
            check_ipc_endpoint(endpoint)
            return meta
        if isinstance(endpoint, str) and endpoint.startswith("tcp://"):
            if transport == "ipc":
                raise DescriptorError(
                    f"metadata['transport'] is 'ipc' but the endpoint {endpoint!r} is tcp; "
                    "drop one of them"
                )
            return super().prepare(descriptor)
        raise DescriptorError(
            f"queue_type 'sage' needs an ipc:// or tcp:// endpoint, got {endpoint!r}; or leave "
            "endpoint out (a private ipc path, or tcp with metadata['transport'] = 'tcp')"
        )
