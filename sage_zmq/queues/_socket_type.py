"""What ``shm`` and ``tcp`` share: codec and socket options from config and metadata."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sage_zmq.config import current_config
from sage_zmq.queues._zmq import (
    DealerLink,
    RouterInlet,
    SocketOptions,
    claim_prebound,
)
from sage_zmq.queues.base import ConsumerInlet, ProducerLink, QueueType
from sage_zmq.wire.codec import Codec, DecodeLimits

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor


class SocketQueueType(QueueType):
    """A queue carried by a DEALER/ROUTER pair."""

    def codec(self, descriptor: QueueDescriptor) -> Codec:
        cfg = current_config()
        meta = descriptor.metadata
        size = int(meta.get("max_message_size", cfg.performance.max_message_size))
        return Codec(
            allow_pickle=bool(meta.get("allow_pickle", cfg.security.allow_pickle)),
            limits=DecodeLimits(max_frame_bytes=size, max_decompressed_bytes=size),
            zero_copy=bool(meta.get("zero_copy", cfg.performance.zero_copy)),
        )

    def socket_options(self, descriptor: QueueDescriptor) -> SocketOptions:
        cfg = current_config()
        meta = descriptor.metadata
        return SocketOptions(
            max_message_size=int(meta.get("max_message_size", cfg.performance.max_message_size)),
            curve=self.curve(descriptor, cfg),
        )

    def curve(self, descriptor: QueueDescriptor, cfg: Any) -> Any:
        return None

    def compress(self, descriptor: QueueDescriptor) -> bool:
        setting = descriptor.metadata.get("compression", current_config().performance.compression)
        return setting is True

    def bind_endpoint(self, descriptor: QueueDescriptor) -> str:
        return str(descriptor.metadata.get("bind", descriptor.metadata["endpoint"]))

    def open_producer_link(self, descriptor: QueueDescriptor) -> ProducerLink:
        return DealerLink(
            str(descriptor.metadata["endpoint"]),
            self.codec(descriptor),
            self.socket_options(descriptor),
            compress=self.compress(descriptor),
            queue_id=descriptor.queue_id,
        )

    def open_consumer_inlet(self, descriptor: QueueDescriptor) -> ConsumerInlet:
        endpoint = str(descriptor.metadata["endpoint"])
        inlet = claim_prebound(endpoint)
        if inlet is None:
            inlet = RouterInlet(
                self.bind_endpoint(descriptor),
                self.codec(descriptor),
                self.socket_options(descriptor),
                queue_id=descriptor.queue_id,
            )
        return inlet
