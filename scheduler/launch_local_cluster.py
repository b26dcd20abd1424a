"""Start a local multi-node Dask cluster (dckpt.cluster.NodeCluster) until Ctrl-C.

    python scheduler/launch_local_cluster.py --nodes 3 [--isolate | --no-isolate]
        [--network [--link-rate 1gbit]]

The same as ``dckpt cluster`` (:mod:`dckpt.cli._cluster`), for where the console
script is not on the PATH. Connect with ``distributed.Client("<scheduler address>")``.
"""

from __future__ import annotations

import sys

from dckpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
