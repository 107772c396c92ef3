"""``tcp``: a queue any host can reach; DEALER producers, a ROUTER consumer.

Without an endpoint, the process that creates the descriptor binds ``127.0.0.1`` on a port the
OS chooses and becomes the consumer, so the descriptor carries a connectable endpoint before it
leaves the process. The same holds for an explicit port ``0`` or ``*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from sage_zmq.config import current_config
from sage_zmq.errors import DescriptorError
from sage_zmq.queues._socket_type import SocketQueueType
from sage_zmq.queues._zmq import RouterInlet, bound_by_here, check_tcp_endpoint, prebind
from sage_zmq.queues.base import Capabilities

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor


class TcpQueueType(SocketQueueType):
    name: ClassVar[str] = "tcp"
    capabilities: ClassVar[Capabilities] = Capabilities(cross_process=True, cross_host=True)

    def prepare(self, descriptor: QueueDescriptor) -> dict[str, Any]:
        meta = dict(descriptor.metadata)
        endpoint = meta.get("endpoint")
        if endpoint is None:
            host = current_config().security.bind_host
            endpoint = f"tcp://{_bracket(host)}:0"
        if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
            raise DescriptorError(
                f"queue_type 'tcp' needs a tcp://HOST:PORT endpoint, got {endpoint!r}; "
                "for ipc:// use queue_type='shm'"
            )
        host, port = check_tcp_endpoint(endpoint)
        if host == "*":
            raise DescriptorError(
                f"endpoint {endpoint!r} is not connectable: name the host producers connect "
                "to, and put the bind address in metadata['bind'] (e.g. 'tcp://0.0.0.0:5555')"
            )
        if port in (0, None):
            # Bind now so the descriptor holds the real port before it leaves this process.
            inlet = RouterInlet(
                meta.get("bind", endpoint),
                self.codec(descriptor),
                self.socket_options(descriptor),
                queue_id=descriptor.queue_id,
            )
            bound_port = inlet.endpoint.rsplit(":", 1)[1]
            endpoint = f"tcp://{host}:{bound_port}"
            meta.pop("bind", None)
            meta["bound_by"] = bound_by_here()
            prebind(endpoint, inlet)
        meta["endpoint"] = endpoint
        return meta

    def validate(self, descriptor: QueueDescriptor) -> None:
        endpoint = descriptor.metadata.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
            raise DescriptorError(
                f"queue_type 'tcp' needs a tcp://HOST:PORT endpoint, got {endpoint!r}"
            )
        check_tcp_endpoint(endpoint)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
