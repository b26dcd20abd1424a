"""Checkpoints that Ray AIR 2.6 wrote, read without Ray (dckpt._formats.ray_format).

The layouts are written by hand from Ray 2.6's source (:mod:`tests._ray_layouts`): a
dict checkpoint's directory, a directory with ``<key>.meta.pkl`` keys, ``to_bytes()``
of each, the framework checkpoints' directories. Each reads back to the same data and
the dckpt class Ray's class maps to; Ray's metadata naming any other class is refused
with :class:`~dckpt.UnsupportedRayClassError` before anything else is unpickled.
"""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import tarfile

import dask.config
import fsspec
import pytest

from dckpt import (
    Checkpoint,
    CheckpointFormatError,
    IncompatibleCheckpointError,
    UnsafePathError,
    UnsupportedRayClassError,
)
from tests import _ray_layouts as ray
from tests.test_checkpoint_contract import ModelCheckpoint, Preprocessor

np = pytest.importorskip("numpy")

TRIPPED: list[str] = []


def _trip(name: str) -> str:
    TRIPPED.append(name)
    return name


class Tripwire:
    """User data whose unpickling is recorded in TRIPPED: proves what was unpickled."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self):
        return _trip, (self.name,)


@pytest.fixture(autouse=True)
def _no_trips():
    TRIPPED.clear()
    yield
    TRIPPED.clear()


def user_data(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if k != "_dckpt"}


def files_of(checkpoint: Checkpoint) -> dict[str, bytes]:
    """The files of ``checkpoint`` written to a directory, dckpt's header left out."""
    out = {}
    directory = checkpoint.to_directory()
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    out.pop(".dckpt.json", None)
    return out


# --- the layouts ---------------------------------------------------------------------


def test_a_dict_directory_reads_back_as_its_class_state_dict_and_files(tmp_path):
    from dckpt.train.sklearn import SklearnCheckpoint

    data = {"epoch": 3, "weights": np.arange(4.0), "_preprocessor": Preprocessor(2)}
    path = ray.write_dict_directory(str(tmp_path / "c"), data, "SklearnCheckpoint",
                                    state={"_checkpoint_id": 7},
                                    files={"notes/extra.txt": b"added"})
    checkpoint = Checkpoint.from_directory(path)
    assert type(checkpoint) is SklearnCheckpoint
    assert checkpoint._checkpoint_id == 7  # Ray's _SERIALIZED_ATTRS state
    assert checkpoint.get_preprocessor() == Preprocessor(2)
    restored = user_data(checkpoint.to_dict())
    assert restored.keys() == data.keys() and restored["epoch"] == 3
    np.testing.assert_array_equal(restored["weights"], data["weights"])
    # Ray's control files are no user files; the added file travels. Ray's state was
    # set on the object read, as Ray does; onward only dckpt's _SERIALIZED_ATTRS travel.
    again = Checkpoint.from_dict(checkpoint.to_dict())
    assert type(again) is SklearnCheckpoint
    files = files_of(again)
    assert files["notes/extra.txt"] == b"added"
    assert ".metadata.pkl" not in files


def test_meta_pkl_files_are_keys_of_a_directorys_dict(tmp_path, memory_uri):
    path = ray.write_files_directory(str(tmp_path / "c"), {"model.bin": b"\x00\x01",
                                                           "sub/part.txt": b"p"},
                                     keys={"epoch": 5, "loss": 0.25})
    checkpoint = Checkpoint.from_directory(path)
    assert type(checkpoint) is Checkpoint
    assert user_data(checkpoint.to_dict()) == {"epoch": 5, "loss": 0.25}
    through_dict = Checkpoint.from_dict(checkpoint.to_dict())
    assert user_data(through_dict.to_dict()) == {"epoch": 5, "loss": 0.25}
    assert files_of(through_dict) == {"model.bin": b"\x00\x01", "sub/part.txt": b"p",
                                      "dict_checkpoint.pkl": files_of(through_dict)[
                                          "dict_checkpoint.pkl"]}
    assert Checkpoint.from_directory(through_dict.to_directory()).to_dict()["epoch"] == 5
    # A copy of the directory itself holds dckpt's control files instead of Ray's.
    copy = checkpoint.to_directory()
    assert sorted(os.listdir(copy)) == [".dckpt.json", "dict_checkpoint.pkl", "model.bin",
                                        "sub"]
    assert user_data(Checkpoint.from_directory(copy).to_dict()) == {"epoch": 5, "loss": 0.25}
    uploaded = Checkpoint.from_uri(checkpoint.to_uri(f"{memory_uri}/copy"))
    assert user_data(uploaded.to_dict()) == {"epoch": 5, "loss": 0.25}
    assert not [n for n in fsspec.filesystem("memory").ls(f"{memory_uri}/copy", detail=False)
                if n.endswith(".pkl") and "dict_checkpoint" not in n]


def test_ray_to_bytes_of_a_dict_checkpoint(tmp_path):
    from dckpt.train.lightgbm import LightGBMCheckpoint

    blob = ray.dict_to_bytes({"epoch": 2, "name": "run"}, "LightGBMCheckpoint",
                             state={"_checkpoint_id": 1}, files={"extra.txt": b"hi"})
    checkpoint = Checkpoint.from_bytes(blob)
    assert type(checkpoint) is LightGBMCheckpoint and checkpoint._checkpoint_id == 1
    assert user_data(checkpoint.to_dict()) == {"epoch": 2, "name": "run"}
    assert files_of(checkpoint)["extra.txt"] == b"hi"
    # And it goes on as a dckpt checkpoint: its own to_bytes reads back the same.
    again = Checkpoint.from_bytes(checkpoint.to_bytes())
    assert type(again) is LightGBMCheckpoint
    assert user_data(again.to_dict()) == {"epoch": 2, "name": "run"}


def test_ray_to_bytes_of_a_directory_checkpoint():
    blob = ray.directory_to_bytes(
        {"model": b"weights", "sub/x.txt": b"x",
         "_preprocessor": ray.preprocessor_file(Preprocessor(3))},
        keys={"epoch": 9})
    checkpoint = Checkpoint.from_bytes(blob)
    assert type(checkpoint) is Checkpoint
    assert checkpoint.get_preprocessor() == Preprocessor(3)
    assert user_data(checkpoint.to_dict()) == {"epoch": 9, "_preprocessor": Preprocessor(3)}
    files = files_of(checkpoint)
    assert files["model"] == b"weights" and files["sub/x.txt"] == b"x"
    assert ".metadata.pkl" not in files  # Ray's _pack keeps it; it is no user file


def test_a_ray_folder_at_a_uri_reads_back(tmp_path, memory_uri):
    from dckpt.train.xgboost import XGBoostCheckpoint

    def upload(path: str, uri: str) -> str:
        fs = fsspec.filesystem("memory")
        for name in os.listdir(path):  # as Ray's upload_to_uri leaves it: no commit marker
            with open(os.path.join(path, name), "rb") as f:
                fs.pipe(f"{uri}/{name}", f.read())
        return uri

    path = ray.write_files_directory(str(tmp_path / "c"), {"model.json": b"{}"},
                                     "XGBoostCheckpoint", keys={"epoch": 4})
    checkpoint = Checkpoint.from_uri(upload(path, f"{memory_uri}/ray"))
    assert type(checkpoint) is XGBoostCheckpoint
    assert checkpoint.get_preprocessor() is None
    assert user_data(checkpoint.to_dict()) == {"epoch": 4}
    assert files_of(checkpoint)["model.json"] == b"{}"
    # A dict checkpoint's folder: its preprocessor is in its dict.
    path = ray.write_dict_directory(str(tmp_path / "d"),
                                    {"x": 1, "_preprocessor": Preprocessor(5)})
    checkpoint = Checkpoint.from_uri(upload(path, f"{memory_uri}/dict"))
    assert checkpoint.get_preprocessor() == Preprocessor(5)
    assert user_data(checkpoint.to_dict()) == {"x": 1, "_preprocessor": Preprocessor(5)}


def test_loading_through_an_unrelated_class_is_refused(tmp_path):
    from dckpt.train.xgboost import XGBoostCheckpoint

    path = ray.write_dict_directory(str(tmp_path / "c"), {"a": 1}, "SklearnCheckpoint")
    with pytest.raises(IncompatibleCheckpointError, match="SklearnCheckpoint"):
        XGBoostCheckpoint.from_directory(path)


def test_torch_checkpoints_map_to_dckpt_train_torch(tmp_path):
    blob = ray.dict_to_bytes({"model": 1}, "TorchCheckpoint")
    if importlib.util.find_spec("dckpt.train.torch") is None:
        # Not written yet in this tree: the mapping names it, and says it is missing.
        with pytest.raises(CheckpointFormatError, match="dckpt.train.torch"):
            Checkpoint.from_bytes(blob)
        return
    checkpoint = Checkpoint.from_bytes(blob)
    assert type(checkpoint).__name__ == "TorchCheckpoint"
    assert type(checkpoint).__module__ == "dckpt.train.torch"


# --- framework checkpoints Ray 2.6 wrote ------------------------------------------


def _framework_directory(path: str, ray_class: str, model: bytes, preprocessor=None) -> str:
    """``<Framework>Checkpoint.from_model(...)`` of Ray 2.6, written to a directory."""
    files = {"model": model}
    if preprocessor is not None:
        files["_preprocessor"] = ray.preprocessor_file(preprocessor)
    return ray.write_files_directory(path, files, ray_class)


def test_ray_sklearn_checkpoint_directory(tmp_path):
    linear = pytest.importorskip("sklearn.linear_model")
    from dckpt.train.sklearn import SklearnCheckpoint, SklearnPredictor

    x = np.arange(12.0).reshape(6, 2)
    model = linear.LinearRegression().fit(x, x @ [1.0, 2.0])
    path = _framework_directory(str(tmp_path / "c"), "SklearnCheckpoint",
                                ray.ray_pickle(model), preprocessor=Preprocessor(1))
    checkpoint = Checkpoint.from_directory(path)
    assert type(checkpoint) is SklearnCheckpoint
    assert checkpoint.get_preprocessor() == Preprocessor(1)
    predictor = SklearnPredictor.from_checkpoint(checkpoint)
    predictor.set_preprocessor(None)
    np.testing.assert_allclose(predictor.predict(x), model.predict(x))


@pytest.mark.parametrize("name", ["model", "model.json", "model.ubj"])
def test_ray_xgboost_checkpoint_directory(tmp_path, name):
    xgboost = pytest.importorskip("xgboost")
    from dckpt.train.xgboost import XGBoostCheckpoint, XGBoostPredictor

    x = np.arange(40.0).reshape(20, 2)
    booster = xgboost.train({"nthread": 1}, xgboost.DMatrix(x, x[:, 0]), num_boost_round=3)
    # Ray 2.6 saved "model" (in its XGBoost's default format), Ray 2.7+ "model.json".
    files = {name: bytes(booster.save_raw("json" if name.endswith("json") else "ubj"))}
    path = ray.write_files_directory(str(tmp_path / "c"), files, "XGBoostCheckpoint")
    checkpoint = Checkpoint.from_directory(path)
    assert type(checkpoint) is XGBoostCheckpoint
    np.testing.assert_allclose(XGBoostPredictor.from_checkpoint(checkpoint).predict(x),
                               booster.predict(xgboost.DMatrix(x)), rtol=1e-6)


@pytest.mark.parametrize("name", ["model", "model.txt"])
def test_ray_lightgbm_checkpoint_directory_and_bytes(tmp_path, name):
    lightgbm = pytest.importorskip("lightgbm")
    from dckpt.train.lightgbm import LightGBMCheckpoint, LightGBMPredictor

    x = np.random.default_rng(1).normal(size=(40, 2))
    booster = lightgbm.train({"verbose": -1, "min_data_in_leaf": 2, "num_threads": 1},
                             lightgbm.Dataset(x, x[:, 0]), num_boost_round=3)
    model = booster.model_to_string().encode()
    path = ray.write_files_directory(str(tmp_path / "c"), {name: model},
                                     "LightGBMCheckpoint")
    blob = ray.directory_to_bytes({name: model}, "LightGBMCheckpoint")
    for checkpoint in (Checkpoint.from_directory(path), Checkpoint.from_bytes(blob)):
        assert type(checkpoint) is LightGBMCheckpoint
        np.testing.assert_allclose(LightGBMPredictor.from_checkpoint(checkpoint).predict(x),
                                   booster.predict(x), rtol=1e-6)


# --- what is refused -----------------------------------------------------------------


def test_an_unmapped_class_in_ray_metadata_is_refused_before_anything_is_unpickled(
    tmp_path,
):
    path = ray.write_dict_directory(str(tmp_path / "c"), {"x": Tripwire("dir")},
                                    "TensorflowCheckpoint")
    with pytest.raises(UnsupportedRayClassError,
                       match=r"\.metadata\.pkl names the class ray\.train\.tensorflow"
                             r"\.tensorflow_checkpoint\.TensorflowCheckpoint.*"
                             r"dckpt\.ray\.classes"):
        Checkpoint.from_directory(path)
    # In to_bytes() the metadata comes after the user's values: still nothing unpickled.
    blob = ray.dict_to_bytes({"x": Tripwire("bytes")}, "TensorflowCheckpoint")
    with pytest.raises(UnsupportedRayClassError, match="TensorflowCheckpoint"):
        Checkpoint.from_bytes(blob)
    assert TRIPPED == []
    assert isinstance(UnsupportedRayClassError("x"), CheckpointFormatError)


def test_any_other_class_in_ray_metadata_state_is_refused(tmp_path):
    path = ray.write_files_directory(str(tmp_path / "c"), {"f": b"1"},
                                     state={"_checkpoint_id": Tripwire("state")})
    with pytest.raises(UnsupportedRayClassError, match="tests.test_ray_format._trip"):
        Checkpoint.from_directory(path)
    assert TRIPPED == []


def test_a_class_of_ray_in_the_users_data_needs_ray(tmp_path):
    blob = ray.dict_to_bytes({"a": Tripwire("a"), "_preprocessor": ray.RayStandardScaler()})
    with pytest.raises(UnsupportedRayClassError,
                       match="ray.data.preprocessors.scaler.StandardScaler.*Install Ray"):
        Checkpoint.from_bytes(blob)
    assert TRIPPED == []


def test_a_subclass_of_rays_mapped_by_the_setting_keeps_its_state_onward(tmp_path):
    path = ray.write_dict_directory(str(tmp_path / "c"), {"x": 1}, "TensorflowCheckpoint",
                                    state={"framework": "tf", "epoch": 4})
    mapping = {"ray.train.tensorflow.tensorflow_checkpoint:TensorflowCheckpoint":
               "tests.test_checkpoint_contract:ModelCheckpoint"}
    with dask.config.set({"dckpt.ray.classes": mapping}):
        checkpoint = Checkpoint.from_directory(path)
        assert type(checkpoint) is ModelCheckpoint
        blob = checkpoint.to_bytes()
    # The copy holds dckpt's control files only: read without the setting.
    again = Checkpoint.from_bytes(blob)
    assert type(again) is ModelCheckpoint and (again.framework, again.epoch) == ("tf", 4)


def test_the_setting_maps_more_classes(tmp_path):
    path = ray.write_dict_directory(str(tmp_path / "c"), {"x": 1}, "TensorflowCheckpoint")
    mapping = {"ray.train.tensorflow.tensorflow_checkpoint:TensorflowCheckpoint":
               "dckpt._checkpoint:Checkpoint"}
    with dask.config.set({"dckpt.ray.classes": mapping}):
        checkpoint = Checkpoint.from_directory(path)
        assert type(checkpoint) is Checkpoint
        assert user_data(checkpoint.to_dict()) == {"x": 1}


def test_a_pickle_that_is_not_rays_to_bytes_is_still_refused_unread():
    for blob in (pickle.dumps({"a": Tripwire("plain")}), pickle.dumps([1, 2]), b"\x80\x05"):
        with pytest.raises(CheckpointFormatError, match="dckpt header"):
            Checkpoint.from_bytes(blob)
    assert TRIPPED == []


def test_damaged_ray_metadata_is_a_format_error(tmp_path):
    path = ray.write_dict_directory(str(tmp_path / "c"), {"x": 1})
    with open(os.path.join(path, ".metadata.pkl"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointFormatError, match="Ray's checkpoint metadata"):
        Checkpoint.from_directory(path)


def test_a_tar_entry_leading_out_is_refused():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    meta = ray.metadata()
    blob = ray.ray_pickle({"fs_checkpoint": out.getvalue(), "_metadata": meta})
    with pytest.raises(UnsafePathError, match=r"\.\."):
        Checkpoint.from_bytes(blob)
