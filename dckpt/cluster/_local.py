"""``NodeCluster``: a Dask cluster on this machine whose workers behave like separate nodes.

Each worker is a simulated node with its own node id (``node-<i>``) and its own storage
root, handed to it as ``DASK_DCKPT__NODE_ID`` / ``DASK_DCKPT__NODE_ROOT``. With
isolation on, each worker also runs in a mount namespace of its own, so a file one node
writes under its root does not exist on any other node, nor in the driver: the only
honest way to test "no shared filesystem" on one machine.

How isolation is done. Every node sees its storage at the *same* path, the mount point
``<cluster root>/node``; what is behind it differs per node. Each worker starts as::

    unshare --mount --propagation private -- sh -c '
        mount --bind BACKING MOUNTPOINT &&
        mount -t tmpfs dckpt-hidden BACKINGS &&
        exec dask worker ...'

``BACKING`` is the node's own folder ``<cluster root>/backing/node-<i>`` (on disk, so a
restarted worker of the same node finds its data again), and the tmpfs over
``<cluster root>/backing`` hides every node's backing folder from every worker, so the
mount point is the only way a node reaches its data. A *shared folder* (``shared_folders``)
is one more bind mount before the tmpfs: the one folder ``<cluster root>/backing/shared/<name>``
at ``MOUNTPOINT/<name>`` in every node, the same files at the same path on every node, as an
NFS export that every machine mounts at one place — while the rest of each node's root stays
its own. Folders of the machine outside the cluster root are not hidden from any node. "Private" propagation keeps the
mounts out of the driver's namespace: in the driver, ``<cluster root>/node`` stays an
empty folder. The namespace, and its mounts, disappear with the worker process. Not
root? The same works inside a user namespace (``unshare --user --map-root-user``)
where the kernel allows those.

Without isolation (unavailable, or ``isolate=False``) each node gets a distinct root,
``<cluster root>/node-<i>``, and nothing stops one node from reading another's files.

Network isolation (``network=True``). The nodes then also stop sharing the loopback:
:mod:`dckpt.cluster._netns` makes a bridge on this machine with an address of its own
(``host_address``, ``.1`` of a free ``/24`` in 10.220.0.0/16) and per node a network
namespace whose ``eth0`` (one end of a veth pair, the other a port of the bridge) has the
node's address, optionally rate-limited with ``tc tbf``. Each worker starts as::

    nsenter --net=/run/netns/NS -- unshare --uts --mount --propagation private -- sh -c '
        printf node-<i> > /proc/sys/kernel/hostname && exec sh -c "<mounts as above>" ...'

so it has its own host name (a UTS namespace) and binds ``--host <its address>``: what
it advertises is its own address. The scheduler runs on this machine, bound to the
bridge's address, which every node reaches over its link and the driver reaches
directly; nothing listens on, or is sent to, any address outside the cluster's
``/24``. The workers get no ``DASK_DCKPT__NODE_ID``: their node id is their host name,
the default of :func:`dckpt._node.node_id`, as on a real machine. With mount isolation,
``/etc/hosts`` in each node names every node (and the host as ``dckpt-host``), so a
node's host name resolves. The namespaces outlive a worker: a restarted node keeps its
namespace, address and link. :meth:`NodeCluster.close` removes them with the bridge;
what a killed driver left behind is removed by the next network cluster on the machine.

Process model: one scheduler and one worker process per node, each started in a session
of its own (``start_new_session``) so that Ctrl-C in a terminal reaches only the driver,
which then shuts them down in order. Workers run without a nanny: a nanny would restart
a killed worker behind :meth:`NodeCluster.kill_node`'s back, and the worker process is
then the node (its pid is :attr:`NodeInfo.pid`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import distributed

from dckpt import _config
from dckpt.cluster import _netns
from dckpt.errors import IsolationUnavailableError

logger = logging.getLogger(__name__)

__all__ = [
    "IsolationUnavailableWarning",
    "NetworkIsolationUnavailableWarning",
    "NodeCluster",
    "NodeInfo",
    "isolation_available",
    "network_isolation_available",
]


class IsolationUnavailableWarning(UserWarning):
    """Nodes of a :class:`NodeCluster` share this machine's file system.

    Raised as a warning when ``isolate=None`` and mount namespaces cannot be had (not
    Linux, not root and no user namespaces, or a container that forbids ``unshare``).
    Each node still has a root of its own, but a test that should prove "no shared
    filesystem" may pass by reading another node's files.
    """


class NetworkIsolationUnavailableWarning(IsolationUnavailableWarning):
    """Nodes of a :class:`NodeCluster` share this machine's network (its loopback).

    Raised as a warning when ``network=None`` and network namespaces (or, for
    ``link_rate``, ``tc tbf``) cannot be had: not Linux, not root, no ``ip`` or ``tc``
    on the PATH, or a container without ``CAP_NET_ADMIN``. The cluster then runs as with
    ``network=False``: mount isolation only, every node on 127.0.0.1, no link limit.
    """


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


# Mount the node's backing folder ($1) at the shared mount point ($2), bind each pair of
# (shared folder, mount point) that follows up to a "--", hide the folder of all backing
# folders ($3), then become the worker (what follows the "--"). `exec` keeps one process,
# so the pid that Popen knows is the worker's pid.
_ISOLATE_SCRIPT = (
    'mount --bind "$1" "$2" && hidden="$3" && shift 3 && '
    'while [ "$1" != "--" ]; do mount --bind "$1" "$2" || exit 1; shift 2; done && shift && '
    'mount -t tmpfs -o size=1m,mode=0755 dckpt-hidden "$hidden" && '
    'exec "$@"'
)
# Set the host name of a fresh UTS namespace ($1), then become what follows. /proc
# rather than hostname(1), which not every image has.
_HOST_NAME_SCRIPT = 'printf "%s" "$1" > /proc/sys/kernel/hostname && shift && exec "$@"'
# Names a shared folder may not take: what dckpt and the worker keep in a node's root.
_RESERVED_NAMES = frozenset({"cache", "tmp", "dask-worker-space"})
_ROOT_PREFIX = ("unshare", "--mount", "--propagation", "private")
_USER_PREFIX = ("unshare", "--user", "--map-root-user", "--mount", "--propagation", "private")
# How long a worker or the scheduler may take to shut down after SIGTERM before SIGKILL.
_TERMINATE_GRACE = 5.0
_LOG_TAIL_BYTES = 3000


@functools.cache
def _probe_isolation() -> tuple[tuple[str, ...] | None, str]:
    """The ``unshare`` prefix that isolates a worker here, or None and why not.

    Runs the very mount script that workers run, in a throwaway namespace, and checks
    both that the bind mount is seen inside and that nothing leaked into ours. Cached:
    this costs a few tens of milliseconds and the answer does not change.
    """
    if not sys.platform.startswith("linux"):
        return None, f"mount namespaces need Linux (this is {sys.platform})"
    missing = [tool for tool in ("unshare", "mount", "sh") if shutil.which(tool) is None]
    if missing:
        return None, f"{', '.join(missing)} not found on PATH"
    candidates = [_ROOT_PREFIX, _USER_PREFIX] if os.geteuid() == 0 else [_USER_PREFIX]
    reasons = []
    with tempfile.TemporaryDirectory(prefix="dckpt-isolation-probe-") as probe:
        hidden = os.path.join(probe, "backing")
        backing = os.path.join(hidden, "node")
        mount_point = os.path.join(probe, "node")
        os.makedirs(backing)
        os.makedirs(mount_point)
        marker = os.path.join(mount_point, "marker")
        open(os.path.join(backing, "marker"), "w").close()
        for prefix in candidates:
            command = [*prefix, "--", "sh", "-c", _ISOLATE_SCRIPT, "sh", backing,
                       mount_point, hidden, "--", "test", "-f", marker]
            try:
                result = subprocess.run(
                    command, stdin=subprocess.DEVNULL, capture_output=True, timeout=10
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                reasons.append(f"`{' '.join(prefix)}`: {e}")
                continue
            if os.path.exists(marker):
                reasons.append(f"`{' '.join(prefix)}`: the mount leaked into this namespace")
                break
            if result.returncode == 0:
                logger.debug("Node isolation available with %s", " ".join(prefix))
                return prefix, ""
            error = result.stderr.decode(errors="replace").strip() or f"exit {result.returncode}"
            reasons.append(f"`{' '.join(prefix)}`: {error}")
    return None, "; ".join(reasons)


def isolation_available() -> bool:
    """Whether :class:`NodeCluster` can isolate its nodes in mount namespaces here.

    Returns
    -------
    bool
        True on Linux when ``unshare --mount`` (as root) or ``unshare --user
        --map-root-user --mount`` (user namespaces) lets a process bind-mount a folder
        without the mount showing in this process. Probed once per process.
    """
    return _probe_isolation()[0] is not None


def network_isolation_available(link_rate: bool = False) -> bool:
    """Whether :class:`NodeCluster` can give its nodes network namespaces here.

    Parameters
    ----------
    link_rate
        Also require ``tc tbf``, which ``link_rate=`` needs.

    Returns
    -------
    bool
        True on Linux when this process may create network namespaces, bridges and
        veth pairs (root, ``ip`` and ``nsenter`` on the PATH), and with ``link_rate``
        a ``tbf`` qdisc. Probed once per process in a throwaway namespace.
    """
    no_netns, no_tbf = _netns.probe()
    return not no_netns and not (link_rate and no_tbf)


@dataclass
class _Processes:
    """What a cluster must release; kept apart from it so a finalizer can hold it."""

    root: str
    owns_root: bool
    network: _netns.ClusterNetwork | None = None
    scheduler: subprocess.Popen[bytes] | None = None
    workers: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    clients: list[distributed.Client] = field(default_factory=list)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    # Each process leads a session of its own, so its group holds it and anything it
    # started (processes a task forked, say).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _stop(processes: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM each process group, SIGKILL what still runs after ``grace`` seconds."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("Process %d ignored SIGTERM for %.0fs; killing it", process.pid, grace)
            _signal_group(process, signal.SIGKILL)
            process.wait()
    for process in running:
        # The leaders are gone; SIGKILL whatever is left in their groups. A group id
        # stays taken while the group has members, and these leaders were reaped just
        # now, so their ids cannot have gone to a stranger in between.
        _signal_group(process, signal.SIGKILL)


def _release(state: _Processes) -> None:
    """Close clients, stop workers then the scheduler, remove an owned root. Idempotent."""
    for client in state.clients:
        try:
            client.close(timeout=10)
        except Exception:  # noqa: BLE001 - shutting down; the processes go anyway
            logger.debug("Closing a client failed", exc_info=True)
    state.clients.clear()
    _stop(list(state.workers.values()), _TERMINATE_GRACE)
    state.workers.clear()
    if state.scheduler is not None:
        _stop([state.scheduler], _TERMINATE_GRACE)
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


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            return f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


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
    _state: _Processes
    _admin: distributed.Client
    _finalizer: weakref.finalize[[_Processes], NodeCluster]

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
        self._network_wanted, self._rate_bits = self._check_network(
            n_nodes, network, link_rate)
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
        self._state = _Processes(root=self.root, owns_root=owns_root)
        # Safety net for a cluster that is never closed: runs at garbage collection or
        # at interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _release, self._state)
        try:
            self._start(n_nodes)
        except BaseException:
            self.close()
            raise

    # -- start-up -------------------------------------------------------------------

    @staticmethod
    def _check_network(
        n_nodes: int, network: bool | None, link_rate: str | int | None
    ) -> tuple[bool, int | None]:
        """Whether to make a network, and its rate in bit/s; raise or warn as documented."""
        rate_bits = None if link_rate is None else _netns.parse_rate(link_rate)
        if network is False:
            if rate_bits is not None:
                raise ValueError(
                    f"NodeCluster(link_rate={link_rate!r}) limits each node's own link, "
                    "which needs network=True (or None); with network=False the nodes "
                    "share the loopback"
                )
            return False, None
        if n_nodes > _netns.MAX_NODES:
            raise ValueError(
                f"NodeCluster(network={network}) makes at most {_netns.MAX_NODES} node "
                f"namespaces, got n_nodes={n_nodes}"
            )
        no_netns, no_tbf = _netns.probe()
        fallback = "; pass network=None to fall back to nodes on the loopback with a warning"
        if no_netns:
            if network:
                raise IsolationUnavailableError(
                    "NodeCluster(network=True) needs network namespaces, which are not "
                    f"available here ({no_netns}). Run as root with iproute2 (ip, tc) "
                    "and util-linux (nsenter, unshare) installed" + fallback
                )
            warnings.warn(
                f"NodeCluster cannot give its nodes network namespaces ({no_netns}); "
                "every node runs on 127.0.0.1"
                + (f" and link_rate={link_rate!r} is not applied" if rate_bits else ""),
                NetworkIsolationUnavailableWarning,
                stacklevel=3,
            )
            return False, None
        if rate_bits is not None and no_tbf:
            if network:
                raise IsolationUnavailableError(
                    f"NodeCluster(link_rate={link_rate!r}) needs `tc ... tbf`, which is "
                    f"not available here ({no_tbf}); install iproute2's tc, or pass "
                    "link_rate=None for unlimited links"
                )
            warnings.warn(
                f"NodeCluster cannot limit its nodes' links ({no_tbf}); link_rate="
                f"{link_rate!r} is not applied",
                NetworkIsolationUnavailableWarning,
                stacklevel=3,
            )
            rate_bits = None
        return True, rate_bits

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
        logger.debug("Starting %s: %s", log_name, " ".join(command))
        with open(self._log(log_name), "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
            log.flush()
            inherited = {k: v for k, v in os.environ.items() if k not in unset}
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**inherited, **env, **self._env},
                start_new_session=True,
            )

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
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", host,
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
            sys.executable, "-m", "distributed.cli.dask_worker", self.scheduler_address,
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
            command = ["sh", "-c", _ISOLATE_SCRIPT, "sh",
                       self._backing(index), node_root, os.path.join(self.root, "backing"),
                       *binds, "--", *command]
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
        # A UTS namespace for the host name; the mount namespace as without a network
        # (root is needed for the network anyway, so never the user-namespace prefix).
        mounts = ("--mount", "--propagation", "private") if self._prefix is not None else ()
        command = ["nsenter", f"--net={link.namespace_path}", "--",
                   "unshare", "--uts", *mounts, "--",
                   "sh", "-c", _HOST_NAME_SCRIPT, "sh", link.host_name, *command]
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
                f"End of its log:\n{_tail(self._log(log))}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{who} did not finish {step} within startup_timeout="
                f"{self._startup_timeout}s. End of its log:\n{_tail(self._log(log))}"
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
            _signal_group(process, signal.SIGKILL)
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
