"""What a fresh process imports before its first record leaves.

A worker that only moves plain records must not pay for PyYAML (read only with a config
file or ``SAGE_ZMQ__*`` overrides), numpy (only where arrays travel) or the reliable layer
(only with ``ack``/``persist``): together they made the first ``put`` of a new process take
~100 ms longer. Checked in a fresh interpreter, where nothing was imported before.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from sage_zmq.wire.codec import Codec


def _run(code: str, stdin: bytes = b"") -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], input=stdin, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


def test_plain_records_import_neither_yaml_numpy_nor_the_reliable_layer() -> None:
    out = _run(
        "import sys\n"
        "import sage_zmq\n"
        "heavy = ('yaml', 'numpy', 'sage_zmq.flow.reliable')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "qd = sage_zmq.QueueDescriptor(queue_type='tcp')\n"
        "qd.put({'a': [1, 2.5, 'x']})\n"
        "print(qd.get(timeout=10))\n"
        "qd.close()\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    assert out.splitlines() == ["[]", "{'a': [1, 2.5, 'x']}", "[]"]


def test_a_process_without_numpy_imports_it_to_decode_an_array() -> None:
    frame, sent, errors = Codec().encode_batch("p", 0, [np.arange(4, dtype="<i4")])
    assert len(sent) == 1 and not errors
    out = _run(
        "import sys\n"
        "from sage_zmq.wire.codec import Codec\n"
        "print('numpy' in sys.modules)\n"
        "records = Codec().decode(sys.stdin.buffer.read()).fields[2]\n"
        "print(type(records[0]).__name__, records[0].dtype.str, records[0].tolist())\n",
        stdin=frame,
    )
    assert out.splitlines() == ["False", "ndarray <i4 [0, 1, 2, 3]"]
