"""dckpt.train.sklearn, .xgboost and .lightgbm with the real frameworks, on small data.

Each framework: a checkpoint made from a fitted model survives every representation
(dict, directory, bytes, URI) as its own class with its preprocessor; its model file is
the framework's own format, read back by the framework without dckpt; its predictor
scores numpy, pandas and dict batches like the model; and BatchPredictor over a dask
DataFrame on the isolated cluster gives the model's predictions. PredictorDeployment
is tried with the XGBoost predictor.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from dckpt import Checkpoint

np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")
sklearn_linear = pytest.importorskip("sklearn.linear_model")
xgboost = pytest.importorskip("xgboost")
lightgbm = pytest.importorskip("lightgbm")

from dckpt.predict import BatchPredictor, PredictorDeployment  # noqa: E402
from dckpt.train.lightgbm import LightGBMCheckpoint, LightGBMPredictor  # noqa: E402
from dckpt.train.sklearn import SklearnCheckpoint, SklearnPredictor  # noqa: E402
from dckpt.train.xgboost import XGBoostCheckpoint, XGBoostPredictor  # noqa: E402
from tests.predict._models import Scale  # noqa: E402

# The models are fitted on arrays and score DataFrames too: scikit-learn says so.
pytestmark = pytest.mark.filterwarnings("ignore:X has feature names:UserWarning")

COLUMNS = ["a", "b", "c"]
RNG = np.random.default_rng(7)
X = RNG.normal(size=(60, 3))
Y = X @ np.array([1.5, -2.0, 0.5]) + 0.1 * RNG.normal(size=60)
FRAME = pd.DataFrame(X, columns=COLUMNS, index=np.arange(100, 160))


@dataclass(frozen=True)
class Framework:
    """How to fit, checkpoint, read back and score one framework's model."""

    name: str
    checkpoint_cls: type
    predictor_cls: type
    model_file: str
    fit: Callable[[], Any]
    make: Callable[..., Any]
    get: Callable[[Any], Any]
    predict: Callable[[Any, Any], Any]  # the model's own predictions for an array
    native: Callable[[str], Any]  # the model file read by the framework, without dckpt


def _fit_xgboost():
    return xgboost.train({"max_depth": 3, "eta": 0.3, "nthread": 1},
                         xgboost.DMatrix(X, Y), num_boost_round=8)


def _fit_lightgbm():
    return lightgbm.train({"num_leaves": 7, "min_data_in_leaf": 3, "verbose": -1,
                           "num_threads": 1}, lightgbm.Dataset(X, Y), num_boost_round=8)


def _read_xgboost(path: str):
    booster = xgboost.Booster()
    booster.load_model(path)
    return booster


def _read_pickle(path: str):
    with open(path, "rb") as f:
        return pickle.load(f)


FRAMEWORKS = [
    Framework("sklearn", SklearnCheckpoint, SklearnPredictor, "model.pkl",
              lambda: sklearn_linear.LinearRegression().fit(X, Y),
              SklearnCheckpoint.from_estimator, lambda c: c.get_estimator(),
              lambda m, x: m.predict(x), _read_pickle),
    Framework("xgboost", XGBoostCheckpoint, XGBoostPredictor, "model.json",
              _fit_xgboost, XGBoostCheckpoint.from_model, lambda c: c.get_model(),
              lambda m, x: m.predict(xgboost.DMatrix(x)), _read_xgboost),
    Framework("lightgbm", LightGBMCheckpoint, LightGBMPredictor, "model.txt",
              _fit_lightgbm, LightGBMCheckpoint.from_model, lambda c: c.get_model(),
              lambda m, x: m.predict(x), lambda p: lightgbm.Booster(model_file=p)),
]


@pytest.fixture(params=FRAMEWORKS, ids=lambda f: f.name)
def framework(request) -> Framework:
    return request.param


def assert_close(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float),
                               rtol=1e-5, atol=1e-6)


def _representations(checkpoint, cls, uri: str) -> dict[str, Any]:
    """``checkpoint`` through each representation and back, read through ``cls``."""
    directory = checkpoint.to_directory()
    return {
        "dict": cls.from_dict(checkpoint.to_dict()),
        "directory": cls.from_directory(directory),
        "bytes": cls.from_bytes(checkpoint.to_bytes()),
        "uri": cls.from_uri(checkpoint.to_uri(f"{uri}/{cls.__name__}")),
        "dict of directory": cls.from_dict(cls.from_directory(directory).to_dict()),
    }


@pytest.mark.parametrize("read_as", ["own class", "Checkpoint"])
def test_every_representation_gives_back_the_model_and_preprocessor(
    framework, read_as, memory_uri
):
    model = framework.fit()
    checkpoint = framework.make(model, preprocessor=Scale())
    assert type(checkpoint) is framework.checkpoint_cls
    assert checkpoint.get_internal_representation()[0] == "data_dict"  # as Ray makes it
    expected = framework.predict(model, X)
    cls = framework.checkpoint_cls if read_as == "own class" else Checkpoint
    for how, restored in _representations(checkpoint, cls, memory_uri).items():
        assert type(restored) is framework.checkpoint_cls, how
        assert isinstance(restored.get_preprocessor(), Scale), how
        assert_close(framework.predict(framework.get(restored), X), expected)


def test_the_model_file_is_the_frameworks_own_and_read_without_dckpt(framework, tmp_path):
    model = framework.fit()
    directory = framework.make(model).to_directory(str(tmp_path / "checkpoint"))
    path = os.path.join(directory, framework.model_file)
    assert sorted(os.listdir(directory)) == [".dckpt.json", framework.model_file]
    with open(path, "rb") as f:
        head = f.read(64)
    if framework.name == "xgboost":
        with open(path) as f:
            json.load(f)  # JSON, not a pickle
    elif framework.name == "lightgbm":
        assert head.startswith(b"tree\n")  # LightGBM's text format
    # Another process with the framework alone (no dckpt on its path) reads it.
    program = {
        "sklearn": "import pickle,sys; m=pickle.load(open(sys.argv[1],'rb'))",
        "xgboost": "import xgboost,sys; m=xgboost.Booster(); m.load_model(sys.argv[1])",
        "lightgbm": "import lightgbm,sys; m=lightgbm.Booster(model_file=sys.argv[1])",
    }[framework.name] + "; print(type(m).__name__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", program, path], env=env, cwd=str(tmp_path),
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == type(model).__name__
    assert_close(framework.predict(framework.native(path), X), framework.predict(model, X))


def test_the_predictor_scores_numpy_pandas_and_dicts_like_the_model(framework):
    model = framework.fit()
    expected = framework.predict(model, X)
    predictor = framework.predictor_cls.from_checkpoint(framework.make(model))
    assert_close(predictor.predict(X), expected)
    frame = predictor.predict(FRAME)
    assert list(frame.columns) == ["predictions"] and list(frame.index) == list(FRAME.index)
    assert_close(frame["predictions"], expected)
    wide = FRAME.assign(id=np.arange(60))
    assert_close(predictor.predict(wide, feature_columns=COLUMNS)["predictions"], expected)
    as_dict = predictor.predict({c: FRAME[c].to_numpy() for c in COLUMNS})
    assert_close(as_dict["predictions"], expected)


def test_the_predictor_applies_the_checkpoints_preprocessor(framework):
    model = framework.fit()
    checkpoint = framework.make(model, preprocessor=Scale())  # doubles every feature
    predictor = framework.predictor_cls.from_checkpoint(checkpoint)
    assert_close(predictor.predict(X), framework.predict(model, X * 2))


def test_a_generic_checkpoint_of_the_files_is_read_by_the_predictor(framework, tmp_path):
    # A directory with just the model file, as another tool leaves it, read as Checkpoint.
    model = framework.fit()
    directory = framework.make(model).to_directory(str(tmp_path / "c"))
    os.unlink(os.path.join(directory, ".dckpt.json"))
    plain = Checkpoint.from_directory(directory)
    assert type(plain) is Checkpoint
    predictor = framework.predictor_cls.from_checkpoint(plain)
    assert_close(predictor.predict(X), framework.predict(model, X))


def test_a_checkpoint_without_a_model_file_is_refused_with_the_names_looked_for(framework):
    from dckpt import CheckpointFormatError

    empty = framework.checkpoint_cls.from_dict({"other": 1})
    with pytest.raises(CheckpointFormatError, match=framework.model_file):
        framework.get(empty)


def test_importing_dckpt_and_dckpt_train_imports_no_framework():
    program = ("import sys, dckpt, dckpt.train, dckpt.predict; "
               "import dckpt.train.sklearn, dckpt.train.xgboost, dckpt.train.lightgbm; "
               "print(sorted(m for m in ('sklearn', 'xgboost', 'lightgbm') "
               "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# --- on the isolated cluster -----------------------------------------------------------


@pytest.mark.slow
def test_batch_prediction_on_the_cluster_gives_the_models_predictions(
    framework, node_client, nodes
):
    dd = pytest.importorskip("dask.dataframe")
    model = framework.fit()
    checkpoint = framework.make(model, preprocessor=Scale())
    data = dd.from_pandas(FRAME.assign(id=np.arange(60)), npartitions=4)
    with BatchPredictor(checkpoint, framework.predictor_cls) as predictor:
        out = predictor.predict(data, feature_columns=COLUMNS, keep_columns=["id"],
                                min_scoring_workers=2, client=node_client)
        result = node_client.compute(out).result()
    assert list(result.index) == list(FRAME.index)
    assert result["id"].tolist() == list(range(60))
    assert_close(result["predictions"], framework.predict(model, X * 2))


@pytest.mark.slow
def test_the_xgboost_predictor_serves_in_a_deployment_like_the_model(node_client, nodes):
    model = _fit_xgboost()
    checkpoint = XGBoostCheckpoint.from_model(model)
    expected = model.predict(xgboost.DMatrix(X[:5]))
    with PredictorDeployment(checkpoint, XGBoostPredictor, num_replicas=2,
                             client=node_client) as deployment:
        assert_close(deployment.predict(X[:5]), expected)
        out = deployment.predict(FRAME.iloc[:5], feature_columns=COLUMNS)
        assert_close(out["predictions"], expected)
        host, port = deployment.serve()
        body = json.dumps({"instances": X[:5].tolist()}).encode()
        request = urllib.request.Request(f"http://{host}:{port}/predict", data=body,
                                         method="POST")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=60) as response:
            assert response.status == 200
            document = json.load(response)
    assert_close(document["predictions"], expected)


def test_rays_documented_examples_run_with_only_their_imports_changed():
    # The examples of Ray 2.6's from_model / from_estimator docstrings, ray.train ->
    # dckpt.train; the predictions are then checked against the model's own.
    from sklearn.ensemble import RandomForestClassifier

    from dckpt.train.lightgbm import LightGBMCheckpoint, LightGBMPredictor
    from dckpt.train.sklearn import SklearnCheckpoint, SklearnPredictor
    from dckpt.train.xgboost import XGBoostCheckpoint, XGBoostPredictor

    train_X = np.array([[1, 2], [3, 4]])
    train_y = np.array([0, 1])

    model = xgboost.XGBClassifier(n_jobs=1).fit(train_X, train_y)
    checkpoint = XGBoostCheckpoint.from_model(model.get_booster())
    predictor = XGBoostPredictor.from_checkpoint(checkpoint)
    assert_close(predictor.predict(train_X), model.get_booster().predict(
        xgboost.DMatrix(train_X)))

    model = lightgbm.LGBMClassifier(n_jobs=1, verbose=-1).fit(train_X, train_y)
    checkpoint = LightGBMCheckpoint.from_model(model.booster_)
    predictor = LightGBMPredictor.from_checkpoint(checkpoint)
    assert_close(predictor.predict(train_X), model.booster_.predict(train_X))

    model = RandomForestClassifier(n_estimators=3, random_state=0).fit(train_X, train_y)
    checkpoint = SklearnCheckpoint.from_estimator(model)
    predictor = SklearnPredictor.from_checkpoint(checkpoint)
    assert predictor.predict(train_X).tolist() == model.predict(train_X).tolist()
