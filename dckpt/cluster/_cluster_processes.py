"""The processes of a :class:`~dckpt.cluster.NodeCluster`: started, stopped, released.

Process model: one scheduler and one worker process per node, each started in a session
of its own (``start_new_session``) so that Ctrl-C in a terminal reaches only the driver,
which then shuts them down in order; each also ends on its own once the driver is gone,
killed before it could (:mod:`dckpt.cluster._driver_watch`). Workers run without a
nanny: a nanny would restart a killed worker behind :meth:`NodeCluster.kill_node`'s
back, and the worker process is then the node (its pid is :attr:`NodeInfo.pid`).

:func:`spawn` starts one such process with its output in a log file; :func:`stop`
ends processes (SIGTERM, then SIGKILL); :func:`release` gives back everything a cluster
holds (:class:`ClusterProcesses`: its clients, processes, network and owned root), from
:meth:`NodeCluster.close` or its finalizer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import distributed

from dckpt.cluster import _netns

logger = logging.getLogger(__name__)

# How long a worker or the scheduler may take to shut down after SIGTERM before SIGKILL.
_TERMINATE_GRACE = 5.0
_LOG_TAIL_BYTES = 3000


@dataclass
class ClusterProcesses:
    """What a cluster must release; kept apart from it so a finalizer can hold it."""

    root: str
    owns_root: bool
    network: _netns.ClusterNetwork | None = None
    scheduler: subprocess.Popen[bytes] | None = None
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    clients: list[distributed.Client] = field(default_factory=list)


def signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    # Each process leads a session of its own, so its group holds it and anything it
    # started (processes a task forked, say).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def stop(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM each process group, SIGKILL what still runs after ``grace`` seconds."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("Process %d ignored SIGTERM for %.0fs; killing it", process.pid, grace)
            signal_group(process, signal.SIGKILL)
            process.wait()
    for process in running:
        # The leaders are gone; SIGKILL whatever is left in their groups. A group id
        # stays taken while the group has members, and these leaders were reaped just
        # now, so their ids cannot have gone to a stranger in between.
        signal_group(process, signal.SIGKILL)


def release(state: ClusterProcesses) -> None:
    """Close clients, stop workers then the scheduler, remove an owned root. Idempotent."""
    for client in state.clients:
        try:
            client.close(timeout=10)
        except Exception:  # noqa: BLE001 - shutting down; the processes go anyway
            logger.debug("Closing a client failed", exc_info=True)
    state.clients.clear()
    stop(list(state.workers.values()), _TERMINATE_GRACE)
    state.workers.clear()
    if state.scheduler is not None:
        stop([state.scheduler], _TERMINATE_GRACE)
        state.scheduler = None
    if state.network is not None:
        # After the processes: a namespace deleted under a running worker lives on.
        _netns.remove(state.network)
        state.network = None
    if state.owns_root:
        # The bind mounts lived in the workers' namespaces, gone with them: from here
        # the backing folders are ordinary folders.
        shutil.rmtree(state.root, ignore_errors=True)
        if os.path.exists(state.root):
            logger.warning("Could not remove the cluster root %s", state.root)


def log_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


def spawn(
    command: list[str], log_path: str, env: Mapping[str, str], unset: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a session of its own, its output appended to ``log_path``.

    Its environment is this process's without the variables named in ``unset``, with
    ``env`` over it.
    """
    name = os.path.splitext(os.path.basename(log_path))[0]
    logger.debug("Starting %s: %s", name, " ".join(command))
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        log.flush()
        inherited = {k: v for k, v in os.environ.items() if k not in unset}
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**inherited, **env},
            start_new_session=True,
        )
