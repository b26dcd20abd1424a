"""``datasets=``: dask collections split into one shard per rank.

Both sides of the wire. On the driver, :func:`shard_datasets` computes each
collection's partitions on the cluster (``client.compute`` of its delayed
partitions; nothing is gathered to the driver) and deals them out, partition ``i``
to rank ``i % world_size``, as Ray splits a dataset's blocks over the workers. The
trainer waits for the partitions before it starts the ranks of each attempt
(:func:`wait_for_shards`): a rank that asked for a partition still being computed
would hold its worker's thread while the partition waits for one, and after a node
dies Dask recomputes the partitions it held (the client still wants them).

On a worker, a rank gets its :class:`DatasetShard` from
:func:`dckpt.train.get_dataset_shard`; reading it gathers the partition futures from
wherever they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import distributed

__all__ = ["DatasetShard", "shard_datasets", "wait_for_shards"]


class DatasetShard:
    """One rank's partitions of a dask DataFrame or Bag (what Ray's shard is to a
    ``ray.data.Dataset``).

    Read it with :meth:`to_pandas` (a DataFrame; a Bag's records become its rows),
    :meth:`iter_batches` (pandas DataFrames, or dicts of numpy arrays) or
    :meth:`partitions` (as they are). Each call fetches the partitions again; keep
    the result to read it twice.
    """

    name: str
    kind: str
    _futures: list[distributed.Future]

    def __init__(self, name: str, kind: str, futures: Sequence[distributed.Future]) -> None:
        self.name = name
        self.kind = kind
        self._futures = list(futures)

    def partitions(self) -> list[Any]:
        """This rank's partitions: pandas DataFrames, or lists of a Bag's records."""
        if not self._futures:
            return []
        return list(distributed.get_client().gather(self._futures))

    def to_pandas(self) -> Any:
        """The shard as one pandas DataFrame (empty when the rank got no partition)."""
        import pandas as pd

        parts = self.partitions()
        if self.kind == "bag":
            return pd.DataFrame([record for part in parts for record in part])
        return pd.concat(parts) if parts else pd.DataFrame()

    def iter_batches(self, batch_size: int | None = 256, batch_format: str = "pandas") -> Iterator[Any]:
        """Batches of at most ``batch_size`` rows (``None``: one per partition).

        ``batch_format`` is ``"pandas"`` (DataFrames) or ``"numpy"`` (dicts of
        column arrays), as in Ray.
        """
        if batch_format not in ("pandas", "numpy"):
            raise ValueError(f"batch_format must be 'pandas' or 'numpy', not {batch_format!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be None or at least 1, not {batch_size}")
        frame = self.to_pandas()
        step = batch_size or max(len(frame), 1)
        for start in range(0, len(frame), step):
            batch = frame.iloc[start:start + step]
            yield batch if batch_format == "pandas" else {
                str(column): batch[column].to_numpy() for column in batch.columns}

    def __len__(self) -> int:
        return len(self._futures)

    def __repr__(self) -> str:
        return f"DatasetShard({self.name!r}, {self.kind}, partitions={len(self._futures)})"


def _kind(collection: Any) -> str:
    module = type(collection).__module__
    if module.startswith("dask.dataframe") or module.startswith("dask_expr"):
        return "dataframe"
    if module.startswith("dask.bag"):
        return "bag"
    raise TypeError(
        f"datasets takes dask DataFrames and Bags, not {type(collection).__name__}: "
        "pass other data in train_loop_config"
    )


def shard_datasets(
    client: distributed.Client, datasets: Mapping[str, Any], world_size: int
) -> tuple[list[dict[str, DatasetShard]], list[distributed.Future]]:
    """Each rank's shards of ``datasets``, and every partition future (to wait on and
    to hold for the run: dropping them lets Dask forget the partitions)."""
    shards: list[dict[str, DatasetShard]] = [{} for _ in range(world_size)]
    held: list[distributed.Future] = []
    for name, collection in datasets.items():
        kind = _kind(collection)
        futures = client.compute(list(collection.to_delayed()))
        held.extend(futures)
        for rank in range(world_size):
            shards[rank][name] = DatasetShard(name, kind, futures[rank::world_size])
    return shards, held


def wait_for_shards(futures: Sequence[distributed.Future]) -> None:
    """Return once every partition is in memory on the cluster; raise its error if
    one failed to compute."""
    if futures:
        distributed.wait(futures)
        for future in futures:
            if future.status == "error":
                future.result()  # raises the partition's own error
