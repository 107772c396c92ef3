"""Every routing example runs as a script, exits 0 and prints its checked result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> a fragment its output must contain (each script also checks itself, exit 1 if wrong)
EXPECTED = {
    "point_to_point.py": "point_to_point: 1000 records, sum 499500 (ok)",
    "broadcast.py": "each of 3 instances got all 100 records (ok)",
    "key_partition.py": "each key on one (ok)",
    "load_balance.py": "load_balance: slow instance got",
    "pipeline.py": "10000 clicks, 50 users",
    "large_arrays.py": "all zero-copy views, sum 4950 (ok)",
}


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(EXAMPLES.parent), env.get("PYTHONPATH")) if p
    )
    env["SAGE_ZMQ_RUNTIME_DIR"] = str(tmp_path / "rt")  # the child's ipc files stay its own
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / script)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{script} did not finish in 60 s\nstdout:\n{out}\nstderr:\n{err}")
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{out}\n{err}"
    assert EXPECTED[script] in out, out
