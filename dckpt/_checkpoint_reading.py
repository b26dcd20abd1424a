"""Reading saved checkpoints, for :class:`~dckpt._checkpoint.Checkpoint`'s constructors.

What a directory, a folder at a URI or packed bytes say of the checkpoint they hold is
read in two steps, so that the class they name is checked before anything is unpickled
(:class:`Saved`): first the header (the class and metadata, JSON), or Ray AIR's
metadata in what Ray wrote (:mod:`dckpt._formats.ray_format`); then, once the caller checked
the class, the pickled subclass state. Also here: the class a saved checkpoint loads as
(:func:`class_to_load`), the source that ``Checkpoint(...)``'s arguments make
(:func:`initial_source`), a source's metadata and preprocessor, and the dict form of a
source or a directory (:func:`dict_data`, :func:`read_directory_as_dict`), which
conversions and pickling read too.

Values in, values out: nothing here knows a Checkpoint object (its façade,
``dckpt/_checkpoint.py``, keeps its state).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from dckpt import _storage
from dckpt._formats import ArchiveReader, ArchiveWriter, is_packed, ray_format
from dckpt._formats.layout import (
    CONTROL_FILES,
    DICT_FILE,
    HEADER_FILE,
    PREPROCESSOR_FILE,
    PREPROCESSOR_KEY,
    RESERVED_KEY,
    STATE_FILE,
    CheckpointHeader,
    check_metadata,
    load_pickle,
    read_header,
    read_pickle_file,
    split_reserved,
)
from dckpt._sources import DictData, LocalDirectory, Source, UriFolder
from dckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
)

C = TypeVar("C")
#: ``as_directory()`` of the checkpoint being read.
AsDirectory = Callable[[], contextlib.AbstractContextManager[str]]

__all__ = [
    "Saved",
    "class_to_load",
    "copy_archive",
    "existing_directory",
    "initial_source",
    "dict_data",
    "preprocessor_of",
    "read_directory_as_dict",
    "saved_at_uri",
    "saved_in_bytes",
    "saved_in_directory",
    "source_metadata",
    "user_dict",
]


@dataclass(frozen=True)
class Saved:
    """What a saved checkpoint says of itself before anything is unpickled.

    ``class_path`` is the checkpoint class it names (``None``: ``Checkpoint``),
    ``metadata`` its metadata; :meth:`state` unpickles the subclass state it carries:
    call it once the class is checked and the checkpoint built.
    """

    class_path: str | None
    metadata: dict[str, Any]
    load_state: Callable[[], dict[str, Any]] = dict

    def state(self) -> dict[str, Any]:
        """The saved ``_SERIALIZED_ATTRS`` values (unpickles)."""
        return self.load_state()


def class_to_load(cls: type[C], saved_class_path: str | None, base: type[Any]) -> type[C]:
    """The class to load data saved by ``saved_class_path`` (``None``: ``base``, the
    ``Checkpoint`` class) with through ``cls``: the more derived of the two."""
    saved = base if saved_class_path is None else _import_class(saved_class_path, base)
    if issubclass(cls, saved):
        return cls
    if issubclass(saved, cls):
        return cast("type[C]", saved)
    raise IncompatibleCheckpointError(
        f"this checkpoint was saved by {saved.__qualname__}, which is not compatible "
        f"with {cls.__qualname__} (neither is a subclass of the other); load it with "
        f"{saved.__qualname__} or Checkpoint"
    )


def initial_source(
    local_path: str | os.PathLike[str] | None,
    data_dict: dict[Any, Any] | None,
    uri: str | None,
    storage_options: Mapping[str, Any] | None,
) -> tuple[Source, dict[str, Any] | None, dict[str, Any]]:
    """The source ``Checkpoint(local_path=, data_dict=, uri=)`` wraps, the metadata its
    arguments carry (a dict's; ``None``: read it from the source when asked) and the
    subclass state they carry. A ``file://`` URI or a plain path gives a directory."""
    given = [name for name, value in
             (("local_path", local_path), ("data_dict", data_dict), ("uri", uri))
             if value is not None]
    if len(given) != 1:
        raise ValueError(
            "Checkpoint() takes exactly one of local_path, data_dict and uri; "
            f"got {', '.join(given) or 'none'}"
        )
    if uri is not None and _storage.is_local_uri(uri):
        local_path, uri = _storage.local_path_of(uri), None
    if local_path is not None:
        return LocalDirectory(existing_directory(local_path)), None, {}
    if data_dict is not None:
        if not isinstance(data_dict, Mapping):
            raise TypeError(
                f"data_dict must be a dict, not {type(data_dict).__name__}"
            )
        user, reserved = split_reserved(data_dict)
        source = DictData(user, _checked_files(reserved.get("files")))
        return source, check_metadata(reserved.get("metadata", {})), reserved.get("state", {})
    assert uri is not None
    options = dict(storage_options or {})
    _storage.resolve_uri(uri, options)  # fail early on bad protocols
    return UriFolder(uri, options), None, {}


def existing_directory(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute, once it is known to be an existing directory."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint directory must be a path, not {type(path).__name__}")
    directory = os.path.abspath(os.fspath(path))
    if not os.path.exists(directory):
        raise CheckpointNotFoundError(
            f"cannot create a checkpoint from {directory}: it does not exist"
        )
    if not os.path.isdir(directory):
        raise NotADirectoryError(
            f"cannot create a checkpoint from {directory}: it is not a directory; if "
            "your checkpoint is a single file, pass the directory that holds it"
        )
    return directory


def saved_in_directory(directory: str) -> Saved:
    """What the checkpoint directory ``directory`` says of itself (dckpt's or Ray's)."""
    header = read_header(directory)
    # A directory Ray AIR wrote names its class in Ray's metadata instead.
    ray = None if header else ray_format.read_directory_metadata(directory)
    class_path = header.checkpoint_class if header else ray.dckpt_class(directory) if ray else None

    def state() -> dict[str, Any]:
        out: dict[str, Any] = {}
        state_path = os.path.join(directory, STATE_FILE)
        if os.path.exists(state_path):
            out.update(read_pickle_file(state_path))
        if ray is not None:
            out.update(ray.checkpoint_state)
        return out

    return Saved(class_path, header.metadata if header else {}, state)


def saved_at_uri(uri: str, options: Mapping[str, Any]) -> Saved:
    """What the folder at ``uri`` says of itself; refuses an unfinished dckpt upload
    and a missing folder (:func:`dckpt._storage.uri_status`)."""
    _storage.uri_status(uri, storage_options=options)
    header = _read_uri_header(uri, options)
    ray = None if header else _read_uri_ray_metadata(uri, options)
    class_path = header.checkpoint_class if header else ray.dckpt_class(uri) if ray else None

    def state() -> dict[str, Any]:
        out: dict[str, Any] = {}
        raw_state = _storage.read_file(uri, STATE_FILE, storage_options=options)
        if raw_state is not None:
            out.update(load_pickle(raw_state, f"{uri}/{STATE_FILE}"))
        if ray is not None:
            out.update(ray.checkpoint_state)
        return out

    return Saved(class_path, header.metadata if header else {}, state)


def saved_in_bytes(
    data: bytes | bytearray | memoryview,
) -> tuple[Saved, dict[str, bytes], bytes | None]:
    """What the packed bytes ``data`` say of themselves, their raw control files (the
    user's dict among them: :func:`user_dict` unpickles it) and their other files,
    packed again (``None`` when there are none)."""
    files = io.BytesIO()
    with ArchiveWriter(files) as writer:
        control, has_files = copy_archive(data, writer, keep_apart=CONTROL_FILES)
    header = (
        CheckpointHeader.from_json(control[HEADER_FILE], f"the packed {HEADER_FILE}")
        if HEADER_FILE in control else None
    )

    def state() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if STATE_FILE in control:
            out.update(load_pickle(control[STATE_FILE], STATE_FILE))
        return out

    saved = Saved(header.checkpoint_class if header else None,
                  header.metadata if header else {}, state)
    return saved, control, files.getvalue() if has_files else None


def source_metadata(source: Source, directory: str | None) -> dict[str, Any]:
    """The metadata a source holds: a directory's (``directory``, where the data is
    here) or a URI's header. A dict's metadata is set when it is made, a node
    reference's travels with it: neither is read from anywhere."""
    if directory is not None:
        header = read_header(directory)
    elif isinstance(source, UriFolder):
        header = _read_uri_header(source.uri, source.storage_options)
    else:
        header = None
    return header.metadata if header else {}


def preprocessor_of(source: Source, as_directory: AsDirectory) -> Any:
    """The preprocessor stored with the data of ``source``, or ``None`` (unpickles).

    ``as_directory`` gives the checkpoint's data in a directory, for a directory, a
    node reference or a folder Ray AIR uploaded (which may hold its preprocessor in
    its dict); a dict's is one of its keys.
    """
    if isinstance(source, DictData):
        return source.data.get(PREPROCESSOR_KEY)
    if isinstance(source, UriFolder):
        options = source.storage_options
        raw = _storage.read_file(source.uri, PREPROCESSOR_FILE, storage_options=options)
        if raw is not None:
            return load_pickle(raw, f"{source.uri}/{PREPROCESSOR_FILE}")
        if _storage.read_file(source.uri, ray_format.METADATA_FILE,
                              storage_options=options) is None:
            return None
    with as_directory() as directory:
        path = os.path.join(directory, PREPROCESSOR_FILE)
        if os.path.exists(path):
            return read_pickle_file(path)
        # Ray AIR keeps a dict checkpoint's preprocessor in its dict instead.
        return ray_format.read_dict_preprocessor(directory)


def dict_data(source: Source, as_directory: AsDirectory) -> tuple[dict[Any, Any], bytes | None]:
    """The user's dict (a copy) and the packed files of ``source``'s dict form; read
    from ``as_directory()`` for a source that is no dict."""
    if isinstance(source, DictData):
        return dict(source.data), source.files
    with as_directory() as directory:
        return read_directory_as_dict(directory)


def read_directory_as_dict(directory: str) -> tuple[dict[Any, Any], bytes | None]:
    """A directory's dict form: the user's keys and its other files, packed."""
    control = {}
    for name in (DICT_FILE, PREPROCESSOR_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                control[name] = f.read()
    user = user_dict(control, directory)
    # Ray AIR keeps keys of a directory's dict in <key>.meta.pkl files.
    ray_keys, ray_files = ray_format.read_directory_keys(directory)
    user.update(ray_keys)
    control_files = CONTROL_FILES | ray_files
    if set(os.listdir(directory)) <= control_files:
        return user, None
    out = io.BytesIO()
    with ArchiveWriter(out) as writer:
        writer.add_tree(directory, exclude=control_files.__contains__)
    return user, out.getvalue()


def user_dict(control: Mapping[str, bytes], source: str) -> dict[Any, Any]:
    """The user's dict from the raw control files of a dict checkpoint (unpickles)."""
    user: dict[Any, Any] = {}
    if DICT_FILE in control:
        user = load_pickle(control[DICT_FILE], f"{source}/{DICT_FILE}")
        if not isinstance(user, dict):
            raise CheckpointFormatError(
                f"{source}/{DICT_FILE} holds a {type(user).__name__}, not a dict"
            )
        ray_format.drop_metadata(user, f"{source}/{DICT_FILE}")  # Ray's, not the user's
    if PREPROCESSOR_FILE in control:
        user[PREPROCESSOR_KEY] = load_pickle(
            control[PREPROCESSOR_FILE], f"{source}/{PREPROCESSOR_FILE}"
        )
    return user


def copy_archive(
    packed: bytes | bytearray | memoryview,
    writer: ArchiveWriter,
    *,
    keep_apart: frozenset[str] = frozenset(),
) -> tuple[dict[str, bytes], bool]:
    """Copy the entries of ``packed`` into ``writer``.

    Files named in ``keep_apart`` are returned by name instead of copied. Also returns
    whether anything was copied.
    """
    kept: dict[str, bytes] = {}
    copied = False
    reader = ArchiveReader(io.BytesIO(packed))
    for entry in reader:
        if entry.kind == "file" and entry.path in keep_apart:
            kept[entry.path] = reader.read_payload()
            continue
        copied = True
        if entry.kind == "file":
            writer.add_bytes(entry.path, reader.read_payload(), mode=entry.mode)
        elif entry.kind == "directory":
            writer.add_directory(entry.path, mode=entry.mode)
        else:
            assert entry.target is not None
            writer.add_symlink(entry.path, entry.target)
    return kept, copied


def _import_class(class_path: str, base: type[Any]) -> type[Any]:
    module_name, _, qualname = class_path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as e:
        raise CheckpointFormatError(
            f"this checkpoint was saved by class {class_path!r}, which cannot be "
            f"imported here ({e}); install the code that defines it"
        ) from e
    if not (isinstance(found, type) and issubclass(found, base)):
        raise CheckpointFormatError(f"{class_path!r} is not a Checkpoint class")
    return found


def _read_uri_header(uri: str, options: Mapping[str, Any]) -> CheckpointHeader | None:
    """The header of the checkpoint at ``uri``, or ``None`` for a plain folder."""
    raw = _storage.read_file(uri, HEADER_FILE, storage_options=options)
    return CheckpointHeader.from_json(raw, f"{uri}/{HEADER_FILE}") if raw else None


def _read_uri_ray_metadata(
    uri: str, options: Mapping[str, Any]
) -> ray_format.RayCheckpointMetadata | None:
    """Ray AIR's metadata of the folder at ``uri``, or ``None`` when it has none."""
    raw = _storage.read_file(uri, ray_format.METADATA_FILE, storage_options=options)
    return None if raw is None else ray_format.load_metadata(
        raw, f"{uri}/{ray_format.METADATA_FILE}"
    )


def _checked_files(files: Any) -> bytes | None:
    if files is None:
        return None
    if not isinstance(files, (bytes, bytearray)) or not is_packed(files):
        raise CheckpointFormatError(
            f"the files carried in {RESERVED_KEY!r} are not packed dckpt data"
        )
    return bytes(files)
