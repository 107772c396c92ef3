"""``shm``: processes on one host over ipc sockets (shared-memory side buffers for large payloads).

Without an endpoint, a private ipc path is derived in the 0700 runtime directory; long queue
ids are hashed so the path stays under the ~107-byte ipc limit.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING, Any, ClassVar

from sage_zmq import _runtime
from sage_zmq.errors import DescriptorError
from sage_zmq.queues._socket_type import SocketQueueType
from sage_zmq.queues._zmq import check_ipc_endpoint
from sage_zmq.queues.base import Capabilities

if TYPE_CHECKING:
    from sage_zmq.descriptor import QueueDescriptor

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def derive_ipc_endpoint(queue_id: str) -> str:
    token = os.urandom(4).hex()
    base = _runtime.runtime_dir()
    stem = _UNSAFE.sub("_", queue_id)[:40]
    path = os.path.join(base, f"{stem}-{token}.sock")
    if len(path.encode()) > 100:
        digest = hashlib.sha1(queue_id.encode()).hexdigest()[:16]
        path = os.path.join(base, f"{digest}-{token}.sock")
    if len(path.encode()) > 100:
        raise DescriptorError(
            f"runtime directory {base!r} is too long for ipc socket paths; set "
            "SAGE_ZMQ_RUNTIME_DIR to a short private directory"
        )
    return f"ipc://{path}"


class ShmQueueType(SocketQueueType):
    name: ClassVar[str] = "shm"
    capabilities: ClassVar[Capabilities] = Capabilities(
        cross_process=True, cross_host=False, shared_memory=True
    )

    def prepare(self, descriptor: QueueDescriptor) -> dict[str, Any]:
        meta = dict(descriptor.metadata)
        endpoint = meta.get("endpoint")
        if endpoint is None:
            meta["endpoint"] = derive_ipc_endpoint(descriptor.queue_id)
        elif not isinstance(endpoint, str) or not endpoint.startswith("ipc://"):
            raise DescriptorError(
                f"queue_type 'shm' needs an ipc:// endpoint, got {endpoint!r}; "
                "for tcp:// use queue_type='tcp'"
            )
        else:
            check_ipc_endpoint(endpoint)
        return meta
