"""A :class:`~dckpt.cluster.NodeCluster`'s processes end when the process that started
them is gone.

:meth:`NodeCluster.close` (or its finalizer) stops the cluster's scheduler and workers;
a driver killed with SIGKILL, or by the kernel's OOM killer, runs neither, and each of
those processes leads a session of its own (a terminal's Ctrl-C reaches only the
driver), so they would run on, holding ports, memory and node roots. So the cluster
starts each of them with ``--preload dckpt.cluster._driver_watch`` and its own pid in
:data:`DRIVER_PID`: a thread of the process waits on a pidfd of the driver (the kernel
wakes it when the driver exits; nothing polls) and then sends the process SIGTERM,
which Dask's command line answers with its own orderly shutdown, and ends it for good
:data:`GRACE_SECONDS` later if it is still there.

Linux only (``os.pidfd_open``, Linux 5.3): where there is none, the process logs that it
will outlive a killed driver, and runs as before.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from typing import Any

__all__ = ["DRIVER_PID", "GRACE_SECONDS", "PRELOAD", "dask_setup"]

logger = logging.getLogger(__name__)

DRIVER_PID = "DCKPT_NODE_CLUSTER_DRIVER_PID"
"""The environment variable that carries the driver's pid to its cluster's processes."""

PRELOAD = ["--preload", __name__]
"""The ``dask scheduler`` / ``dask worker`` options that load the watch."""

GRACE_SECONDS = 10.0
"""How long an orderly shutdown may take before the process is ended with ``os._exit``."""


def dask_setup(server: Any) -> None:  # a Scheduler or a Worker; the preload protocol
    """Start watching the driver named by :data:`DRIVER_PID`, if any."""
    value = os.environ.get(DRIVER_PID)
    if not value:
        return
    try:
        pidfd = os.pidfd_open(int(value))
    except ProcessLookupError:
        logger.warning("The process that started this cluster (pid %s) is gone: "
                       "shutting down", value)
        _shut_down()
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
    logger.warning("The process that started this cluster (pid %s) is gone: shutting down",
                   pid)
    _shut_down()


def _shut_down() -> None:
    """SIGTERM to this process; ``os._exit`` after the grace if that did not end it."""
    os.kill(os.getpid(), signal.SIGTERM)
    timer = threading.Timer(GRACE_SECONDS, os._exit, args=(1,))
    timer.daemon = True
    timer.start()
