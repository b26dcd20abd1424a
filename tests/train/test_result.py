"""Result.get_best_checkpoint: Ray 2.6's choice, errors and all (pure units)."""

from __future__ import annotations

import pytest

from dckpt import Checkpoint
from dckpt.train import NoBestCheckpointError, Result


def _result(*metrics: dict) -> Result:
    """A Result whose best_checkpoints hold ``{"i": position}`` with these metrics."""
    return Result(metrics=None, checkpoint=None, run_name="run",
                  best_checkpoints=[(Checkpoint.from_dict({"i": i}), m)
                                    for i, m in enumerate(metrics)])


def _best(result: Result, metric: str, mode: str) -> int:
    return result.get_best_checkpoint(metric, mode).to_dict()["i"]


def test_the_best_by_a_metric_in_either_mode():
    # Ray's test_result.py: metric 1.0 ... 4.0, max picks the last, min the first.
    result = _result(*({"iter": i, "metric": float(i + 1)} for i in range(4)))
    assert _best(result, "metric", "max") == 3
    assert _best(result, "metric", "min") == 0
    assert _best(result, "iter", "min") == 0  # any metric, not only the score attribute


def test_checkpoints_without_the_metric_are_left_out():
    result = _result({"loss": 5.0}, {"acc": 0.9}, {"loss": 3.0, "acc": 0.1})
    assert _best(result, "loss", "min") == 2
    assert _best(result, "acc", "max") == 1


def test_a_dotted_metric_reaches_into_nested_metrics():
    result = _result({"val": {"loss": 0.5}}, {"val": {"loss": 0.2}})
    assert _best(result, "val.loss", "min") == 1


def test_of_equal_values_the_first_listed_wins():
    # Ray's max()/min() keep the first of equal keys, in best_checkpoints order.
    result = _result({"loss": 1.0}, {"loss": 1.0}, {"loss": 2.0})
    assert _best(result, "loss", "min") == 0
    assert _best(_result({"loss": 2.0}, {"loss": 2.0}), "loss", "max") == 0


@pytest.mark.parametrize("mode", ["max", "min"])
def test_nan_never_wins_over_a_number(mode):
    nan = float("nan")
    result = _result({"loss": nan}, {"loss": 3.0}, {"loss": nan}, {"loss": 5.0})
    assert _best(result, "loss", mode) == (3 if mode == "max" else 1)
    assert _best(_result({"loss": nan}, {"loss": nan}), "loss", mode) == 0  # NaN only


def test_no_checkpoint_at_all_says_so_before_the_mode_is_checked():
    with pytest.raises(NoBestCheckpointError, match="kept no checkpoint") as info:
        _result().get_best_checkpoint("loss", "maximum")
    assert isinstance(info.value, RuntimeError)  # what Ray raises


def test_a_bad_mode_is_refused():
    with pytest.raises(ValueError, match=r"mode must be 'max' or 'min', not 'best'"):
        _result({"loss": 1.0}).get_best_checkpoint("loss", "best")


def test_a_metric_no_checkpoint_reported_names_the_ones_there():
    result = _result({"loss": 1.0}, {"loss": 2.0, "acc": 0.5})
    with pytest.raises(NoBestCheckpointError,
                       match=r"none of the 2 checkpoints .* 'val_loss'.* \['acc', 'loss'\]"):
        result.get_best_checkpoint("val_loss", "min")
    with pytest.raises(RuntimeError):  # Ray's type
        result.get_best_checkpoint("val_loss", "min")


def test_a_metric_that_is_no_number_is_refused():
    with pytest.raises(TypeError, match=r"metric 'name' must be a number.*str"):
        _result({"name": "a"}, {"name": "b"}).get_best_checkpoint("name", "max")
