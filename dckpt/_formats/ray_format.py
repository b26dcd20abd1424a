"""Reading checkpoints that Ray AIR 2.x wrote, without Ray.

Ray AIR (``ray.air.checkpoint``, 2.3–2.6; taken from its source) lays a checkpoint out
as follows, all pickles written with Ray's vendored cloudpickle:

``.metadata.pkl``
    in every directory Ray wrote: ``_CheckpointMetadata(checkpoint_type,
    checkpoint_state)``, the checkpoint's class and its ``_SERIALIZED_ATTRS`` values;
``dict_checkpoint.pkl``
    the dict of a dict checkpoint (with that metadata again under ``"_metadata"``);
``<key>.meta.pkl``
    a key of the dict of a directory checkpoint that went through a dict (the
    ``"_metadata"`` key among them);
``_preprocessor``, ``model``...
    the preprocessor and the framework checkpoints' model files (Ray 2.6 names a
    model file ``model``; dckpt's framework modules read that too);
``to_bytes()``
    a pickle of the dict form: the user's keys, ``"_metadata"``, and for a directory
    checkpoint its files as a tar archive under ``"fs_checkpoint"`` (files added to a
    dict checkpoint's directory: one tar each under
    ``"_ray_additional_checkpoint_files"``).

Ray's classes are mapped to dckpt's by name (:data:`RAY_CLASSES`, and
``dckpt.ray.classes``), never imported: Ray's metadata class becomes
:class:`RayCheckpointMetadata` and a checkpoint class a :class:`MappedClass` naming
dckpt's. Ray's metadata is read by an unpickler that knows only those names and raises
:class:`~dckpt.errors.UnsupportedRayClassError` for any other. The user's own data
(the dict's values, the preprocessor) is trusted, as every dict checkpoint is, and
unpickled as usual, except that Ray's names in it are looked at first, before anything
is unpickled: mapped ones are mapped, ``ray.cloudpickle`` becomes ``cloudpickle``,
and a name from Ray that cannot be imported here raises the same error.

Nothing here imports the checkpoint classes: a mapping names them as
``"module:qualname"``, which :mod:`dckpt._checkpoint` imports as it imports the class
of a dckpt checkpoint.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import pickletools
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dask.config

import dckpt._config  # noqa: F401  (loads the dckpt.* defaults into dask.config)
from dckpt._formats._archive_writer import ArchiveWriter
from dckpt._formats._paths import safe_relpath
from dckpt._formats.layout import (
    DICT_FILE,
    HEADER_FILE,
    PREPROCESSOR_FILE,
    RESERVED_KEY,
    dump_pickle,
)
from dckpt.errors import (
    CheckpointFormatError,
    UnsafePathError,
    UnsupportedRayClassError,
)

__all__ = [
    "METADATA_FILE",
    "MappedClass",
    "RAY_CLASSES",
    "RayCheckpointMetadata",
    "bytes_to_dict_form",
    "converted_control_files",
    "drop_metadata",
    "is_ray_pickle",
    "load_metadata",
    "load_pickle",
    "mentions_ray",
    "read_dict_preprocessor",
    "read_directory_keys",
    "read_directory_metadata",
]

METADATA_FILE = ".metadata.pkl"
META_SUFFIX = ".meta.pkl"
METADATA_KEY = "_metadata"
FS_KEY = "fs_checkpoint"
ADDITIONAL_FILES_KEY = "_ray_additional_checkpoint_files"
PREPROCESSOR_KEY = "_preprocessor"  # ray.air.constants.PREPROCESSOR_KEY: dckpt's name too

_METADATA_CLASS = ("ray.air.checkpoint", "_CheckpointMetadata")

#: Ray's checkpoint classes, as their pickles name them (and as their packages export
#: them), and the dckpt class each is read as.
RAY_CLASSES: dict[tuple[str, str], str] = {}
for _modules, _name, _dckpt in (
    (("ray.air.checkpoint", "ray.air"), "Checkpoint", "dckpt._checkpoint:Checkpoint"),
    (("ray.train.torch.torch_checkpoint", "ray.train.torch"), "TorchCheckpoint",
     "dckpt.train.torch:TorchCheckpoint"),
    (("ray.train.sklearn.sklearn_checkpoint", "ray.train.sklearn"), "SklearnCheckpoint",
     "dckpt.train.sklearn:SklearnCheckpoint"),
    (("ray.train.xgboost.xgboost_checkpoint", "ray.train.xgboost"), "XGBoostCheckpoint",
     "dckpt.train.xgboost:XGBoostCheckpoint"),
    (("ray.train.lightgbm.lightgbm_checkpoint", "ray.train.lightgbm"), "LightGBMCheckpoint",
     "dckpt.train.lightgbm:LightGBMCheckpoint"),
):
    for _module in _modules:
        RAY_CLASSES[(_module, _name)] = _dckpt
del _modules, _name, _dckpt, _module


@dataclass(frozen=True)
class MappedClass:
    """Stands in for a checkpoint class of Ray: the dckpt class it is read as."""

    ray_class: str  # "module:qualname" as Ray pickled it
    dckpt_class: str  # "module:qualname" of a dckpt Checkpoint class


@dataclass
class RayCheckpointMetadata:
    """Stands in for Ray's ``_CheckpointMetadata`` when its pickle is read."""

    checkpoint_type: Any = None
    checkpoint_state: dict[str, Any] = field(default_factory=dict)

    def dckpt_class(self, source: str) -> str | None:
        """The dckpt class to load the checkpoint with (``None``: dckpt's Checkpoint).

        Raises :class:`~dckpt.errors.UnsupportedRayClassError` when the type is not a
        mapped class (the user's data named a Ray class that Ray, installed here, gave).
        """
        kind = self.checkpoint_type
        if not isinstance(kind, MappedClass):
            raise _unsupported(_name_of(kind), source)
        if not isinstance(self.checkpoint_state, dict):
            raise CheckpointFormatError(
                f"{source}: Ray's checkpoint_state is a "
                f"{type(self.checkpoint_state).__name__}, not a dict"
            )
        return None if kind.dckpt_class == "dckpt._checkpoint:Checkpoint" else kind.dckpt_class


# ------------------------------------------------------------------ recognising


def mentions_ray(raw: bytes | bytearray | memoryview) -> bool:
    """Whether a pickle may name one of Ray's modules (a quick, conservative test)."""
    return b"ray." in raw or b"\x03ray" in raw


def is_ray_pickle(raw: bytes | bytearray | memoryview) -> bool:
    """Whether ``raw`` looks like Ray's ``to_bytes()``: a pickled dict that names Ray's
    checkpoint metadata or holds a directory's files (``"fs_checkpoint"``).

    Decided from the pickle's opcodes alone: nothing is unpickled.
    """
    view = bytes(memoryview(raw)[:2])
    if len(view) < 2 or view[0] != pickle.PROTO[0] or not 2 <= view[1] <= 5:
        return False
    try:
        ops = list(_first_ops(raw, 3))
        top = next(op for op in ops if op not in ("PROTO", "FRAME"))
        if top != "EMPTY_DICT":
            return False
        names = set(_globals(raw))
    except (ValueError, StopIteration, EOFError):
        return False
    return _METADATA_CLASS in names or FS_KEY.encode() in raw


# ------------------------------------------------------------------ directories


def read_directory_metadata(directory: str) -> RayCheckpointMetadata | None:
    """Ray's metadata of ``directory`` (``.metadata.pkl``), or ``None`` if it has none.

    Raises :class:`~dckpt.errors.UnsupportedRayClassError` for a class dckpt does not
    map, before anything else of the directory is read.
    """
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    return load_metadata(_read(path), path)


def read_directory_keys(directory: str) -> tuple[dict[str, Any], frozenset[str]]:
    """The dict keys Ray stored in ``directory`` as ``<key>.meta.pkl`` files, unpickled,
    and the names of Ray's control files there, which are no user files.

    Empty unless Ray wrote the directory: it holds ``.metadata.pkl`` (Ray 2.3+), or
    ``.meta.pkl`` files and no dckpt header (Ray 2.0-2.2 wrote no metadata file). The
    ``"_metadata"`` key is Ray's metadata: checked as strictly as ``.metadata.pkl``
    and left out.
    """
    names = os.listdir(directory)
    metas = sorted(n for n in names if n.endswith(META_SUFFIX)
                   and os.path.isfile(os.path.join(directory, n)))
    if METADATA_FILE not in names and (not metas or HEADER_FILE in names):
        return {}, frozenset()
    keys: dict[str, Any] = {}
    for name in metas:
        path = os.path.join(directory, name)
        key = name[: -len(META_SUFFIX)]
        if key == METADATA_KEY:
            load_metadata(_read(path), path)
        else:
            keys[key] = load_pickle(_read(path), path)
    return keys, frozenset([METADATA_FILE, *metas])


def converted_control_files(directory: str) -> dict[str, bytes | None]:
    """dckpt's control files in place of Ray's, for a copy of a directory Ray wrote.

    Ray's ``.metadata.pkl`` and ``<key>.meta.pkl`` files are dropped (``None``) and the
    dict they and ``dict_checkpoint.pkl`` held is written as dckpt's
    ``dict_checkpoint.pkl`` (its preprocessor as ``_preprocessor``), without Ray's
    metadata: a copy (directory, bytes, URI) reads back the same without any of Ray's
    names. Empty for other directories.
    """
    keys, ray_files = read_directory_keys(directory)
    if not ray_files:
        return {}
    files: dict[str, bytes | None] = dict.fromkeys(ray_files)
    data: dict[Any, Any] = {}
    dict_path = os.path.join(directory, DICT_FILE)
    if os.path.isfile(dict_path):
        loaded = load_pickle(_read(dict_path), dict_path)
        if isinstance(loaded, dict):
            drop_metadata(loaded, dict_path)
            data = loaded
    data.update(keys)
    if PREPROCESSOR_KEY in data:  # dckpt keeps it in a file of its own
        files[PREPROCESSOR_FILE] = dump_pickle(data.pop(PREPROCESSOR_KEY))
    if data:
        files[DICT_FILE] = dump_pickle(data)
    return files


def read_dict_preprocessor(directory: str) -> Any:
    """The preprocessor in the dict of a dict checkpoint Ray wrote to ``directory``
    (Ray keeps it there, not in a ``_preprocessor`` file); ``None`` elsewhere."""
    dict_path = os.path.join(directory, DICT_FILE)
    if not (os.path.isfile(dict_path) and os.path.isfile(os.path.join(directory, METADATA_FILE))):
        return None
    data = load_pickle(_read(dict_path), dict_path)
    return data.get(PREPROCESSOR_KEY) if isinstance(data, dict) else None


# ------------------------------------------------------------------ pickles


def load_metadata(raw: bytes, source: str) -> RayCheckpointMetadata:
    """Ray's ``_CheckpointMetadata`` pickle, read by an unpickler that knows only
    Ray's metadata class and the mapped checkpoint classes.

    Raises
    ------
    UnsupportedRayClassError
        The pickle names any other class (nothing of it is built).
    CheckpointFormatError
        It is no readable pickle of Ray's metadata.
    """
    try:
        found = _MetadataUnpickler(io.BytesIO(raw), source).load()
    except UnsupportedRayClassError:
        raise
    except Exception as e:  # a damaged pickle fails in many ways
        raise CheckpointFormatError(
            f"{source} is not a readable pickle of Ray's checkpoint metadata: {e!r}"
        ) from e
    if not isinstance(found, RayCheckpointMetadata):
        raise CheckpointFormatError(
            f"{source} holds a {type(found).__name__}, not Ray's _CheckpointMetadata"
        )
    found.dckpt_class(source)  # checks the type and the state
    return found


def load_pickle(raw: bytes | bytearray | memoryview, source: str) -> Any:
    """Unpickle the user's data of a checkpoint that may come from Ray (trusted data).

    Ray's names are checked before anything is unpickled: Ray's metadata and
    checkpoint classes are mapped, ``ray.cloudpickle`` is read as ``cloudpickle``, and
    any other name from Ray must be importable here (else
    :class:`~dckpt.errors.UnsupportedRayClassError`).
    """
    for module, name in _globals(raw):
        _check_user_global(module, name, source)
    try:
        return _UserUnpickler(io.BytesIO(raw), source).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise CheckpointFormatError(f"{source} is not a readable pickle: {e}") from e


def drop_metadata(data: dict[Any, Any], source: str) -> RayCheckpointMetadata | None:
    """Remove Ray's metadata (``"_metadata"``) from a dict Ray pickled; return it."""
    value = data.get(METADATA_KEY)
    if not isinstance(value, RayCheckpointMetadata):
        return None
    del data[METADATA_KEY]
    value.dckpt_class(source)
    return value


def bytes_to_dict_form(raw: bytes | bytearray | memoryview) -> dict[Any, Any]:
    """dckpt's dict form (``Checkpoint.from_dict`` reads it) of Ray's ``to_bytes()``.

    The user's keys as they are; Ray's class and state, and the files of
    ``"fs_checkpoint"`` and ``"_ray_additional_checkpoint_files"``, under dckpt's
    reserved key. Call :func:`is_ray_pickle` first.
    """
    source = "Ray's to_bytes() data"
    data = load_pickle(raw, source)
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{source} holds a {type(data).__name__}, not a dict")
    metadata = drop_metadata(data, source)
    out = io.BytesIO()
    has_files = False
    with ArchiveWriter(out) as writer:
        fs = data.pop(FS_KEY, None)
        if fs is not None:
            preprocessor = _copy_tar(fs, writer, "", f"{source}[{FS_KEY!r}]")
            has_files = True
            if preprocessor is not None and PREPROCESSOR_KEY not in data:
                data[PREPROCESSOR_KEY] = load_pickle(preprocessor, f"{source}: _preprocessor")
        for name, tar in dict(data.pop(ADDITIONAL_FILES_KEY, None) or {}).items():
            _copy_tar(tar, writer, safe_relpath(str(name)), f"{source}: {name}")
            has_files = True
    reserved: dict[str, Any] = {}
    if metadata is not None:
        dckpt_class = metadata.dckpt_class(source)
        if dckpt_class is not None:
            reserved["class"] = dckpt_class
        if metadata.checkpoint_state:
            reserved["state"] = dict(metadata.checkpoint_state)
    if has_files:
        reserved["files"] = out.getvalue()
    if reserved:
        data[RESERVED_KEY] = reserved
    return data


# ------------------------------------------------------------------ internals


class _RayNamesUnpickler(pickle.Unpickler):
    """An unpickler that maps Ray's names: its metadata class and the checkpoint classes
    (:func:`_mapped`); what it does with any other name is :meth:`unmapped`'s."""

    def __init__(self, file: io.BytesIO, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _METADATA_CLASS:
            return RayCheckpointMetadata
        mapped = _mapped(module, name)
        return mapped if mapped is not None else self.unmapped(module, name)

    def unmapped(self, module: str, name: str) -> Any:
        raise NotImplementedError


class _MetadataUnpickler(_RayNamesUnpickler):
    """Knows Ray's metadata class and the mapped checkpoint classes; nothing else."""

    def unmapped(self, module: str, name: str) -> Any:
        raise _unsupported(f"{module}.{name}", self._source)


class _UserUnpickler(_RayNamesUnpickler):
    """The usual unpickler, with Ray's names mapped (see :func:`load_pickle`)."""

    def unmapped(self, module: str, name: str) -> Any:
        if _is_ray(module):
            _check_user_global(module, name, self._source)
            if module == "ray.cloudpickle" or module.startswith("ray.cloudpickle."):
                module = module[len("ray."):]
        return pickle.Unpickler.find_class(self, module, name)  # the usual lookup


def _mapped(module: str, name: str) -> MappedClass | None:
    ray_class = f"{module}:{name}"
    configured = dask.config.get("dckpt.ray.classes", None) or {}
    dckpt_class = configured.get(ray_class) or RAY_CLASSES.get((module, name))
    return None if dckpt_class is None else MappedClass(ray_class, str(dckpt_class))


def _check_user_global(module: str | None, name: str | None, source: str) -> None:
    """Refuse a name from Ray in the user's data that is neither mapped nor importable."""
    if module is None or name is None or not _is_ray(module):
        return
    if (module, name) == _METADATA_CLASS or _mapped(module, name) is not None:
        return
    if module == "ray.cloudpickle" or module.startswith("ray.cloudpickle."):
        return
    if name.endswith("Checkpoint"):  # a checkpoint class: it needs a mapping, not Ray
        raise _unsupported(f"{module}.{name}", source)
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise _unsupported(f"{module}.{name}", source, installed=False) from e


def _is_ray(module: str) -> bool:
    return module == "ray" or module.startswith("ray.")


def _unsupported(name: str, source: str, installed: bool = True) -> UnsupportedRayClassError:
    if not installed:
        return UnsupportedRayClassError(
            f"{source} holds an object of {name}, a class of Ray; Ray is not installed "
            "here and dckpt maps only Ray's checkpoint classes. Install Ray to read "
            "this data, or save it without Ray's objects"
        )
    known = ", ".join(dict.fromkeys(f"{m}.{n}" for (m, n) in RAY_CLASSES if m.count(".") > 2
                                    or m == "ray.air.checkpoint"))
    return UnsupportedRayClassError(
        f"{source} names the class {name}, which is not one of Ray's checkpoint "
        f"classes that dckpt maps to its own ({known}); nothing of it was unpickled. "
        "To read it, "
        "map it to a dckpt Checkpoint class with the setting dckpt.ray.classes, e.g. "
        "{'ray.module:RayCheckpoint': 'dckpt._checkpoint:Checkpoint'}"
    )


def _name_of(kind: Any) -> str:
    if isinstance(kind, type):
        return f"{kind.__module__}.{kind.__qualname__}"
    return repr(kind)


def _first_ops(raw: bytes | bytearray | memoryview, n: int) -> Iterator[str]:
    for i, (op, _, _) in enumerate(pickletools.genops(bytes(raw))):
        if i >= n:
            return
        yield op.name


_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
                      "STRING", "BINSTRING", "SHORT_BINSTRING"})
_NO_PUSH = frozenset({"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"})


def _globals(raw: bytes | bytearray | memoryview) -> Iterator[tuple[str, str]]:
    """The ``(module, name)`` of every global a pickle names, from its opcodes alone.

    ``STACK_GLOBAL`` takes both from the stack, where the pickler always puts them just
    before it (as strings, or from the memo); those are followed here. A name that
    cannot be followed is left to the unpickler's ``find_class``, which checks again.
    """
    memo: dict[int, Any] = {}
    last: list[Any] = []  # the values pushed last (None: not a string)
    for op, arg, _ in pickletools.genops(bytes(raw)):
        kind = op.name
        if kind in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            yield module, name
            last.append(None)
        elif kind == "STACK_GLOBAL":
            if len(last) >= 2 and isinstance(last[-2], str) and isinstance(last[-1], str):
                yield last[-2], last[-1]
            del last[-2:]
            last.append(None)
        elif kind in _STRINGS:
            last.append(arg if isinstance(arg, str) else None)
        elif kind == "MEMOIZE":
            memo[len(memo)] = last[-1] if last else None
        elif kind in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(str(arg))] = last[-1] if last else None
        elif kind in ("GET", "BINGET", "LONG_BINGET"):
            last.append(memo.get(int(str(arg))))
        elif kind not in _NO_PUSH:
            last.append(None)
        del last[:-2]


def _copy_tar(raw: Any, writer: ArchiveWriter, prefix: str, source: str) -> bytes | None:
    """Copy the entries of a tar archive Ray made (``_pack``) into ``writer`` under
    ``prefix``, leaving out Ray's control files; return its top ``_preprocessor``.

    Nothing is written to disk: entries go into dckpt's packed format, whose paths
    (``..``, absolute, links leading out) are checked here and again on unpacking.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise CheckpointFormatError(f"{source} is a {type(raw).__name__}, not a tar archive")
    preprocessor = None
    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(raw)), mode="r:*") as tar:
            for member in tar:
                name = member.name.strip("/")
                if name in ("", "."):  # the archive's root (Ray adds it as "")
                    if member.isfile() and prefix:  # a single file packed under its name
                        writer.add_bytes(prefix, _member_bytes(tar, member), mode=member.mode)
                    continue
                name = safe_relpath(name)
                if not prefix and (name == METADATA_FILE or ("/" not in name
                                                             and name.endswith(META_SUFFIX))):
                    continue
                if not prefix and name == PREPROCESSOR_KEY and member.isfile():
                    preprocessor = _member_bytes(tar, member)
                    continue
                path = f"{prefix}/{name}" if prefix else name
                if member.isfile():
                    writer.add_bytes(path, _member_bytes(tar, member), mode=member.mode)
                elif member.isdir():
                    writer.add_directory(path, mode=member.mode | 0o700)
                elif member.issym():
                    writer.add_symlink(path, member.linkname)
                else:
                    raise UnsafePathError(
                        f"{source}: entry {member.name!r} is neither a file, a directory "
                        "nor a symlink; refusing it"
                    )
    except tarfile.TarError as e:
        raise CheckpointFormatError(f"{source} is not a readable tar archive: {e}") from e
    return preprocessor


def _member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    assert f is not None  # a regular file
    with f:
        return f.read()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()

