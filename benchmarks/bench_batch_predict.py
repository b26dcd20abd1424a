"""Batch prediction with dckpt's placement against the naive way, in one run.

    python benchmarks/bench_batch_predict.py [--nodes 3] [--partitions 200]
                                             [--rows 2000] [--model-mib 8] [--repeat 2]

Starts an isolated ``NodeCluster`` (each worker a node in a mount namespace of its own),
writes a directory checkpoint holding a linear model plus ``--model-mib`` of ballast on
node 0, and scores a dask DataFrame of ``--partitions`` partitions two ways:

- dckpt: ``BatchPredictor(checkpoint, SklearnLikePredictor).predict(ddf, ...)``: one
  scorer actor per worker, placed where the checkpoint is first, the model loaded once
  per worker, scoring tasks restricted to those workers;
- naive: ``ddf.map_partitions(score, checkpoint)``: the checkpoint passed into every
  task, and the model loaded from it for every partition.

Each is timed from the call to the computed result (the dckpt figure includes creating
the actors and loading the models), best of ``--repeat``, each with a fresh checkpoint
so that no node has a cached copy. Printed: wall times and their ratio, model loads,
bytes moved between nodes (the stores' ``bytes_received``, measured), and the bytes
read and unpickled by loads (checkpoint size times loads). Both ways get the checkpoint
as a node reference, so dckpt's node cache serves the naive tasks too: without it,
each naive load would also be a copy of the checkpoint over the network, the
"checkpoint size times loads" line.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid

import cloudpickle
import dask.dataframe as dd
import numpy as np
import pandas as pd
from distributed import Client

from dckpt import Checkpoint
from dckpt.cluster import NodeCluster, install, stats
from dckpt.predict import BatchPredictor, SklearnLikePredictor

FEATURES = ["f0", "f1", "f2", "f3"]


class BallastLinear:
    """y = X @ w, carrying ``ballast_mib`` of random bytes like a real model's weights."""

    def __init__(self, w: np.ndarray, ballast_mib: int, seed: int) -> None:
        self.w = w
        self.ballast = np.random.default_rng(seed).bytes(ballast_mib << 20)

    def predict(self, X):
        return np.asarray(X, dtype=float) @ self.w


def write_checkpoint(model_mib: int) -> Checkpoint:
    """On node 0: a directory checkpoint with the model in ``model.pkl``.

    Of new content each time (a checkpoint is its content: the same bytes again would
    be in every node's cache already, and the run would measure a warm cache).
    """
    from dckpt import _node

    path = os.path.join(_node.node_root(), f"model-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, "model.pkl"), "wb") as f:
        cloudpickle.dump(BallastLinear(np.arange(1.0, 5.0), model_mib, uuid.uuid4().int), f)
    return Checkpoint.from_directory(path)


def make_partition(index: int, rows: int) -> pd.DataFrame:
    """Partition ``index``, made where it is computed (no data in the graph)."""
    rng = np.random.default_rng(index)
    return pd.DataFrame(rng.random((rows, len(FEATURES))), columns=FEATURES,
                        index=pd.RangeIndex(index * rows, (index + 1) * rows))


def naive_score(part: pd.DataFrame, checkpoint: Checkpoint) -> pd.DataFrame:
    """The naive task: load the model from the checkpoint, for this partition alone."""
    return SklearnLikePredictor.from_checkpoint(checkpoint).predict(part[FEATURES])


def received(client: Client) -> tuple[int, int]:
    counters = stats(client).values()
    return sum(s["transfers"] for s in counters), sum(s["bytes_received"] for s in counters)


def run(client: Client, owner: str, ddf: dd.DataFrame, model_mib: int, way: str) -> dict:
    checkpoint = client.submit(write_checkpoint, model_mib, workers=[owner], pure=False).result()
    size = checkpoint.get_internal_representation()[1].size
    before = received(client)
    start = time.perf_counter()
    if way == "dckpt":
        with BatchPredictor(checkpoint, SklearnLikePredictor) as predictor:
            result = client.compute(predictor.predict(ddf, feature_columns=FEATURES,
                                                      client=client)).result()
            loads = len(predictor.scoring_workers)
    else:
        meta = pd.DataFrame({"predictions": pd.Series(dtype=float)})
        result = client.compute(ddf.map_partitions(naive_score, checkpoint, meta=meta)).result()
        loads = ddf.npartitions
    seconds = time.perf_counter() - start
    after = received(client)
    return {"seconds": seconds, "rows": len(result), "loads": loads, "size": size,
            "transfers": after[0] - before[0], "bytes": after[1] - before[1],
            "predictions": result["predictions"].sort_index().to_numpy()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=200)
    parser.add_argument("--rows", type=int, default=2000, help="rows per partition")
    parser.add_argument("--model-mib", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    ddf = dd.from_map(make_partition, range(args.partitions), rows=args.rows,
                      meta=make_partition(0, 0), enforce_metadata=False)
    with NodeCluster(args.nodes, isolate=True) as cluster:
        client = cluster.client(set_as_default=False)
        install(client)
        owner = cluster.nodes[0].worker_address
        best: dict[str, dict] = {}
        for _ in range(args.repeat):
            for way in ("dckpt", "naive"):
                figures = run(client, owner, ddf, args.model_mib, way)
                if way not in best or figures["seconds"] < best[way]["seconds"]:
                    best[way] = figures
        client.close()

    # Batches of other sizes may round differently in the last bits: compare with a tolerance.
    if not np.allclose(best["dckpt"]["predictions"], best["naive"]["predictions"],
                       rtol=1e-12, atol=1e-12):
        raise SystemExit("the two ways disagree: their predictions differ beyond rounding")
    mib = 1 << 20
    print(f"{args.nodes} nodes, {args.partitions} partitions of {args.rows} rows, "
          f"checkpoint of {best['dckpt']['size'] / mib:.1f} MiB on node 0, best of {args.repeat}")
    print(f"{'':8} {'wall s':>8} {'loads':>6} {'transfers':>9} {'moved MiB':>10} {'loaded MiB':>11}")
    for way in ("dckpt", "naive"):
        f = best[way]
        print(f"{way:8} {f['seconds']:8.2f} {f['loads']:6d} {f['transfers']:9d} "
              f"{f['bytes'] / mib:10.1f} {f['loads'] * f['size'] / mib:11.1f}")
    print(f"naive / dckpt wall time: {best['naive']['seconds'] / best['dckpt']['seconds']:.2f}x")
    print(f"without a node cache, naive would copy about "
          f"{best['naive']['loads'] * best['naive']['size'] / mib:.0f} MiB between processes "
          f"(size x loads); dckpt moved {best['dckpt']['bytes'] / mib:.1f} MiB")


if __name__ == "__main__":
    main()
