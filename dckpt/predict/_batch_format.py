"""Batch format for batch prediction: pick columns, cut, glue, keep columns, records
to and from a DataFrame, and the :class:`ScoreOptions` that say which.

Not the predictor (:mod:`dckpt.predict._batch_predictor`): what the scorers
(:mod:`dckpt.predict._batch_scorer`) do to each batch. Pure and worker-side: it sees
one batch (a numpy array, a dict of arrays or a pandas DataFrame, as
:class:`~dckpt.predict.Predictor` takes them) at a time. numpy and pandas are imported
only when a batch of theirs is seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dckpt.errors import BatchFormatError
from dckpt.predict._predictor import _check_batch, _kind

__all__ = [
    "ScoreOptions",
    "concat",
    "frame_to_records",
    "keep_columns",
    "records_to_frame",
    "select_columns",
    "split",
]


@dataclass(frozen=True)
class ScoreOptions:
    """How each batch is scored: what :meth:`BatchPredictor.predict` was asked."""

    feature_columns: tuple[str, ...] | None = None
    keep_columns: tuple[str, ...] | None = None
    batch_size: int | None = None
    predict_kwargs: Mapping[str, Any] = field(default_factory=dict)


def num_rows(batch: Any) -> int:
    """Rows of a batch; a dict's first array sets it."""
    if _kind(batch) == "dict":
        return len(next(iter(batch.values()))) if batch else 0
    return len(batch)


def select_columns(batch: Any, columns: Sequence[str] | None) -> Any:
    """``batch`` restricted to ``columns`` (None: all of it)."""
    if columns is None:
        return batch
    _check_columns(batch, columns, "feature_columns")
    if _kind(batch) == "dict":
        return {name: batch[name] for name in columns}
    return batch[list(columns)]


def keep_columns(batch: Any, predictions: Any, columns: Sequence[str] | None) -> Any:
    """``predictions`` with ``columns`` of ``batch`` added, row for row (as Ray does)."""
    if not columns:
        return predictions
    _check_columns(batch, columns, "keep_columns")
    kind = _kind(predictions)
    if kind not in ("pandas", "dict"):
        raise BatchFormatError(
            f"keep_columns needs predictions with columns (a DataFrame or a dict), "
            f"not {type(predictions).__name__}"
        )
    taken = [name for name in columns if name in predictions]
    if taken:
        raise BatchFormatError(f"keep_columns {taken} would overwrite prediction columns")
    if num_rows(predictions) != num_rows(batch):
        raise BatchFormatError(
            f"{num_rows(predictions)} predictions for {num_rows(batch)} rows: keep_columns "
            "needs one prediction per row"
        )
    if kind == "dict":
        return {**predictions, **{name: _values(batch[name]) for name in columns}}
    out = predictions.copy()
    for name in columns:
        out[name] = _values(batch[name])  # by position: the predictor may reset the index
    return out


def split(batch: Any, size: int | None) -> list[Any]:
    """``batch`` cut into batches of at most ``size`` rows (None: one batch)."""
    rows = num_rows(batch)
    if size is None or rows <= size:
        return [batch]
    kind = _kind(batch)
    out = []
    for start in range(0, rows, size):
        if kind == "dict":
            out.append({name: array[start:start + size] for name, array in batch.items()})
        elif kind == "pandas":
            out.append(batch.iloc[start:start + size])
        else:
            out.append(batch[start:start + size])
    return out


def concat(parts: Sequence[Any]) -> Any:
    """Predictions of consecutive batches glued back into one."""
    if len(parts) == 1:
        return parts[0]
    kind = _kind(parts[0])
    if kind == "pandas":
        import pandas as pd

        return pd.concat(parts)
    import numpy as np

    if kind == "dict":
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
    return np.concatenate(parts)


def records_to_frame(records: Iterable[Any]) -> Any:
    """A bag partition of records (mappings) as one pandas DataFrame."""
    import pandas as pd

    rows = list(records)
    for row in rows:
        if not isinstance(row, Mapping):
            raise TypeError(
                "BatchPredictor scores a dask Bag of records (dicts), not of "
                f"{type(row).__name__}; pass a list of batches for other kinds"
            )
    return pd.DataFrame.from_records(rows)


def frame_to_records(predictions: Any) -> list[dict[str, Any]]:
    """Predictions of a bag partition as records again: one dict per row."""
    kind = _kind(predictions)
    if kind == "pandas":
        return list(predictions.to_dict(orient="records"))
    if kind == "dict":
        import pandas as pd

        return list(pd.DataFrame(predictions).to_dict(orient="records"))
    raise BatchFormatError(
        f"predictions of a Bag must have columns (a DataFrame or a dict), not "
        f"{type(predictions).__name__}"
    )


def _check_columns(batch: Any, columns: Sequence[str], what: str) -> None:
    _check_batch(batch)
    if _kind(batch) == "numpy":
        raise BatchFormatError(f"{what} {list(columns)} given for an array, which has no columns")
    missing = [name for name in columns if name not in batch]
    if missing:
        raise BatchFormatError(
            f"{what}: no column {missing} in the data; it has {list(batch.keys())}"
        )


def _values(column: Any) -> Any:
    to_numpy = getattr(column, "to_numpy", None)
    return to_numpy() if callable(to_numpy) else column
