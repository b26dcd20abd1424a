"""Coordination between the processes of one machine: ``flock`` and per-process markers.

Two helpers, shared by :mod:`dckpt._shared_dir` and the node cache:

- :func:`flocked` holds an exclusive ``flock`` on a lock file, and lets the holder
  unlink that file while holding it (so lock files need not pile up);
- marker files named ``{pid}.{token}...`` record that a process uses something; a
  marker whose process is gone (:func:`marker_is_alive` is False) is ignored, so a
  crashed process holds nothing for long.

Process ids are those of this machine's pid namespace: processes that share a folder
must share one. A pid reused by an unrelated process keeps a dead marker alive until
that process ends too; that errs on the side of keeping things.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator

__all__ = ["flocked", "is_alive", "marker_is_alive", "marker_pid", "new_marker_name"]


@contextlib.contextmanager
def flocked(lock_path: str) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if needed); yield its fd.

    Blocks until the lock is free. The holder may unlink ``lock_path`` before
    leaving: a waiter that then gets the lock on the unlinked file retries on the
    current one, so two processes never both believe they hold the lock. Each call
    opens the file anew, so the lock also excludes other threads of this process.
    """
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(lock_path))
            except FileNotFoundError:
                same_file = False
            if same_file:
                try:
                    yield fd
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def new_marker_name(suffix: str = "") -> str:
    """A fresh marker name for this process: ``{pid}.{token}{suffix}``."""
    return f"{os.getpid()}.{uuid.uuid4().hex}{suffix}"


def marker_pid(marker_name: str) -> int | None:
    """The pid a marker name starts with, or None if it starts with none."""
    head = marker_name.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def marker_is_alive(marker_name: str) -> bool:
    """Whether the process that made the marker ``marker_name`` still runs."""
    pid = marker_pid(marker_name)
    return pid is not None and is_alive(pid)


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie (dead, not yet reaped) does not."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    # A worker killed while its parent is busy (or whose parent never reaps, as PID 1
    # of some containers) lingers as a zombie; it must not hold anything.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # gone since kill(), or no /proc here
    except OSError:
        return True  # kill() said it runs
    # "pid (comm) S ...": comm may hold spaces and parentheses; the state follows the last ")".
    state = stat.rpartition(b")")[2].split()[:1]
    return state != [b"Z"]
