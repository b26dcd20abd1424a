"""Predictor, SklearnLikePredictor and FunctionPredictor in one process."""

from __future__ import annotations

import os
from pathlib import Path

import cloudpickle
import pytest

from dckpt import Checkpoint, CheckpointFormatError
from dckpt.predict import (
    FunctionPredictor,
    Predictor,
    SklearnLikePredictor,
    load_model,
    model_checkpoint,
)

np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")

from tests.predict._models import Linear, Scale  # after importorskip: needs numpy


def test_numpy_in_numpy_out_with_the_checkpoint_preprocessor():
    checkpoint = model_checkpoint(Linear([1.0, 10.0], b=1.0), preprocessor=Scale())
    predictor = SklearnLikePredictor.from_checkpoint(pickle_round_trip(checkpoint))
    out = predictor.predict(np.array([[1.0, 2.0], [0.0, 1.0]]))
    assert out.tolist() == [43.0, 21.0]  # (2 + 40) + 1, (0 + 20) + 1
    assert isinstance(predictor.get_preprocessor(), Scale)


def test_a_dataframe_gets_a_dataframe_with_its_index_and_feature_columns():
    predictor = SklearnLikePredictor(Linear([1.0, 1.0]))
    batch = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "id": [7, 8]}, index=[10, 11])
    out = predictor.predict(batch, feature_columns=["a", "b"])
    assert list(out.columns) == ["predictions"] and list(out.index) == [10, 11]
    assert out["predictions"].tolist() == [4.0, 6.0]


def test_a_dict_gets_a_dict_and_two_dimensional_answers_get_columns():
    two = FunctionPredictor(None, fn=lambda model, batch: np.stack([batch["x"], -batch["x"]], 1))
    answer = two.predict({"x": np.array([1, 2])})
    assert set(answer) == {"predictions"}
    assert answer["predictions"].tolist() == [[1, -1], [2, -2]]
    out = FunctionPredictor(None, fn=lambda m, b: np.stack([b["x"], b["x"]], 1)).predict(
        pd.DataFrame({"x": [1.0, 2.0]}))
    assert list(out.columns) == ["predictions_0", "predictions_1"]


def test_a_callable_preprocessor_and_a_callable_model():
    predictor = FunctionPredictor(lambda batch: batch + 1, preprocessor=lambda batch: batch * 10)
    assert predictor.predict(np.array([1, 2])).tolist() == [11, 21]


def test_models_are_found_in_dicts_directories_and_model_files(tmp_path: Path):
    model = Linear([2.0])
    as_dict = model_checkpoint(model)
    as_directory = Checkpoint.from_directory(as_dict.to_directory(str(tmp_path / "d")))
    (tmp_path / "f").mkdir()
    with open(tmp_path / "f" / "model.pkl", "wb") as f:
        cloudpickle.dump(model, f)
    as_file = Checkpoint.from_directory(str(tmp_path / "f"))
    for checkpoint in (as_dict, as_directory, as_file):
        assert load_model(checkpoint).predict(np.array([[3.0]])).tolist() == [6.0]


def test_a_checkpoint_without_a_model_is_refused(tmp_path: Path):
    with pytest.raises(CheckpointFormatError, match="holds no model"):
        load_model(Checkpoint.from_dict({"weights": [1, 2]}))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointFormatError, match="'model.pkl'"):
        SklearnLikePredictor.from_checkpoint(Checkpoint.from_directory(str(tmp_path / "empty")))
    assert os.listdir(tmp_path / "empty") == []


def test_bad_batches_models_and_preprocessors_get_clear_errors():
    with pytest.raises(TypeError, match="not list"):
        SklearnLikePredictor(Linear([1.0])).predict([[1.0]])
    with pytest.raises(TypeError, match="has no predict"):
        SklearnLikePredictor(object())
    with pytest.raises(TypeError, match="not callable and no fn"):
        FunctionPredictor(object())
    with pytest.raises(TypeError, match="no transform_batch"):
        FunctionPredictor(lambda b: b, preprocessor=object()).predict(np.array([1]))
    with pytest.raises(NotImplementedError):
        Predictor.from_checkpoint(Checkpoint.from_dict({}))


def pickle_round_trip(checkpoint: Checkpoint) -> Checkpoint:
    return cloudpickle.loads(cloudpickle.dumps(checkpoint))
