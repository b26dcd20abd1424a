"""``dckpt cluster --nodes N``: a local multi-node Dask cluster until interrupted.

Starts a :class:`~dckpt.cluster.NodeCluster` (each worker a simulated node, isolated in
a mount namespace where possible, on a network of its own with ``--network``), sets
dckpt up on it (:func:`dckpt.cluster.install`: a store on every worker and the
scheduler's registry, so ``dckpt ls`` works), prints
the scheduler's address and the nodes, and waits. Ctrl-C or SIGTERM stops every
process and removes the cluster's temporary folder; the exit status is then 0.
``scheduler/launch_local_cluster.py`` runs this.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dckpt.cli._output import at_least

NAME = "cluster"
SUMMARY = "run a local multi-node cluster until interrupted"
DESCRIPTION = """\
Start a local Dask cluster whose workers are simulated nodes (node-0, node-1, ...),
each with a storage root of its own, isolated in a mount namespace when possible
(Linux, as root or with user namespaces), and with --network in a network namespace
of its own as well (as root). dckpt is set up on it. Prints the scheduler
address and each node, then runs until Ctrl-C or SIGTERM, which stops everything.
Connect with distributed.Client("<scheduler address>") or dckpt ls --scheduler ADDR.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``cluster``."""
    parser.add_argument("--nodes", type=at_least(1), default=2, help="how many nodes (default 2)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="a mount namespace per node; --isolate fails where that "
                             "cannot be had (default: isolate when available)")
    parser.add_argument("--network", action=argparse.BooleanOptionalAction, default=False,
                        help="a network namespace per node too: its own address on a "
                             "bridge and host name; fails where that cannot be had "
                             "(needs root; default: off)")
    parser.add_argument("--link-rate", default=None, metavar="RATE",
                        help="with --network, limit each node's link to RATE both ways "
                             "(tc tbf), e.g. 1gbit or 100mbit")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--memory-limit", default="2GiB", help="memory limit per worker")


def run(args: argparse.Namespace) -> int:
    from dckpt.cluster import NodeCluster, install  # imports distributed: only here

    if not args.debug:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # SIGTERM ends the cluster like Ctrl-C does, so it is closed either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with NodeCluster(args.nodes, isolate=args.isolate, threads_per_worker=args.threads,
                         memory_limit=args.memory_limit, network=args.network,
                         link_rate=args.link_rate) as cluster:
            install(cluster.client(set_as_default=False))
            print(f"scheduler: {cluster.scheduler_address}")
            print(f"root: {cluster.root} (isolated: {cluster.isolated})")
            if cluster.network is not None:
                rate = cluster.network.rate_bits
                print(f"network: {cluster.network.subnet} on bridge {cluster.network.bridge}"
                      + (f", {rate} bit/s links" if rate else ""))
            for node in cluster.nodes:
                print(f"  {node.node_id}: {node.worker_address} pid {node.pid} root {node.root}")
            print("Press Ctrl-C to stop.", flush=True)
            signal.pause()
    except KeyboardInterrupt:
        # Also when it comes while starting, or inside print(): the with-block has
        # closed the cluster by now.
        print("Stopped.", file=sys.stderr)
    return 0
