"""``datasets=``: dask collections split into one shard per rank.

Both sides of the wire. On the driver, :func:`shard_datasets` computes each
collection's partitions on the cluster (``client.compute`` of its delayed
partitions; nothing is gathered to the driver) and deals them out in contiguous runs
of (nearly) equal length, rank 0 first, as Ray 2.x's ``Dataset.split(n)`` does with
blocks: 5 partitions on 2 ranks are ``[0, 1, 2]`` and ``[3, 4]``.

Each rank's partition futures are arguments of its task, so Dask itself moves them to
the rank's worker before the rank starts, and computes them again after the node
that held them died (the driver still holds them): no rank waits for data inside its
task thread. On the worker, :func:`shards_of` makes them the rank's
:class:`DatasetShard` objects, which :func:`dckpt.train.get_dataset_shard` returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import distributed

__all__ = ["DatasetShard", "ShardArgument", "dataset_kind", "runs", "shard_datasets",
           "shards_of"]


class DatasetShard:
    """One rank's partitions of a dask DataFrame or Bag (what Ray's shard is to a
    ``ray.data.Dataset``).

    Read it with :meth:`to_pandas` (a DataFrame; a Bag's records become its rows),
    :meth:`iter_batches` (pandas DataFrames, or dicts of numpy arrays) or
    :meth:`partitions` (as they are). The partitions are in this worker's memory.
    """

    name: str
    kind: str
    _partitions: list[Any]

    def __init__(self, name: str, kind: str, partitions: Sequence[Any]) -> None:
        self.name = name
        self.kind = kind
        self._partitions = list(partitions)

    def partitions(self) -> list[Any]:
        """This rank's partitions: pandas DataFrames, or lists of a Bag's records."""
        return list(self._partitions)

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
        return len(self._partitions)

    def __repr__(self) -> str:
        return f"DatasetShard({self.name!r}, {self.kind}, partitions={len(self._partitions)})"


def dataset_kind(collection: Any) -> str:
    """``"dataframe"`` or ``"bag"``; a ``TypeError`` for anything else."""
    module = type(collection).__module__
    if module.startswith("dask.dataframe") or module.startswith("dask_expr"):
        return "dataframe"
    if module.startswith("dask.bag"):
        return "bag"
    raise TypeError(
        f"datasets takes dask DataFrames and Bags, not {type(collection).__name__}: "
        "pass other data in train_loop_config"
    )


#: What a rank's task gets for its shards: ``{name: (kind, partition futures)}``, a
#: dict of tuples of lists, which Dask resolves to the partitions' data.
ShardArgument = dict[str, tuple[str, list[Any]]]


def shard_datasets(
    client: distributed.Client, datasets: Mapping[str, Any], world_size: int
) -> tuple[list[ShardArgument], list[distributed.Future]]:
    """Each rank's task argument for its shards of ``datasets``, and every partition
    future (the driver holds them for the run: dropping them lets Dask forget the
    partitions)."""
    arguments: list[ShardArgument] = [{} for _ in range(world_size)]
    held: list[distributed.Future] = []
    for name, collection in datasets.items():
        kind = dataset_kind(collection)
        futures = client.compute(list(collection.to_delayed()))
        held.extend(futures)
        for rank, (start, stop) in enumerate(runs(len(futures), world_size)):
            arguments[rank][name] = (kind, futures[start:stop])
    return arguments, held


def shards_of(argument: ShardArgument | None) -> dict[str, DatasetShard] | None:
    """A rank's :class:`DatasetShard` objects, from its task's resolved argument."""
    if argument is None:
        return None
    return {name: DatasetShard(name, kind, parts) for name, (kind, parts) in argument.items()}


def runs(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, stop)`` ranges covering ``range(count)``, the
    first ``count % parts`` one longer."""
    size, extra = divmod(count, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + size + (1 if part < extra else 0))
    return list(zip(bounds, bounds[1:]))


