"""Writing a checkpoint's data, for :class:`~dckpt._checkpoint.Checkpoint`'s conversions.

A checkpoint object adds to its data what it holds in memory (the user's dict of a
dict checkpoint, a preprocessor set on it, its metadata, class and subclass state):
:func:`control_files` says which control files that asks for, and every writer lays
them over a copy of the data, never into the checkpoint's own directory. The writers:
:func:`materialize` (the whole checkpoint into an empty directory: ``to_directory``),
:func:`pack` (``to_bytes``), :func:`upload` (``to_uri``), :func:`uri_download` (the
shared download behind ``as_directory`` of a URI checkpoint), and :func:`dict_form`
(``to_dict``'s reserved entry).

Values and callables in, nothing of a Checkpoint object: the façade
(``dckpt/_checkpoint.py``) passes its source, its directory here and its own
``_control_files``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import fsspec.callbacks

from dckpt import _config, _storage, _transfer
from dckpt._checkpoint_reading import copy_archive
from dckpt._formats import ArchiveWriter, copy_tree, ray_format, unpack_to_directory
from dckpt._formats.layout import (
    DICT_FILE,
    HEADER_FILE,
    PREPROCESSOR_FILE,
    PREPROCESSOR_KEY,
    RESERVED_KEY,
    STATE_FILE,
    CheckpointHeader,
    dump_pickle,
)
from dckpt._shared_dir import shared_name
from dckpt._sources import DictData, Source, UriFolder
from dckpt.errors import CheckpointFormatError

__all__ = [
    "check_apart",
    "class_path_of",
    "control_files",
    "dict_form",
    "materialize",
    "pack",
    "same_path",
    "target_directory",
    "upload",
    "uri_download",
    "write_overlay",
]

#: The control files a checkpoint object asks for, given the directory its data comes
#: from (``None`` for a dict checkpoint): a name's ``None`` drops that file of the source.
Overlay = Callable[[str | None], dict[str, bytes | None]]
#: ``as_directory()`` of the checkpoint being written.
AsDirectory = Callable[[], contextlib.AbstractContextManager[str]]


def control_files(
    source: str | None,
    data: DictData | None,
    *,
    preprocessor: bytes | None,
    metadata: dict[str, Any],
    class_path: str | None,
    state: dict[str, Any],
) -> dict[str, bytes | None]:
    """The control files a checkpoint object's state asks for, by name.

    ``source`` is the directory the data comes from (``None`` for a dict checkpoint,
    whose ``data`` is given). ``preprocessor``: the pickled preprocessor set on the
    object, if one was. A value of ``None`` means "drop that file of the source".
    Written always: the user's dict (dict checkpoints), the preprocessor when there is
    one, the header when there is anything to say, the subclass state when the class
    has any.
    """
    # A copy of a directory Ray AIR wrote gets dckpt's control files instead of Ray's.
    files = {} if source is None else ray_format.converted_control_files(source)
    if data is not None:
        user = dict(data.data)
        if PREPROCESSOR_KEY in user:
            files[PREPROCESSOR_FILE] = dump_pickle(user.pop(PREPROCESSOR_KEY))
        if user:
            files[DICT_FILE] = dump_pickle(user)
    if preprocessor is not None:
        files[PREPROCESSOR_FILE] = preprocessor
    had_header = source is not None and os.path.exists(os.path.join(source, HEADER_FILE))
    if metadata or class_path or had_header or DICT_FILE in files:
        files[HEADER_FILE] = CheckpointHeader(
            checkpoint_class=class_path, metadata=metadata
        ).to_json()
    if state:
        files[STATE_FILE] = dump_pickle(state)
    elif source is not None and os.path.exists(os.path.join(source, STATE_FILE)):
        files[STATE_FILE] = None  # this class carries no state: drop the stale file
    return files


def class_path_of(cls: type, base: type) -> str | None:
    """``"module:qualname"`` of a checkpoint class; ``None`` for ``base`` (``Checkpoint``)."""
    if cls is base:
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def dict_form(
    user: dict[Any, Any], files: bytes | None, *, class_path: str | None,
    state: dict[str, Any], metadata: dict[str, Any],
) -> dict[Any, Any]:
    """``user`` with the reserved entry that carries the rest, when there is any."""
    reserved: dict[str, Any] = {}
    if class_path is not None:
        reserved["class"] = class_path
    if state:
        reserved["state"] = state
    if metadata:
        reserved["metadata"] = metadata
    if files is not None:
        reserved["files"] = files
    if reserved:
        user[RESERVED_KEY] = reserved
    return user


def target_directory(path: str | os.PathLike[str] | None) -> str:
    """Where ``to_directory(path)`` writes: ``path`` made absolute, or a new directory
    under ``dckpt.temporary-directory``."""
    if path is None:
        path = os.path.join(
            _config.temporary_directory(), f"checkpoint_tmp_{uuid.uuid4().hex}"
        )
    return os.path.abspath(os.fspath(path))


def check_apart(directory: str | None, target: str) -> None:
    """Refuse to write the checkpoint in ``directory`` into ``target`` if one lies
    inside the other."""
    if directory is None:
        return
    real_a, real_b = os.path.realpath(directory), os.path.realpath(target)
    if os.path.commonpath([real_a, real_b]) in (real_a, real_b):
        raise ValueError(
            f"cannot write checkpoint {directory} into {target}: "
            "one lies inside the other"
        )


def same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def materialize(
    staging: str, source: Source, directory: str | None, overlay: Overlay,
    callback: fsspec.callbacks.Callback,
) -> None:
    """Write the whole checkpoint into the empty directory ``staging``.

    ``directory`` is where its data is on this node (a node reference must have been
    found here first), ``None`` for a dict or a URI.
    """
    if isinstance(source, DictData):
        if source.files is not None:
            unpack_to_directory(source.files, staging, callback=callback)
        files = overlay(None)
    elif directory is not None:
        # Symlinks as in to_bytes (dckpt._formats._tree): links inside the tree stay
        # links, others are followed as Ray's copytree does. Control files this
        # object rewrites are not copied, so none is written through a link.
        files = overlay(directory)
        copy_tree(directory, staging, exclude=files.__contains__, callback=callback)
    else:
        assert isinstance(source, UriFolder), f"{source!r} is not on this node"
        _storage.download_directory(
            source.uri, staging, storage_options=source.storage_options,
            callback=callback,
        )
        files = overlay(staging)
    write_overlay(staging, files, write=_write_plain)


def pack(
    source: Source, as_directory: AsDirectory, overlay: Overlay,
    callback: fsspec.callbacks.Callback,
) -> bytes:
    """The checkpoint packed into bytes (``to_bytes``)."""
    out = io.BytesIO()
    with ArchiveWriter(out) as writer:
        if isinstance(source, DictData):
            if source.files is not None:
                copy_archive(source.files, writer)
            files = overlay(None)
        else:
            with as_directory() as directory:
                files = overlay(directory)
                writer.add_tree(
                    directory, exclude=files.__contains__, callback=callback
                )
        for name, content in sorted(files.items()):
            if content is not None:
                writer.add_bytes(name, content)
    return out.getvalue()


def upload(
    uri: str, options: dict[str, Any], own: str | None, as_directory: AsDirectory,
    overlay: Overlay, callback: fsspec.callbacks.Callback,
) -> None:
    """Upload the checkpoint to the folder at ``uri`` (not a local one): its own
    directory ``own`` with the control files laid over, else its ``as_directory()``."""
    if own is not None:
        files = overlay(own)
        _storage.upload_directory(
            own, uri, storage_options=options, callback=callback,
            overlay=files, hashes=_file_hashes(own),
        )
    else:
        with as_directory() as directory:
            _storage.upload_directory(
                directory, uri, storage_options=options, callback=callback,
                hashes=_file_hashes(directory),
            )


def uri_download(
    source: UriFolder, files: Mapping[str, bytes | None],
    to_directory: Callable[[str], object],
) -> tuple[str, Callable[[str], None]]:
    """The name of the directory ``as_directory`` shares for a URI checkpoint, and how
    to fill it.

    Named after the URI, its committed version and what the object adds to it (its
    control ``files``), so every object of it shares one download; a download that
    sees the URI rewritten meanwhile is removed and refused.
    """
    uri, options = source.uri, source.storage_options
    version = _storage.uri_version(uri, storage_options=options)
    name = shared_name(uri, version, options, dict(files))

    def download(path: str) -> None:
        to_directory(path)
        if _storage.uri_version(uri, storage_options=options) != version:
            shutil.rmtree(path, ignore_errors=True)  # not what `name` says
            raise CheckpointFormatError(
                f"the checkpoint at {uri} was rewritten while it was being "
                "downloaded; try again"
            )

    return name, download


def write_overlay(directory: str, files: Mapping[str, bytes | None], write: Any) -> None:
    """Write control files into ``directory``; ``None`` removes a file of that name."""
    for name, content in files.items():
        path = os.path.join(directory, name)
        if content is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        else:
            write(path, content)


def _write_plain(path: str, content: bytes) -> None:
    if os.path.islink(path):  # a link of that name in the data: replace, never write through
        os.unlink(path)
    with open(path, "wb") as f:
        f.write(content)


def _file_hashes(directory: str) -> dict[str, str]:
    """Each file's content hash by relative path: computed once per file version
    (:func:`dckpt._transfer.build_manifest`), so an upload of a checkpoint pickled or
    sent before reads nothing more."""
    return {entry.path: entry.hash for entry in _transfer.build_manifest(directory).files}
