"""Start a local multi-node Dask cluster (dckpt.cluster.NodeCluster) until Ctrl-C.

    python scheduler/launch_local_cluster.py --nodes 3 [--isolate | --no-isolate]

Connect with ``distributed.Client("<scheduler address>")``. Each worker is a simulated
node (``node-0``, ``node-1``, ...); isolated, each has a disk of its own.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from dckpt.cluster import NodeCluster


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="how many nodes (default 2)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="mount namespaces per node (default: when available)")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--memory-limit", default="2GiB", help="memory limit per worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # SIGTERM ends the launcher like Ctrl-C does, so the cluster is closed either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with NodeCluster(args.nodes, isolate=args.isolate, threads_per_worker=args.threads,
                     memory_limit=args.memory_limit) as cluster:
        # Ctrl-C may come as soon as the last line is out, still inside print().
        try:
            print(f"scheduler: {cluster.scheduler_address}")
            print(f"root: {cluster.root} (isolated: {cluster.isolated})")
            for node in cluster.nodes:
                print(f"  {node.node_id}: {node.worker_address} pid {node.pid} root {node.root}")
            print("Press Ctrl-C to stop.", flush=True)
            signal.pause()
        except KeyboardInterrupt:
            print("Stopping.", file=sys.stderr)


if __name__ == "__main__":
    main()
