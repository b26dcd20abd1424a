"""A :class:`~dckpt.cluster.NodeCluster`'s processes end when the process that started
them is gone.

:meth:`NodeCluster.close` (or its finalizer) stops the cluster's scheduler and workers;
a driver killed with SIGKILL, or by the kernel's OOM killer, runs neither, and each of
those processes leads a session of its own (a terminal's Ctrl-C reaches only the
driver), so they would run on, holding ports, memory and node roots. So the cluster
starts each of them through this module (:func:`command`: ``python -c "...main()"
distributed.cli.dask_worker ...``) with its own pid in
:data:`DRIVER_PID`: a thread of the process waits on a pidfd of the driver (the kernel
wakes it when the driver exits; nothing polls) and then sends the process SIGTERM,
which Dask's command line answers with its own orderly shutdown, and ends it for good
:data:`GRACE_SECONDS` later if it is still there. The Dask command then runs in the
same process (:func:`runpy.run_module`), so its pid is still the one the cluster
started. Not a ``--preload``: one given on the command line replaces those of the
configuration (``distributed.scheduler.preload``), which a cluster's users set.

Linux only (``os.pidfd_open``, Linux 5.3): where there is none, the process logs that it
will outlive a killed driver, and runs as before.
"""

from __future__ import annotations

import logging
import os
import runpy
import select
import signal
import sys
import threading

__all__ = ["DRIVER_PID", "GRACE_SECONDS", "command", "main"]

logger = logging.getLogger(__name__)

DRIVER_PID = "DCKPT_NODE_CLUSTER_DRIVER_PID"
"""The environment variable that carries the driver's pid to its cluster's processes."""

GRACE_SECONDS = 10.0
"""How long an orderly shutdown may take before the process is ended with ``os._exit``."""

# With -c rather than -m: the package imports this module, which -m would run twice.
_RUN = "from dckpt.cluster._driver_watch import main; main()"


def command(module: str) -> list[str]:
    """The command that runs ``python -m module``, watched; its arguments follow."""
    return [sys.executable, "-c", _RUN, module]


def main() -> None:
    """With ``sys.argv`` ``[-c, MODULE, ARGS...]`` (:func:`command`): watch the driver
    named by :data:`DRIVER_PID`, if any, then run ``MODULE`` as ``__main__`` with
    ``ARGS``, in this process."""
    if len(sys.argv) < 2:
        raise SystemExit(f"usage: python -c {_RUN!r} MODULE [ARGS...]")
    module, args = sys.argv[1], sys.argv[2:]
    watch()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def watch() -> None:
    """Start watching the driver named by :data:`DRIVER_PID`, if any."""
    value = os.environ.get(DRIVER_PID)
    if not value:
        return
    try:
        pidfd = os.pidfd_open(int(value))
    except ProcessLookupError:
        _shut_down(value)
        return
    except (AttributeError, OSError, ValueError) as e:
        logger.warning("Cannot watch the process that started this cluster (pid %s): %s; "
                       "this process outlives it if it is killed", value, e)
        return
    threading.Thread(target=_watch, args=(pidfd, value), daemon=True,
                     name="dckpt-driver-watch").start()


def _watch(pidfd: int, pid: str) -> None:
    poller = select.poll()  # not select(): no limit on the fd's number
    poller.register(pidfd, select.POLLIN)
    poller.poll()  # readable once the process has exited
    os.close(pidfd)
    _shut_down(pid)


def _shut_down(pid: str) -> None:
    """The driver ``pid`` is gone: SIGTERM to this process; ``os._exit`` after the grace
    if that did not end it."""
    logger.warning("The process that started this cluster (pid %s) is gone: shutting down",
                   pid)
    os.kill(os.getpid(), signal.SIGTERM)
    timer = threading.Timer(GRACE_SECONDS, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
