"""What docs/tutorial.md and docs/operations.md show runs, and says what the code does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from sage_zmq import Packet, QueueDescriptor
from sage_zmq.observe import metrics, tracing

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial.md"
OPERATIONS = ROOT / "docs" / "operations.md"


def _snippet(heading: str) -> str:
    """The first Python block after ``heading`` in the tutorial (``From Python:`` for §5)."""
    text = TUTORIAL.read_text()
    section = text.split(heading, 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def _run_as_script(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # As a file, run like a reader would: the spawn start method imports it again in every
    # child, which is what the `if __name__ == "__main__":` guard is for.
    script = tmp_path / "snippet.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,  # the snippets name examples/topology.yaml
    )


def test_tutorial_routing_snippet_runs(tmp_path: Path) -> None:
    # §4 used QueueDescriptor without importing it (NameError), and nobody consumed its queues.
    done = _run_as_script(_snippet("## 4. Routing to parallel instances"), tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    ann = {line.split()[0] for line in lines if "'ann'" in line}
    assert len(ann) == 1  # same key, same worker
    assert "WARNING" not in done.stderr


def test_tutorial_python_pipeline_snippet_runs(tmp_path: Path) -> None:
    # §5 had no __main__ guard: each spawned instance re-ran run_topology on import.
    code = _snippet("From Python")
    assert 'if __name__ == "__main__":' in code
    done = _run_as_script(code, tmp_path)
    assert done.returncode == 0, done.stderr
    by_operator = {line.split()[0] for line in done.stdout.splitlines() if line[:1].isalpha()}
    assert {"words", "upper", "count", "out"} <= by_operator


def test_local_queues_add_one_hop_as_operations_md_says() -> None:
    text = OPERATIONS.read_text()
    assert "add no hop of their own" not in text
    assert re.search(r"`local` queues pass objects by reference.*add one hop", text, re.S)
    qd = QueueDescriptor("docs-local-hop", "local")
    try:
        packet = Packet(1)
        tracing.start_trace(packet)
        qd.put(packet)
        got = qd.get(timeout=5)
    finally:
        qd.close()
    hops = got.headers["sage_trace"]
    assert [(h[0], h[2]) for h in hops] == [("docs-local-hop", "local")]


def test_latency_histogram_placement_as_operations_md_says() -> None:
    text = OPERATIONS.read_text()
    assert 'extra["latency_histogram"]' in text
    assert "moved *out of* `extra` to sit beside" in text
    qd = QueueDescriptor("docs-hist", "shm", {"maxsize": 10})
    try:
        qd.put(Packet(1))
        qd.get(timeout=5)
        stats = qd.statistics()
        assert stats.extra is not None and "latency_histogram" in stats.extra
        (entry,) = [q for q in metrics.snapshot()["queues"] if q["queue_id"] == "docs-hist"]
        assert "latency_histogram" in entry and "latency_histogram" not in (entry["extra"] or {})
    finally:
        qd.close()
