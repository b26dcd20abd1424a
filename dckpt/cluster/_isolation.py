"""How the nodes of a :class:`~dckpt.cluster.NodeCluster` are kept apart.

Whether mount and network namespaces can be had here (probed once per process, with a
warning type for each when they cannot), and the command line that puts a worker into
them. :mod:`dckpt.cluster._netns` makes the network itself; the cluster
(:mod:`dckpt.cluster._node_cluster`) decides what each node gets.

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
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence

from dckpt.cluster import _netns
from dckpt.errors import IsolationUnavailableError

logger = logging.getLogger(__name__)


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
_ROOT_PREFIX = ("unshare", "--mount", "--propagation", "private")
_USER_PREFIX = ("unshare", "--user", "--map-root-user", "--mount", "--propagation", "private")


@functools.cache
def probe_isolation() -> tuple[tuple[str, ...] | None, str]:
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
    return probe_isolation()[0] is not None


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


def network_plan(
    n_nodes: int, network: bool | None, link_rate: str | int | None
) -> tuple[bool, int | None]:
    """Whether a cluster makes a network, and its links' rate in bit/s.

    Raises or warns as :class:`~dckpt.cluster.NodeCluster` documents for its
    ``network=`` and ``link_rate=`` (the warnings point at the caller's caller: the
    code that made the cluster).
    """
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


def mount_namespace_command(
    backing: str, mount_point: str, hidden: str, binds: Sequence[str], command: Sequence[str]
) -> list[str]:
    """``command`` run once ``backing`` is mounted at ``mount_point``, each pair of
    ``binds`` (a folder, where it goes) bind-mounted and ``hidden`` covered by a tmpfs.

    To be run in a fresh mount namespace (the prefix :func:`probe_isolation` found, or
    ``unshare --mount`` inside a network namespace's command).
    """
    return ["sh", "-c", _ISOLATE_SCRIPT, "sh", backing, mount_point, hidden,
            *binds, "--", *command]


def network_namespace_command(
    link: _netns.NodeLink, command: Sequence[str], *, mounts: bool
) -> list[str]:
    """``command`` run in ``link``'s network namespace, in a UTS namespace of its own
    named ``link.host_name``, and with ``mounts`` in a mount namespace of its own too
    (root is needed for the network anyway, so never the user-namespace prefix)."""
    private = ("--mount", "--propagation", "private") if mounts else ()
    return ["nsenter", f"--net={link.namespace_path}", "--",
            "unshare", "--uts", *private, "--",
            "sh", "-c", _HOST_NAME_SCRIPT, "sh", link.host_name, *command]
