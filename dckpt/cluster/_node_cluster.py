"""``NodeCluster``: a Dask cluster on this machine whose workers behave like separate nodes.

Each worker is a simulated node with its own node id (``node-<i>``) and its own storage
root, handed to it as ``DASK_DCKPT__NODE_ID`` / ``DASK_DCKPT__NODE_ROOT``. With
isolation on, each worker also runs in a mount namespace of its own, so a file one node
writes under its root does not exist on any other node, nor in the driver: the only
honest way to test "no shared filesystem" on one machine.

Without isolation (unavailable, or ``isolate=False``) each node gets a distinct root,
``<cluster root>/node-<i>``, and nothing stops one node from reading another's files.
How the nodes are isolated, in mount namespaces and with ``network=True`` in network
namespaces too, is described in :mod:`dckpt.cluster._isolation`; the processes the
cluster starts, and how they end, in :mod:`dckpt.cluster._cluster_processes`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import distributed

from dckpt import _config
from dckpt.cluster import _driver_watch, _netns
from dckpt.cluster._cluster_processes import (
    ClusterProcesses,
    log_tail,
    release,
    signal_group,
    spawn,
)
from dckpt.cluster._isolation import (
    IsolationUnavailableWarning,
    mount_namespace_command,
    network_namespace_command,
    network_plan,
)

# Looked up in this module when a cluster starts, so that a test can force isolation
# off (tests/cluster/test_local.py).
from dckpt.cluster._isolation import probe_isolation as _probe_isolation
from dckpt.errors import IsolationUnavailableError

logger = logging.getLogger(__name__)

__all__ = ["NodeCluster", "NodeInfo"]


@dataclass(frozen=True)
class NodeInfo:
    """One node of a :class:`NodeCluster`, as last started.

    Attributes
    ----------
    node_id
        The node's id, ``node-<i>``; also its Dask worker name.
    root
        The node's storage root (``dckpt.node-root`` in its worker). With isolation,
        the same path on every node, with different contents behind it.
    worker_address
        The address of the node's worker; a restarted node gets a new one.
    pid
        The process id of the node's worker.
    isolated
        Whether the node runs in a mount namespace of its own.
    """

    node_id: str
    root: str
    worker_address: str
    pid: int
    isolated: bool


# Names a shared folder may not take: what dckpt and the worker keep in a node's root.
_RESERVED_NAMES = frozenset({"cache", "tmp", "dask-worker-space"})


class NodeCluster:
    """A local Dask cluster whose workers are simulated nodes, isolated where possible.

    Parameters
    ----------
    n_nodes
        How many nodes (worker processes) to start; node ``i`` is named ``node-<i>``.
    isolate
        True: run each worker in a mount namespace of its own, or raise
        :class:`~dckpt.errors.IsolationUnavailableError` (a ``RuntimeError``) if that
        cannot be had. False: never. None (default): isolate when available, else
        warn once with :class:`IsolationUnavailableWarning` and give each node a
        distinct root instead.
    root
        The folder that holds the cluster's files: node storage, logs, the scheduler
        file. Default: a fresh temporary folder, removed by :meth:`close`. A folder
        given here is kept, so a later cluster on the same root (and the same
        ``isolate``) finds the nodes' data again.
    threads_per_worker
        Threads of each worker (``--nthreads``).
    memory_limit
        Memory limit of each worker (``--memory-limit``), e.g. ``"2GiB"``.
    env
        Extra environment variables for the scheduler and the workers, applied last
        (so they override the cluster's own). Worker processes do not see the driver's
        ``dask.config.set``: pass settings as ``DASK_DCKPT__...`` variables here.
    startup_timeout
        Seconds the scheduler, and then the workers, may take to come up.
    shared_folders
        Names of folders that every node sees with the same files, at
        ``<node root>/<name>`` (the same path on every node): one folder of this machine,
        bind-mounted into every node's namespace, like an NFS export every machine
        mounts. The driver reaches it at :meth:`shared_folder`. Needs isolation
        (``ValueError`` without it: non-isolated nodes have roots at different paths).
        Each name is one path component, and not one of ``cache``, ``tmp``,
        ``dask-worker-space``.
    network
        True: put each node in a network namespace of its own as well (its own
        address on a veth to a bridge the cluster makes, its own host name
        ``node-<i>``, see the module docstring), or raise
        :class:`~dckpt.errors.IsolationUnavailableError` if that cannot be had (needs
        root, ``ip``, ``nsenter``). False (default): every node on 127.0.0.1. None: on
        when available, else warn with :class:`NetworkIsolationUnavailableWarning`
        and run as with False. Independent of ``isolate``; without mount isolation the
        nodes have no ``/etc/hosts`` naming each other.
    link_rate
        With a network: limit each node's link, both ways, to this rate with ``tc
        tbf`` on its veth, e.g. ``"1gbit"``, ``"100mbit"`` or an int of bits per
        second; None (default): no limit (a veth moves data at memory speed). Burst
        and queue are set as :mod:`dckpt.cluster._netns` explains (8 ms of the rate,
        20 ms of queue). ``ValueError`` for a malformed rate or one given with
        ``network=False``, ``TypeError`` for one neither text nor int. Where ``tbf``
        is refused, ``network=True`` raises and ``network=None`` warns and runs
        unlimited.
    dashboard
        Give the scheduler and every worker an HTTP server on a free port of its own
        address (127.0.0.1, or its address on the cluster's network): the scheduler's
        Dask dashboard (at :attr:`dashboard_link`, with
        dckpt's checkpoints page once dckpt is installed, if bokeh is there) and each
        worker's ``/metrics``. Off by default: a test cluster needs no web server.

    Attributes
    ----------
    scheduler_address : str
        Where to connect a ``distributed.Client``.
    nodes : list of NodeInfo
        One entry per node, as last started; after :meth:`kill_node` an entry keeps
        describing the dead worker until :meth:`restart_node` replaces it.
    isolated : bool
        Whether the nodes run in mount namespaces of their own.
    network : ClusterNetwork or None
        With network isolation, the cluster's network: ``subnet``, ``bridge``,
        ``host_address`` (the scheduler's, and where the nodes reach this machine;
        they cannot reach its 127.0.0.1), ``rate_bits`` and per node a link
        (``namespace``, ``veth``, ``address``, ``host_name``). None without.
    root : str
        The cluster's folder.
    dashboard_link : str or None
        The scheduler dashboard's URL (``http://<scheduler host>:<port>/status``), or None
        without ``dashboard=True``.

    Notes
    -----
    Each worker gets ``DASK_DCKPT__NODE_ID=node-<i>`` (not with a network: there its
    host name is ``node-<i>``), ``DASK_DCKPT__NODE_ROOT`` (its storage root) and
    ``DASK_DCKPT__TEMPORARY_DIRECTORY=<node root>/tmp``, so that what
    dckpt writes on a node without being told where stays on that node, as on a real
    machine. Logs of the scheduler and the workers are in ``<root>/logs``.

    Examples
    --------
    >>> with NodeCluster(2) as cluster, cluster.client() as client:  # doctest: +SKIP
    ...     client.run(dckpt._node.node_id)
    {'tcp://127.0.0.1:40611': 'node-0', 'tcp://127.0.0.1:37065': 'node-1'}
    """

    scheduler_address: str
    nodes: list[NodeInfo]
    isolated: bool
    network: _netns.ClusterNetwork | None
    root: str
    dashboard_link: str | None
    _dashboard: bool
    _prefix: tuple[str, ...] | None
    _network_wanted: bool
    _rate_bits: int | None
    _worker_options: list[str]
    _env: dict[str, str]
    _startup_timeout: float
    _shared_folders: tuple[str, ...]
    _state: ClusterProcesses
    _admin: distributed.Client
    _finalizer: weakref.finalize[[ClusterProcesses], NodeCluster]

    def __init__(
        self,
        n_nodes: int = 2,
        *,
        isolate: bool | None = None,
        root: str | None = None,
        threads_per_worker: int = 1,
        memory_limit: str | int = "2GiB",
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 60,
        shared_folders: Sequence[str] = (),
        network: bool | None = False,
        link_rate: str | int | None = None,
        dashboard: bool = False,
    ) -> None:
        if n_nodes < 1:
            raise ValueError(f"NodeCluster needs at least one node, got n_nodes={n_nodes}")
        self._network_wanted, self._rate_bits = network_plan(n_nodes, network, link_rate)
        self.network = None
        self._shared_folders = tuple(dict.fromkeys(shared_folders))
        for name in self._shared_folders:
            if not name or name in (".", "..") or "/" in name or name in _RESERVED_NAMES:
                raise ValueError(
                    f"NodeCluster(shared_folders=...) got {name!r}; each name is one folder "
                    "name such as 'shared', and not one of "
                    f"{', '.join(sorted(_RESERVED_NAMES))} (which the nodes use themselves)"
                )
        self._prefix = None
        if isolate is not False:
            self._prefix, reason = _probe_isolation()
            if self._prefix is None and isolate:
                raise IsolationUnavailableError(
                    "NodeCluster(isolate=True) needs mount namespaces, which are not "
                    f"available here ({reason}). Run as root or allow user namespaces "
                    "(sysctl kernel.unprivileged_userns_clone=1), or pass isolate=None "
                    "to fall back to distinct, non-isolated node roots."
                )
            if self._prefix is None:
                warnings.warn(
                    f"NodeCluster cannot isolate its nodes ({reason}); each node gets a "
                    "distinct root, but every node can read every other node's files.",
                    IsolationUnavailableWarning,
                    stacklevel=2,
                )
        self.isolated = self._prefix is not None
        if self._shared_folders and not self.isolated:
            raise ValueError(
                f"NodeCluster(shared_folders={list(self._shared_folders)}) needs isolated "
                "nodes, whose roots are at one path; "
                + ("isolate=False was given" if isolate is False
                   else "isolation is not available here")
            )
        self._worker_options = [
            "--nthreads", str(threads_per_worker),
            "--nworkers", "1",
            "--no-nanny",
            "--memory-limit", str(memory_limit),
        ]
        self._dashboard = dashboard
        self.dashboard_link = None
        self._env = dict(env or {})
        self._startup_timeout = startup_timeout
        self.nodes = []
        self.scheduler_address = ""

        owns_root = root is None
        if root is None:
            root = tempfile.mkdtemp(prefix="dckpt-cluster-", dir=_config.temporary_directory())
        self.root = os.path.abspath(root)
        self._state = ClusterProcesses(root=self.root, owns_root=owns_root)
        # Safety net for a cluster that is never closed: runs at garbage collection or
        # at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, release, self._state)
        try:
            self._start(n_nodes)
        except BaseException:
            self.close()
            raise

    # -- start-up -------------------------------------------------------------------

    def _start_network(self, n_nodes: int) -> None:
        try:
            self.network = _netns.create(n_nodes, self._rate_bits)
        except _netns.NetworkSetupError as e:
            raise IsolationUnavailableError(
                f"NodeCluster(network=...) could not set up its network: {e}"
            ) from e
        self._state.network = self.network
        with open(self._hosts_file(), "w") as f:
            f.write(_netns.hosts_file(self.network))

    def _hosts_file(self) -> str:
        return os.path.join(self.root, "hosts")

    def _start(self, n_nodes: int) -> None:
        os.makedirs(os.path.join(self.root, "logs"), exist_ok=True)
        if self._network_wanted:
            self._start_network(n_nodes)
        for index in range(n_nodes):
            os.makedirs(self._backing(index), exist_ok=True)
        if self.isolated:
            os.makedirs(self._mount_point(), exist_ok=True)
        for name in self._shared_folders:
            os.makedirs(self.shared_folder(name), exist_ok=True)
            for index in range(n_nodes):  # where each node mounts it
                os.makedirs(os.path.join(self._backing(index), name), exist_ok=True)
        self.scheduler_address = self._start_scheduler()
        self._admin = distributed.Client(
            self.scheduler_address, set_as_default=False, timeout=self._startup_timeout
        )
        self._state.clients.append(self._admin)
        if self._dashboard:
            port = self._admin.scheduler_info()["services"]["dashboard"]
            host = self.network.host_address if self.network is not None else "127.0.0.1"
            self.dashboard_link = f"http://{host}:{port}/status"
        for index in range(n_nodes):
            self._start_worker(index)
        deadline = time.monotonic() + self._startup_timeout
        self.nodes = [self._wait_for_node(index, deadline) for index in range(n_nodes)]
        logger.info(
            "NodeCluster at %s: %d nodes%s%s, root %s",
            self.scheduler_address, n_nodes, " (isolated)" if self.isolated else "",
            f" on {self.network.subnet} ({self.network.bridge})" if self.network else "",
            self.root,
        )

    def _log(self, name: str) -> str:
        return os.path.join(self.root, "logs", f"{name}.log")

    def _mount_point(self) -> str:
        return os.path.join(self.root, "node")

    def _backing(self, index: int) -> str:
        if self.isolated:
            return os.path.join(self.root, "backing", f"node-{index}")
        return os.path.join(self.root, f"node-{index}")

    def _node_root(self, index: int) -> str:
        return self._mount_point() if self.isolated else self._backing(index)

    def _spawn(
        self, command: list[str], log_name: str, env: Mapping[str, str],
        unset: Sequence[str] = (),
    ) -> subprocess.Popen[bytes]:
        # The driver's pid: the process ends if the driver is killed (_driver_watch).
        watch = {_driver_watch.DRIVER_PID: str(os.getpid())}
        return spawn(command, self._log(log_name), {**watch, **env, **self._env}, unset)

    def _dashboard_options(self, host: str) -> list[str]:
        """A process's HTTP server (dashboard, ``/metrics``) on a free port of ``host``,
        or none."""
        return ["--dashboard-address", f"{host}:0"] if self._dashboard else ["--no-dashboard"]

    def _start_scheduler(self) -> str:
        scheduler_file = os.path.join(self.root, "scheduler.json")
        with contextlib.suppress(FileNotFoundError):
            os.remove(scheduler_file)  # left by an earlier cluster on the same root
        host = self.network.host_address if self.network is not None else "127.0.0.1"
        process = self._spawn(
            [*_driver_watch.command("distributed.cli.dask_scheduler"), "--host", host,
             "--port", "0", *self._dashboard_options(host),
             "--scheduler-file", scheduler_file],
            "scheduler",
            {},
        )
        self._state.scheduler = process
        deadline = time.monotonic() + self._startup_timeout
        while True:
            # The file may be seen half-written; read it until it parses.
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                with open(scheduler_file) as f:
                    address: str = json.load(f)["address"]
                return address
            self._check_starting(process, "scheduler", "The Dask scheduler",
                                 f"writing {scheduler_file}", deadline)
            time.sleep(0.05)

    def _start_worker(self, index: int) -> None:
        node_id = f"node-{index}"
        node_root = self._node_root(index)
        link = self.network.links[index] if self.network is not None else None
        command = [
            *_driver_watch.command("distributed.cli.dask_worker"), self.scheduler_address,
            *self._worker_options,
            "--host", link.address if link is not None else "127.0.0.1",
            *self._dashboard_options(link.address if link is not None else "127.0.0.1"),
            "--name", node_id,
            "--local-directory", os.path.join(node_root, "dask-worker-space"),
        ]
        if self._prefix is not None:
            binds = [path for name in self._shared_folders
                     for path in (self.shared_folder(name), os.path.join(node_root, name))]
            if link is not None and os.path.isfile("/etc/hosts"):  # a bind needs a target
                binds += [self._hosts_file(), "/etc/hosts"]
            command = mount_namespace_command(
                self._backing(index), node_root, os.path.join(self.root, "backing"),
                binds, command)
        env = {
            "DASK_DCKPT__NODE_ROOT": node_root,
            "DASK_DCKPT__TEMPORARY_DIRECTORY": os.path.join(node_root, "tmp"),
        }
        if link is None:
            if self._prefix is not None:
                command = [*self._prefix, "--", *command]
            env["DASK_DCKPT__NODE_ID"] = node_id
            self._state.workers[index] = self._spawn(command, node_id, env)
            return
        # A UTS namespace for the host name; the mount namespace as without a network.
        command = network_namespace_command(link, command, mounts=self._prefix is not None)
        # No node id: the default, the host name, is the node's (an inherited
        # DASK_DCKPT__NODE_ID would override it; env= still may).
        self._state.workers[index] = self._spawn(
            command, node_id, env, unset=("DASK_DCKPT__NODE_ID",))

    def _check_starting(
        self, process: subprocess.Popen[bytes], log: str, who: str, step: str,
        deadline: float,
    ) -> None:
        """Raise, with the end of its log, if ``process`` died or ran out of time."""
        if process.poll() is not None:
            raise RuntimeError(
                f"{who} exited with code {process.returncode} before {step}. "
                f"End of its log:\n{log_tail(self._log(log))}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{who} did not finish {step} within startup_timeout="
                f"{self._startup_timeout}s. End of its log:\n{log_tail(self._log(log))}"
            )

    def _workers_by_name(self) -> dict[str, tuple[str, str]]:
        """Worker name -> (address, status), as the scheduler sees them now."""
        workers = self._admin.scheduler_info(n_workers=-1)["workers"]
        return {
            str(w.get("name")): (address, str(w.get("status")))
            for address, w in workers.items()
        }

    def _wait_for_node(self, index: int, deadline: float) -> NodeInfo:
        node_id = f"node-{index}"
        process = self._state.workers[index]
        while True:
            address, status = self._workers_by_name().get(node_id, ("", ""))
            if status == "running":
                break
            self._check_starting(process, node_id, f"The worker of {node_id}",
                                 "joining the scheduler", deadline)
            time.sleep(0.1)
        pid = self._admin.run(os.getpid, workers=[address])[address]
        return NodeInfo(node_id, self._node_root(index), address, pid, self.isolated)

    def _wait_until_gone(self, address: str) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while any(a == address for a, _ in self._workers_by_name().values()):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"The scheduler still lists the dead worker {address} after "
                    f"{self._startup_timeout}s"
                )
            time.sleep(0.05)

    # -- public API -----------------------------------------------------------------

    def client(self, **kwargs: Any) -> distributed.Client:
        """A new ``distributed.Client`` of this cluster, closed by :meth:`close`.

        Parameters
        ----------
        **kwargs
            Passed to ``distributed.Client``.
        """
        self._check_open()
        client = distributed.Client(self.scheduler_address, **kwargs)
        self._state.clients.append(client)
        return client

    def shared_folder(self, name: str) -> str:
        """Where the driver reaches shared folder ``name``: the folder of this machine
        that every node sees at ``<node root>/<name>``.

        Raises
        ------
        KeyError
            If the cluster has no shared folder of that name.
        """
        if name not in self._shared_folders:
            raise KeyError(f"{self!r} has no shared folder {name!r} (it has "
                           f"{list(self._shared_folders) or 'none'}); see shared_folders=")
        return os.path.join(self.root, "backing", "shared", name)

    def kill_node(self, index: int) -> None:
        """SIGKILL the worker of node ``index``, as a crash would, and wait until the
        scheduler has noticed.

        The node's storage is kept: :meth:`restart_node` brings it back. Killing a
        node that is already dead does nothing.
        """
        self._check_open()
        process = self._process(index)
        if process.poll() is None:
            logger.info("Killing %s (pid %d)", self.nodes[index].node_id, process.pid)
            signal_group(process, signal.SIGKILL)
            process.wait()
        # Closing the dead worker's sockets tells the scheduler at once; waiting here
        # spares callers a race with the scheduler's bookkeeping.
        self._wait_until_gone(self.nodes[index].worker_address)

    def restart_node(self, index: int) -> NodeInfo:
        """Start a new worker for node ``index``, with the same node id and storage.

        A worker of that node that still runs is killed first, like a machine that
        reboots. Returns the node's new :class:`NodeInfo` (a new address and pid),
        which also replaces ``nodes[index]``.
        """
        self.kill_node(index)
        self._start_worker(index)
        info = self._wait_for_node(index, time.monotonic() + self._startup_timeout)
        self.nodes[index] = info
        logger.info("Restarted %s at %s", info.node_id, info.worker_address)
        return info

    def close(self) -> None:
        """Close the clients, stop the workers and the scheduler, remove an owned root.

        SIGTERM first, SIGKILL for a process still running a few seconds later. Safe
        to call more than once.
        """
        self._finalizer()

    def _process(self, index: int) -> subprocess.Popen[bytes]:
        if not 0 <= index < len(self.nodes):
            raise IndexError(f"No node {index}: this cluster has nodes 0 to {len(self.nodes) - 1}")
        return self._state.workers[index]

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"{self!r} is closed")

    def __enter__(self) -> NodeCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "" if self._finalizer.alive else ", closed"
        network = f", network={self.network.subnet}" if self.network is not None else ""
        return (
            f"NodeCluster({self.scheduler_address!r}, nodes={len(self.nodes)}, "
            f"isolated={self.isolated}{network}{state})"
        )
