"""Network namespaces for :class:`~dckpt.cluster.NodeCluster`: one per node, on a bridge.

One job: make, describe and remove a cluster's network — a Linux bridge on this
machine with an address of its own (where the scheduler and the driver live), and per
node a network namespace holding one end of a veth pair (named ``eth0`` there, with
the node's address) whose other end is a port of the bridge; optionally a ``tc tbf``
rate limit on both ends of each node's veth. It starts no process: the cluster runs
its workers inside the namespaces (``nsenter --net=...``).

Names. Everything a cluster makes is named ``dckpt<pid><letter><role>``: ``<pid>`` is
the process that made it, ``<letter>`` (``a`` to ``y``) tells apart the clusters of one
process, ``<role>`` is ``br`` for the bridge and the node index for a node's namespace
and its host-side veth (``dckpt4711a0``, ``dckpt4711a1``, ``dckpt4711abr``). Interface
names have at most 15 characters, which leaves two digits for the index: at most
:data:`MAX_NODES` nodes. The letter ``z`` is the probe's.

Leftovers. A process killed before it removed its network (SIGKILL, a crashed test run)
leaves its namespaces, veths and bridge behind; :func:`remove_stale` removes every one
whose owning process no longer runs (:func:`dckpt._locks.is_alive`), as
:func:`dckpt._formats._atomic.remove_stale_siblings` does for files, and every new
network calls it first. Names of live processes are never touched. Process ids are
those of this machine's pid namespace: processes that share its network namespace
should share one.

Addresses. Each network takes the first ``/24`` of :data:`SUBNETS` that overlaps no
address and no route of this machine (default routes aside); the bridge is ``.1``, node
``i`` is ``.(10 + i)``. Choosing the subnet and putting it on the bridge happen under
one machine-wide ``flock``, so concurrent clusters, in any process, get distinct
subnets. A node's namespace has routes to its ``/24`` only: nothing it sends can leave
the bridge.

Link rate. ``tbf`` limits what leaves an interface, so a node's link is limited both
ways by one ``tbf`` on the host-side veth (what the node receives) and one on ``eth0``
in its namespace (what it sends): a full-duplex link of that rate. The burst is 8 ms of
the rate and at least :data:`_MIN_BURST_BYTES` (a 64 KiB GSO segment must fit);
measured here with a 200 MiB TCP stream into a namespace at 1gbit, a 1 ms burst gave
0.82 of the rate, 2 ms 0.88 and 8 ms 0.96-0.98. ``latency 20ms`` bounds the queue
(rate x 20 ms + burst; 2.5 MB at 1gbit) so a sender sees back-pressure, as on a switch.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from dckpt._locks import flocked, is_alive

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_NODES",
    "SUBNETS",
    "ClusterNetwork",
    "NetworkSetupError",
    "NodeLink",
    "create",
    "hosts_file",
    "parse_rate",
    "probe",
    "remove",
    "remove_stale",
]

PREFIX = "dckpt"
#: The most nodes one network can have: interface names keep two digits for the index.
MAX_NODES = 100
#: Where networks take their /24 from: private (RFC 1918) and rarely used.
SUBNETS = ipaddress.IPv4Network("10.220.0.0/16")
_HOST_OFFSET = 1  # the bridge's address in its /24
_NODE_OFFSET = 10  # node i is .(10 + i)
_NAME = re.compile(rf"^{PREFIX}(?P<pid>\d+)(?P<letter>[a-z])(?P<role>br|\d+)$")
_LETTERS = "abcdefghijklmnopqrstuvwxy"
_PROBE_LETTER = "z"
_NODE_DEVICE = "eth0"  # the node's end of its veth, inside its namespace
_BURST_SECONDS = 0.008
_MIN_BURST_BYTES = 96 * 1024
_TBF_LATENCY = "20ms"
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE = re.compile(r"^\s*(?P<value>\d+(?:\.\d*)?)\s*(?P<unit>[kmgt]?bit)\s*$", re.IGNORECASE)
_COMMAND_TIMEOUT = 30.0


class NetworkSetupError(RuntimeError):
    """An ``ip`` or ``tc`` command that sets up a cluster's network failed.

    Internal: :class:`~dckpt.cluster.NodeCluster` turns it into the error its caller
    sees, with this message (the command and what it printed).
    """


@dataclass(frozen=True)
class NodeLink:
    """One node's end of a cluster network.

    Attributes
    ----------
    index
        The node's index in its cluster.
    namespace
        The name of its network namespace (``ip netns``; ``/run/netns/<name>``).
    veth
        The host-side end of its veth pair, a port of the bridge; the other end is
        ``eth0`` inside the namespace.
    address
        Its IPv4 address (on ``eth0``).
    host_name
        The host name its processes see, ``node-<index>``.
    """

    index: int
    namespace: str
    veth: str
    address: str
    host_name: str

    @property
    def namespace_path(self) -> str:
        """The file that names the namespace, for ``nsenter --net=``."""
        return f"/run/netns/{self.namespace}"


@dataclass
class ClusterNetwork:
    """A cluster's bridge, subnet and node links, as made by :func:`create`.

    Attributes
    ----------
    tag
        The prefix of every name it made, ``dckpt<pid><letter>``.
    subnet
        Its ``/24``.
    bridge
        The bridge's interface name.
    host_address
        The bridge's address: this machine (scheduler, driver) as the nodes reach it.
    rate_bits
        The link rate in bits per second, or None for no limit.
    links
        One per node, by index.
    """

    tag: str
    subnet: ipaddress.IPv4Network
    bridge: str
    host_address: str
    rate_bits: int | None
    links: list[NodeLink] = field(default_factory=list)


def parse_rate(rate: str | int) -> int:
    """A link rate in bits per second, from ``"1gbit"``-style text or an int.

    Parameters
    ----------
    rate
        An int (bits per second) or a number with one of tc's bit units: ``bit``,
        ``kbit``, ``mbit``, ``gbit``, ``tbit`` (powers of 1000, any case). tc's byte
        units (``mbps`` means megabytes per second) are refused, being easy to misread.

    Raises
    ------
    TypeError
        If ``rate`` is neither text nor an int.
    ValueError
        If ``rate`` is text that is no such rate, or below 8 kbit/s.
    """
    bits: float
    if isinstance(rate, bool) or not isinstance(rate, (int, str)):
        raise TypeError(f"link_rate={rate!r}: expected text such as '1gbit' or an int of bits/s")
    if isinstance(rate, int):
        bits = rate
    else:
        match = _RATE.match(rate)
        if match is None:
            raise ValueError(
                f"link_rate={rate!r} is not a rate; write it as tc does in bits per second, "
                "e.g. '1gbit', '100mbit' or '500kbit' (or an int of bits/s)"
            )
        bits = float(match["value"]) * _RATE_UNITS[match["unit"].lower()]
    if bits < 8000:  # below 1 kB/s nothing useful gets through, and tbf rounds it away
        raise ValueError(f"link_rate={rate!r} is too low; give at least 8kbit")
    return int(bits)


def _run(command: Sequence[str]) -> str:
    """Run one ``ip``/``tc`` command; its stdout, or NetworkSetupError with its stderr."""
    try:
        result = subprocess.run(
            list(command), check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=_COMMAND_TIMEOUT,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetworkSetupError(f"`{' '.join(command)}` failed: {e}") from e
    if result.returncode != 0:
        raise NetworkSetupError(
            f"`{' '.join(command)}` failed (exit {result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    return result.stdout


def _tbf(device: str, rate_bits: int, namespace: str | None = None) -> list[str]:
    burst = max(int(rate_bits / 8 * _BURST_SECONDS), _MIN_BURST_BYTES)
    where = ["-n", namespace] if namespace else []
    return ["tc", *where, "qdisc", "add", "dev", device, "root", "tbf",
            "rate", f"{rate_bits}bit", "burst", str(burst), "latency", _TBF_LATENCY]


@functools.cache
def probe() -> tuple[str, str]:
    """Why network namespaces, and why ``tc tbf``, cannot be had here ("" if they can).

    Makes a throwaway namespace (named with this process and the letter ``z``) with a
    bridge and a veth pair inside it, and a ``tbf`` on the veth; nothing of it is in
    this machine's own network. Cached: the answer does not change.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})", "no Linux"
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH", "no network namespaces"
    name = f"{PREFIX}{os.getpid()}{_PROBE_LETTER}0"
    with contextlib.suppress(NetworkSetupError):
        _run(["ip", "netns", "del", name])  # a probe of an earlier process with our pid
    try:
        _run(["ip", "netns", "add", name])
    except NetworkSetupError as e:
        return str(e), "no network namespaces"
    try:
        try:
            _run(["ip", "-n", name, "link", "add", "probebr", "type", "bridge"])
            _run(["ip", "-n", name, "link", "add", "probe0", "type", "veth",
                  "peer", "name", "probe1"])
        except NetworkSetupError as e:
            return str(e), "no network namespaces"
        if shutil.which("tc") is None:
            return "", "tc not found on PATH"
        try:
            _run(_tbf("probe0", 10**9, namespace=name))
        except NetworkSetupError as e:
            return "", str(e)
        return "", ""
    finally:
        with contextlib.suppress(NetworkSetupError):
            _run(["ip", "netns", "del", name])


def _names() -> tuple[list[str], list[str]]:
    """The names of this machine's network namespaces and of its interfaces."""
    namespaces = [n["name"] for n in json.loads(_run(["ip", "-j", "netns", "list"]) or "[]")]
    links = [n["ifname"] for n in json.loads(_run(["ip", "-j", "link", "show"]) or "[]")]
    return namespaces, links


def _lock_path() -> str:
    # One lock for the machine: /run/lock where it is (root), else the temp folder.
    folder = "/run/lock" if os.access("/run/lock", os.W_OK) else tempfile.gettempdir()
    return os.path.join(folder, f"{PREFIX}-netns.lock")


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    with flocked(_lock_path()):
        yield


def remove_stale() -> list[str]:
    """Remove the namespaces, veths and bridges of networks whose process is gone.

    Returns
    -------
    list of str
        The names removed. Failures are logged, never raised: a leftover costs an
        interface and a /24, not correctness.
    """
    with _machine_lock():
        return _remove_stale()


def _dead(name: str) -> bool:
    match = _NAME.match(name)
    return match is not None and not is_alive(int(match["pid"]))


def _remove_stale() -> list[str]:
    removed = []
    namespaces, _ = _names()
    for name in filter(_dead, namespaces):
        logger.info("Removing network namespace %s, left by a process that is gone", name)
        try:
            _run(["ip", "netns", "del", name])
            removed.append(name)
        except NetworkSetupError as e:
            logger.warning("Could not remove the leftover namespace %s: %s", name, e)
    # Deleting a namespace deletes the veths in it and their peers: list links anew.
    _, links = _names()
    for name in filter(_dead, links):
        logger.info("Removing interface %s, left by a process that is gone", name)
        if _delete_link(name, "leftover"):
            removed.append(name)
    return removed


def _delete_link(name: str, whose: str) -> bool:
    """Delete interface ``name``; True if it is gone. Logs, never raises."""
    try:
        _run(["ip", "link", "del", name])
    except NetworkSetupError as e:
        # The kernel tears a deleted namespace's veth pairs down in the background:
        # a veth listed a moment ago may be gone by now, which is what we wanted.
        if _link_exists(name):
            logger.warning("Could not remove the %s interface %s: %s", whose, name, e)
            return False
    return True


def _link_exists(name: str) -> bool:
    try:
        _run(["ip", "link", "show", "dev", name])
    except NetworkSetupError:
        return False
    return True


def _free_subnet() -> ipaddress.IPv4Network:
    """The first /24 of SUBNETS that no address or route of this machine overlaps."""
    taken = []
    for entry in json.loads(_run(["ip", "-j", "-4", "addr", "show"]) or "[]"):
        for info in entry.get("addr_info", []):
            taken.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}",
                                                strict=False))
    for route in json.loads(_run(["ip", "-j", "-4", "route", "show", "table", "all"]) or "[]"):
        destination = route.get("dst", "default")
        if destination != "default":
            taken.append(ipaddress.IPv4Network(destination, strict=False))
    for subnet in SUBNETS.subnets(new_prefix=24):
        if not any(subnet.overlaps(other) for other in taken if other.prefixlen > 0):
            return subnet
    raise NetworkSetupError(
        f"every /24 of {SUBNETS} is in use on this machine (by addresses or routes); "
        "remove stale networks (`ip link`, `ip netns list`) or free one"
    )


def _free_tag(namespaces: list[str], links: list[str]) -> str:
    own = f"{PREFIX}{os.getpid()}"
    used = {m["letter"] for name in [*namespaces, *links]
            if (m := _NAME.match(name)) and name.startswith(own) and m["pid"] == str(os.getpid())}
    for letter in _LETTERS:
        if letter not in used:
            return own + letter
    raise NetworkSetupError(
        f"this process already runs {len(_LETTERS)} cluster networks; close one first"
    )


def create(n_nodes: int, rate_bits: int | None = None) -> ClusterNetwork:
    """Make a network of ``n_nodes`` nodes; remove the leftovers of dead ones first.

    Parameters
    ----------
    n_nodes
        How many node namespaces, 1 to :data:`MAX_NODES`.
    rate_bits
        A ``tbf`` rate limit for both directions of each node's link, in bits per
        second; None for none (veths then run at memory speed).

    Raises
    ------
    NetworkSetupError
        If a command fails; what was made by then is removed again.
    """
    if not 1 <= n_nodes <= MAX_NODES:
        raise ValueError(f"a cluster network has 1 to {MAX_NODES} nodes, not {n_nodes}")
    with _machine_lock():
        _remove_stale()
        tag = _free_tag(*_names())
        subnet = _free_subnet()
        hosts = list(subnet.hosts())
        network = ClusterNetwork(
            tag=tag, subnet=subnet, bridge=f"{tag}br",
            host_address=str(hosts[_HOST_OFFSET - 1]), rate_bits=rate_bits,
        )
        try:
            _run(["ip", "link", "add", network.bridge, "type", "bridge"])
            # Holding the /24 is what the lock is for: from here `ip route` shows it.
            _run(["ip", "addr", "add", f"{network.host_address}/{subnet.prefixlen}",
                  "dev", network.bridge])
            _run(["ip", "link", "set", network.bridge, "up"])
        except BaseException:
            remove(network)
            raise
    try:
        for index in range(n_nodes):
            network.links.append(_add_node(network, index, str(hosts[_NODE_OFFSET + index - 1])))
    except BaseException:
        remove(network)
        raise
    logger.debug("Cluster network %s on %s (bridge %s at %s), %d nodes%s", tag, subnet,
                 network.bridge, network.host_address, n_nodes,
                 f", {rate_bits} bit/s links" if rate_bits else "")
    return network


def _add_node(network: ClusterNetwork, index: int, address: str) -> NodeLink:
    name = f"{network.tag}{index}"
    link = NodeLink(index=index, namespace=name, veth=name, address=address,
                    host_name=f"node-{index}")
    _run(["ip", "netns", "add", name])
    # The peer is made inside the namespace, so no stray eth0 ever shows on the host.
    _run(["ip", "link", "add", name, "type", "veth", "peer", "name", _NODE_DEVICE,
          "netns", name])
    _run(["ip", "link", "set", name, "master", network.bridge, "up"])
    _run(["ip", "-n", name, "addr", "add", f"{address}/{network.subnet.prefixlen}",
          "dev", _NODE_DEVICE])
    _run(["ip", "-n", name, "link", "set", _NODE_DEVICE, "up"])
    _run(["ip", "-n", name, "link", "set", "lo", "up"])
    if network.rate_bits is not None:
        _run(_tbf(name, network.rate_bits))  # what the node receives
        _run(_tbf(_NODE_DEVICE, network.rate_bits, namespace=name))  # what it sends
    return link


def remove(network: ClusterNetwork) -> None:
    """Remove a network's namespaces, veths and bridge (their qdiscs go with them).

    Idempotent, and safe on a network half made. Failures are logged, not raised.
    Deleting a namespace deletes its veth pair unless a process still runs in it, so
    the host-side veths are deleted explicitly too.
    """
    namespaces, links = _names_or_empty()
    own = [n for n in namespaces if n.startswith(network.tag) and _NAME.match(n)]
    for name in own:
        with contextlib.suppress(NetworkSetupError):
            _run(["ip", "netns", "del", name])
    _, links = _names_or_empty()
    for name in [n for n in links if n.startswith(network.tag) and _NAME.match(n)]:
        _delete_link(name, f"cluster network {network.tag}'s")


def _names_or_empty() -> tuple[list[str], list[str]]:
    try:
        return _names()
    except (NetworkSetupError, ValueError) as e:
        logger.warning("Could not list network namespaces and interfaces: %s", e)
        return [], []


def hosts_file(network: ClusterNetwork) -> str:
    """An ``/etc/hosts`` for the nodes: each node's name, and the host as ``dckpt-host``."""
    lines = ["127.0.0.1 localhost", f"{network.host_address} dckpt-host"]
    lines += [f"{link.address} {link.host_name}" for link in network.links]
    return "\n".join(lines) + "\n"
