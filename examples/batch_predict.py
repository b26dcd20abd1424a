"""Locality-aware batch prediction: a model trained on node 0 scores 300 partitions on
three nodes, and its checkpoint moves to each other node once.

Run it with ``python examples/batch_predict.py`` (about 20 s; it needs the ``predict``
extra: ``pip install -e '.[predict]'``). It starts an isolated three-node
``NodeCluster`` (each worker a node that cannot see the others' files), fits a small
least-squares model in a task on node 0 and writes it there as a directory checkpoint
(a few MiB), then scores a dask DataFrame of 300 partitions with
``BatchPredictor``: one predictor per worker, node 0 first, each partition scored
beside a loaded model. It prints what each node received and how many models loaded.
"""

from __future__ import annotations

import os

import cloudpickle

try:
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd
except ModuleNotFoundError as e:  # numpy, pandas, pyarrow: the `predict` extra
    raise SystemExit(f"This example needs {e.name}: pip install -e '.[predict]'") from None

from dckpt import Checkpoint
from dckpt.cluster import NodeCluster, install, stats
from dckpt.predict import BatchPredictor, SklearnLikePredictor

FEATURES = ["x0", "x1", "x2"]
TRUE_W = np.array([1.5, -2.0, 0.25])


class LeastSquares:
    """A linear model fitted by least squares, with a made-up 4 MiB embedding table so
    that moving it shows in the byte counts."""

    def __init__(self, w: np.ndarray) -> None:
        self.w = w
        self.embeddings = np.random.default_rng(0).random((1 << 19,))  # 4 MiB

    def predict(self, X):
        return np.asarray(X, dtype=float) @ self.w


def partition(index: int, rows: int = 1000) -> pd.DataFrame:
    """One partition of features, a label and an id, made where it is computed."""
    rng = np.random.default_rng(index)
    X = rng.random((rows, len(FEATURES)))
    frame = pd.DataFrame(X, columns=FEATURES, index=pd.RangeIndex(index * rows, (index + 1) * rows))
    frame["label"] = X @ TRUE_W + rng.normal(0, 0.01, rows)
    frame["id"] = frame.index
    return frame


def train_on_this_node() -> Checkpoint:
    """In a task on node 0: fit the model and write it as a directory checkpoint."""
    from dckpt import node_root

    train = partition(10_000)
    w, *_ = np.linalg.lstsq(train[FEATURES].to_numpy(), train["label"].to_numpy(), rcond=None)
    path = os.path.join(node_root(), "least-squares")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.pkl"), "wb") as f:
        cloudpickle.dump(LeastSquares(w), f)
    return Checkpoint.from_directory(path)  # returned to the driver as a reference


def main() -> None:
    with NodeCluster(3, isolate=True) as cluster:
        client = cluster.client(set_as_default=False)
        install(client)
        node0 = cluster.nodes[0].worker_address
        checkpoint = client.submit(train_on_this_node, workers=[node0], pure=False).result()
        print(f"trained on node 0: {checkpoint!r}")

        ddf = dd.from_map(partition, range(300), meta=partition(0, 0), enforce_metadata=False)
        with BatchPredictor(checkpoint, SklearnLikePredictor) as predictor:
            scores = predictor.predict(ddf, feature_columns=FEATURES,
                                       keep_columns=["id", "label"], client=client)
            result = client.compute(scores).result()
            print(f"scored {len(result)} rows in {ddf.npartitions} partitions on "
                  f"{len(predictor.scoring_workers)} workers")
        error = (result["predictions"] - result["label"]).abs().mean()
        print(f"mean absolute error: {error:.4f}")

        print(f"{'node':8} {'worker':24} {'transfers':>9} {'bytes received':>15} {'bytes sent':>11}")
        for info in cluster.nodes:
            s = stats(client)[info.worker_address]
            print(f"{s['node_id']:8} {info.worker_address:24} {s['transfers']:9d} "
                  f"{s['bytes_received']:15,d} {s['bytes_sent']:11,d}")
        client.close()


if __name__ == "__main__":
    main()
