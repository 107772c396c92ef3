"""Find and remove shared-memory segments left behind by owners that died.

A pool names its segments ``{prefix}{pid}-{token}-{n}``. An owner that exits normally unlinks
its segments (atexit); one killed by SIGKILL cannot, so the next pool creation sweeps: every
segment of ours (same uid) whose owner pid no longer exists is unlinked.

Limits: a dead owner whose pid was recycled by a live process looks alive until that process
ends; owners in another pid namespace sharing this ``/dev/shm`` would look dead (don't share
``/dev/shm`` across pid namespaces with the same uid and prefix).
"""

from __future__ import annotations

import os
import re
import stat

SHM_DIR = "/dev/shm"
DEFAULT_PREFIX = "sagezmq-"

_TAIL_RE = re.compile(r"(\d+)-([0-9a-f]+)-(\d+)\Z")
MAX_PID = 2**31 - 1
"""The largest value a pid_t holds: os.kill raises OverflowError beyond it."""


def segment_name(prefix: str, pid: int, token: str, n: int) -> str:
    """The name a pool gives its ``n``-th segment."""
    return f"{prefix}{pid}-{token}-{n}"


def owner_pid(name: str, prefix: str = DEFAULT_PREFIX) -> int | None:
    """The owner pid encoded in a segment name, or None if the name is not one of ours."""
    if not name.startswith(prefix):
        return None
    match = _TAIL_RE.match(name, len(prefix))
    if match is None:
        return None
    pid = int(match.group(1))
    # pid 0 / negative would make os.kill address process groups; no process has a pid
    # beyond pid_t (os.kill would raise OverflowError): not a name of ours either.
    return pid if 0 < pid <= MAX_PID else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (as far as this pid namespace can tell)."""
    if pid <= 0:
        raise ValueError(f"pid must be positive, got {pid}")
    if pid > MAX_PID:
        return False  # no process has it (and os.kill would raise OverflowError)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True


def list_segments(prefix: str = DEFAULT_PREFIX, *, shm_dir: str = SHM_DIR) -> list[str]:
    """Names in ``shm_dir`` that look like segments of ours (any owner), sorted."""
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if owner_pid(n, prefix) is not None)


def sweep_orphans(prefix: str = DEFAULT_PREFIX, *, shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink segments of ours whose owner pid is dead; return the names removed."""
    removed: list[str] = []
    uid = os.getuid()
    for name in list_segments(prefix, shm_dir=shm_dir):
        pid = owner_pid(name, prefix)
        if pid is None or pid_alive(pid):
            continue
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue  # another sweeper got there first
        removed.append(name)
    return removed


__all__ = [
    "DEFAULT_PREFIX",
    "SHM_DIR",
    "list_segments",
    "owner_pid",
    "pid_alive",
    "segment_name",
    "sweep_orphans",
]
