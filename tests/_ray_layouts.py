"""Checkpoints as Ray AIR 2.6 writes them, made here without Ray.

Taken from Ray 2.6's ``ray/air/checkpoint.py`` (``_to_directory``, ``to_dict``,
``to_bytes``, ``_pack``) and the framework checkpoints' ``from_model`` /
``from_estimator`` (model file ``model``, ``ray.air.constants.MODEL_KEY``; the
preprocessor in ``_preprocessor``). Ray pickles with its vendored cloudpickle, which
pickles Ray's classes by reference: so do we, with stand-in classes that carry Ray's
``__module__`` and ``__qualname__``, put in ``sys.modules`` only while pickling (so that
nothing of them is importable when dckpt reads the pickle, as where Ray is not installed).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
import tarfile
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle

DICT_FILE = "dict_checkpoint.pkl"
METADATA_FILE = ".metadata.pkl"
META_SUFFIX = ".meta.pkl"

#: Ray's checkpoint classes: short name -> (module, class name).
RAY_CLASSES = {
    "Checkpoint": ("ray.air.checkpoint", "Checkpoint"),
    "TorchCheckpoint": ("ray.train.torch.torch_checkpoint", "TorchCheckpoint"),
    "SklearnCheckpoint": ("ray.train.sklearn.sklearn_checkpoint", "SklearnCheckpoint"),
    "XGBoostCheckpoint": ("ray.train.xgboost.xgboost_checkpoint", "XGBoostCheckpoint"),
    "LightGBMCheckpoint": ("ray.train.lightgbm.lightgbm_checkpoint", "LightGBMCheckpoint"),
    # Not mapped by dckpt: what reading one must refuse.
    "TensorflowCheckpoint": ("ray.train.tensorflow.tensorflow_checkpoint",
                             "TensorflowCheckpoint"),
}


@dataclass
class _CheckpointMetadata:
    """Ray's ``ray.air.checkpoint._CheckpointMetadata`` (its fields, in its order)."""

    checkpoint_type: type
    checkpoint_state: dict


_CheckpointMetadata.__module__ = "ray.air.checkpoint"
_CheckpointMetadata.__qualname__ = "_CheckpointMetadata"


def _stand_in(module: str, name: str) -> type:
    cls = type(name, (), {"__module__": module, "__qualname__": name})
    return cls


_CLASSES = {short: _stand_in(*where) for short, where in RAY_CLASSES.items()}
#: A class of Ray in the user's data: a Ray Data preprocessor.
RayStandardScaler = _stand_in("ray.data.preprocessors.scaler", "StandardScaler")


@contextlib.contextmanager
def _ray_importable() -> Iterator[None]:
    """Ray's modules in ``sys.modules`` (stand-ins) while a pickle is written."""
    classes = [_CheckpointMetadata, RayStandardScaler, *_CLASSES.values()]
    added = []
    for cls in classes:
        parts = cls.__module__.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
                added.append(name)
        setattr(sys.modules[cls.__module__], cls.__qualname__, cls)
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def ray_pickle(value: Any) -> bytes:
    """``value`` pickled as Ray's cloudpickle does (protocol 5, Ray's classes by name)."""
    with _ray_importable():
        return cloudpickle.dumps(value, protocol=5)


def metadata(ray_class: str = "Checkpoint", state: Mapping[str, Any] | None = None) -> Any:
    """Ray's ``_CheckpointMetadata`` for one of :data:`RAY_CLASSES`."""
    return _CheckpointMetadata(_CLASSES[ray_class], dict(state or {}))


def ray_pack(files: Mapping[str, bytes]) -> bytes:
    """Ray's ``_pack``: a PAX tar of a directory, its root added as ``""``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = tarfile.TarInfo("")
        root.type, root.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(root)
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), 0o644
            tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _write(path: str, content: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


def write_dict_directory(
    path: str,
    data: Mapping[str, Any],
    ray_class: str = "Checkpoint",
    state: Mapping[str, Any] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> str:
    """A dict checkpoint written to a directory by Ray (``from_dict(d).to_directory``).

    ``dict_checkpoint.pkl`` holds the dict with Ray's metadata under ``"_metadata"``
    (Ray's ``to_dict`` adds it), ``.metadata.pkl`` the metadata; ``files`` are files
    added to such a directory that Ray's dict form carried along.
    """
    meta = metadata(ray_class, state)
    for name, content in (files or {}).items():
        _write(os.path.join(path, name), content)
    _write(os.path.join(path, DICT_FILE), ray_pickle({**data, "_metadata": meta}))
    _write(os.path.join(path, METADATA_FILE), ray_pickle(meta))
    return path


def write_files_directory(
    path: str,
    files: Mapping[str, bytes],
    ray_class: str = "Checkpoint",
    state: Mapping[str, Any] | None = None,
    keys: Mapping[str, Any] | None = None,
) -> str:
    """A directory checkpoint that went through Ray's dict form and back: its files,
    one ``<key>.meta.pkl`` per key added to the dict (and ``_metadata.meta.pkl``,
    since Ray's ``to_dict`` adds that key too), and ``.metadata.pkl``.

    A framework checkpoint Ray 2.6 made (``from_model``: a directory read into a dict)
    and then wrote to a directory has exactly this layout.
    """
    meta = metadata(ray_class, state)
    for name, content in files.items():
        _write(os.path.join(path, name), content)
    for key, value in {**(keys or {}), "_metadata": meta}.items():
        _write(os.path.join(path, f"{key}{META_SUFFIX}"), ray_pickle(value))
    _write(os.path.join(path, METADATA_FILE), ray_pickle(meta))
    return path


def dict_to_bytes(
    data: Mapping[str, Any],
    ray_class: str = "Checkpoint",
    state: Mapping[str, Any] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> bytes:
    """Ray's ``to_bytes()`` of a dict checkpoint: a pickle of ``to_dict()``; files added
    to its directory ride in ``"_ray_additional_checkpoint_files"``, one tar each."""
    form: dict[str, Any] = dict(data)
    if files:
        form["_ray_additional_checkpoint_files"] = {
            name: _single_file_tar(content) for name, content in files.items()
        }
    form["_metadata"] = metadata(ray_class, state)
    return ray_pickle(form)


def directory_to_bytes(
    files: Mapping[str, bytes],
    ray_class: str = "Checkpoint",
    state: Mapping[str, Any] | None = None,
    keys: Mapping[str, Any] | None = None,
) -> bytes:
    """Ray's ``to_bytes()`` of a directory checkpoint: its files as a tar under
    ``"fs_checkpoint"`` (``.metadata.pkl`` among them, as Ray's ``_pack`` keeps it),
    its ``.meta.pkl`` keys, and ``"_metadata"``."""
    meta = metadata(ray_class, state)
    packed = ray_pack({**files, METADATA_FILE: ray_pickle(meta)})
    return ray_pickle({"fs_checkpoint": packed, **(keys or {}), "_metadata": meta})


def _single_file_tar(content: bytes) -> bytes:
    """Ray's ``_pack`` of one file: ``tar.add(file, arcname="")``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("")
        info.size, info.mode = len(content), 0o644
        tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def preprocessor_file(preprocessor: Any) -> bytes:
    """Ray's ``_preprocessor`` file (``save_preprocessor_to_dir``)."""
    return ray_pickle(preprocessor)


def loads(raw: bytes) -> Any:
    """Unpickle what :func:`ray_pickle` wrote, Ray's stand-ins importable meanwhile."""
    with _ray_importable():
        return pickle.loads(raw)
