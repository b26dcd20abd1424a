"""Ranking checkpoints by a metric (to keep the best K), and metrics as JSON data.

Pure functions, no I/O: what :class:`~dckpt.train.CheckpointManager` keeps follows
from :func:`rank_key` alone. (Scoring data with a model is batch prediction's:
:mod:`dckpt.predict._batch_scorer`.)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from dckpt.errors import MetricNotFoundError

__all__ = ["jsonable_metrics", "rank_key", "score_of"]

#: A checkpoint's place in the ranking: greater is better.
RankKey = tuple[bool, float, int]


def score_of(
    metrics: Mapping[str, Any], attribute: str, what: str = "checkpoint_score_attribute"
) -> float:
    """The value of ``attribute`` in ``metrics`` as a float (NaN allowed).

    A dotted attribute reaches into nested dicts (``"val.loss"``); a top-level key
    spelled exactly like the attribute wins over the nested lookup. ``what`` names the
    attribute in error messages.

    Raises
    ------
    MetricNotFoundError
        ``attribute`` is not in ``metrics``.
    TypeError
        Its value is not a real number (``bool`` is not taken for one).
    """
    if attribute in metrics:
        value = metrics[attribute]
    else:
        value = metrics
        parts = attribute.split(".")
        for i, part in enumerate(parts):
            if not isinstance(value, Mapping) or part not in value:
                where = "the metrics" if i == 0 else "metrics" + "".join(
                    f"[{p!r}]" for p in parts[:i])
                keys = sorted(map(str, value)) if isinstance(value, Mapping) else []
                raise MetricNotFoundError(
                    f"{what} {attribute!r} is not among the reported "
                    f"metrics: {where} has no key {part!r} (keys present: {keys}); report "
                    f"it with every checkpoint, or change {what}"
                )
            value = value[part]
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(
            f"{what} {attribute!r} must be a number to rank "
            f"checkpoints by, but it is {value!r} ({type(value).__name__})"
        )
    return float(value)


def rank_key(score: float | None, order: str, index: int) -> RankKey:
    """The sort key of a checkpoint: greater is better.

    ``score`` None ranks by ``index`` (the latest is the best). NaN ranks below every
    number, in both orders. Of equal scores the later checkpoint (greater ``index``)
    ranks higher, as in Ray.
    """
    if score is None:
        return (True, float(index), index)
    if math.isnan(score):
        return (False, 0.0, index)
    return (True, score if order == "max" else -score, index)


def jsonable_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` as JSON data, for the manager's state file.

    Strings, numbers (NaN and infinities included: Python's ``json`` reads them back),
    booleans and None stay; nested mappings and sequences are converted element by
    element (keys become strings); numpy scalars and arrays become numbers and lists
    (``.item()``, ``.tolist()``); anything else is stored as its ``repr``, so that a
    metric that cannot be stored never stops training.
    """
    return {str(k): _jsonable(v) for k, v in metrics.items()}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    for method in ("item", "tolist"):  # numpy (and torch) scalars and arrays
        convert = getattr(value, method, None)
        if callable(convert):
            try:
                converted = convert()
            except (TypeError, ValueError):  # .item() of an array of several values
                continue
            if converted is not value:
                return _jsonable(converted)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return repr(value)
