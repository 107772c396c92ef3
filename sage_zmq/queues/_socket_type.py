"""What ``shm``, ``tcp`` and ``sage`` share: codec and socket options from config and metadata.

With ``metadata["ack"] = True`` or ``metadata["persist"] = DIR`` (always, for ``sage``) the
ends are the reliable ones of :mod:`sage_zmq.flow.reliable`, and the sockets get ZMTP
heartbeats and reconnect intervals from ``reliability.*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from sage_zmq.config import current_config
from sage_zmq.errors import DescriptorError
from sage_zmq.queues._zmq import (
    DealerLink,
    RouterInlet,
    SocketOptions,
    bound_by_here,
    claim_prebound,
    prebound_queue,
)
from sage_zmq.queues.base import (
    COMMON_METADATA_KEYS,
    ConsumerInlet,
    ProducerLink,
    QueueType,
    check_flag,
)
from sage_zmq.wire.codec import Codec, DecodeLimits, compression_mode

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor


def wants_reliability(metadata: dict[str, Any]) -> bool:
    """True when queue metadata asks for acks (``ack: True``) or persistence.

    Here rather than in :mod:`sage_zmq.flow.reliable` so that a plain queue decides without
    importing the reliable layer (tens of ms at a worker's first put).
    """
    ack = check_flag("ack", metadata.get("ack", False))
    return ack or metadata.get("persist") is not None


RELIABILITY_TIMING_KEYS = (
    # The reliability.* options a descriptor may override; here, not in the reliable layer,
    # so that a plain queue knows its metadata keys without importing that layer.
    "heartbeat_interval",
    "liveness",
    "reconnect_initial",
    "reconnect_max",
    "ack_timeout",
    "max_in_flight",
    "fsync",
    "fsync_interval",
)
RELIABILITY_METADATA_KEYS = frozenset(
    {
        *RELIABILITY_TIMING_KEYS,
        "persist",
        "producer_id",
    }
)


class SocketQueueType(QueueType):
    """A queue carried by a DEALER/ROUTER pair."""

    consumer_binds: ClassVar[bool] = True

    def endpoint_owner(self, descriptor: QueueDescriptor) -> str | None:
        return prebound_queue(str(descriptor.metadata.get("endpoint")))

    reliable_by_default: ClassVar[bool] = False
    metadata_keys: ClassVar[frozenset[str]] = (
        COMMON_METADATA_KEYS
        | RELIABILITY_METADATA_KEYS
        | {
            "ack",
            "allow_pickle",
            "bind",
            "bound_by",
            "compression",
            "compression_min_bytes",
            "curve",
            "max_message_size",
            "zero_copy",
        }
    )

    def reliable(self, descriptor: QueueDescriptor) -> bool:
        return self.reliable_by_default or wants_reliability(descriptor.metadata)

    def make_producer(self, descriptor: QueueDescriptor) -> Any:
        if self.reliable(descriptor):
            from sage_zmq.flow.reliable import make_reliable_producer

            return make_reliable_producer(self, descriptor)
        return super().make_producer(descriptor)

    def make_consumer(self, descriptor: QueueDescriptor) -> Any:
        if self.reliable(descriptor):
            from sage_zmq.flow.reliable import make_reliable_consumer

            return make_reliable_consumer(self, descriptor)
        return super().make_consumer(descriptor)

    def codec(self, descriptor: QueueDescriptor) -> Codec:
        cfg = current_config()
        meta = descriptor.metadata
        size = int(meta.get("max_message_size", cfg.performance.max_message_size))
        allow_pickle = check_flag(
            "allow_pickle", meta.get("allow_pickle", cfg.security.allow_pickle)
        )
        if allow_pickle:
            # Pickle runs the sender's code: only for CURVE-authenticated or host-local links.
            from sage_zmq import security

            local = security.is_local_endpoint(meta.get("endpoint"), self.name)
            paths = security.curve_paths(meta, cfg, default_on=not local)
            where = f"queue {descriptor.queue_id!r} ({meta.get('endpoint') or self.name})"
            security.check_pickle_policy(allow_pickle, curve=paths, local=local, where=where)
        codec = Codec(
            allow_pickle=allow_pickle,
            limits=DecodeLimits(max_frame_bytes=size, max_decompressed_bytes=size),
            zero_copy=check_flag("zero_copy", meta.get("zero_copy", cfg.performance.zero_copy)),
        )
        codec.compression_min_bytes = int(
            meta.get("compression_min_bytes", cfg.performance.compression_min_bytes)
        )
        return codec

    def socket_options(self, descriptor: QueueDescriptor) -> SocketOptions:
        cfg = current_config()
        meta = descriptor.metadata
        max_size = int(meta.get("max_message_size", cfg.performance.max_message_size))
        curve = self.curve(descriptor, cfg)
        spin = cfg.performance.spin_wait
        if not self.reliable(descriptor):
            return SocketOptions(max_message_size=max_size, spin_wait=spin, curve=curve)
        from sage_zmq.flow.reliable import ReliabilitySettings

        t = ReliabilitySettings.from_metadata(meta).timing
        return SocketOptions(
            max_message_size=max_size,
            # libzmq's own retry of a connection that failed or broke: 0.1 s at first (a
            # consumer that binds after its producers connected gets their queued frames at
            # the next retry, not reconnect_initial later), doubling up to reconnect_max.
            # reconnect_initial paces the reliable layer's recreation of a dead peer's socket.
            reconnect_ivl_ms=max(1, round(min(0.1, t.reconnect_initial) * 1000)),
            reconnect_ivl_max_ms=max(1, round(t.reconnect_max * 1000)),
            heartbeat_ivl_ms=max(1, round(t.heartbeat_interval * 1000)),
            heartbeat_timeout_ms=max(1, round(t.heartbeat_interval * t.liveness * 1000)),
            spin_wait=spin,
            curve=curve,
        )

    def curve(self, descriptor: QueueDescriptor, cfg: Any) -> Any:
        """A ``security.CurveSetup`` when CURVE is on for this queue, else None.

        ``metadata['curve']`` decides; without it ``security.curve.enabled`` does, for tcp
        endpoints only (ipc files are guarded by their 0600 mode in a 0700 directory).
        """
        from sage_zmq import security

        local = security.is_local_endpoint(descriptor.metadata.get("endpoint"), self.name)
        paths = security.curve_paths(descriptor.metadata, cfg, default_on=not local)
        return None if paths is None else security.CurveSetup(paths)

    def compress(self, descriptor: QueueDescriptor, endpoint: str | None = None) -> bool | str:
        """True, False or "auto" (compress on remote tcp links while it pays).

        ``endpoint``: where the link actually connects, when the descriptor's endpoint is only
        a name (``ray://``).
        """
        setting = descriptor.metadata.get("compression", current_config().performance.compression)
        return compression_mode(setting, endpoint or descriptor.metadata.get("endpoint"))

    def bind_endpoint(self, descriptor: QueueDescriptor) -> str:
        return str(descriptor.metadata.get("bind", descriptor.metadata["endpoint"]))

    def release(self, descriptor: QueueDescriptor) -> None:
        inlet = claim_prebound(str(descriptor.metadata.get("endpoint")))
        if inlet is not None:
            inlet.close()

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
        bound_by = descriptor.metadata.get("bound_by")
        if inlet is None and bound_by is not None and bound_by != bound_by_here():
            raise DescriptorError(
                f"queue {descriptor.queue_id!r}: {endpoint} was bound by the process that "
                f"created the descriptor (pid {str(bound_by).split('-')[0]}), which is its "
                "consumer; get() there, or create the descriptor in the consuming process, "
                "or give an explicit endpoint"
            )
        if inlet is None:
            inlet = RouterInlet(
                self.bind_endpoint(descriptor),
                self.codec(descriptor),
                self.socket_options(descriptor),
                queue_id=descriptor.queue_id,
            )
        return inlet
