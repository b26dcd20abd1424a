"""``Checkpoint``: the API of Ray AIR's ``ray.air.checkpoint.Checkpoint`` for Dask.

A checkpoint holds a model's state in one of three representations — an in-memory dict,
a local directory, or a folder at a URI (anything fsspec opens) — and converts between
them so that every round trip gives back what went in. Ray code ports by changing the
import: ``from dckpt import Checkpoint``.

The file layout and what travels beside a dict are described in
:mod:`dckpt._formats._layout`; the byte format of :meth:`Checkpoint.to_bytes` in
:mod:`dckpt._formats._packing`; storage at URIs in :mod:`dckpt._storage`.

Which representation a checkpoint holds (or a node reference, on a cluster) is one
value of :mod:`dckpt._sources`. dckpt's other layers read it through the developer API
at the end of this module (:func:`source_of`, :func:`node_ref_of`,
:func:`with_node_ref`), never through a checkpoint's private attributes.

.. warning::
   Dict checkpoints, preprocessors and subclass state are pickles. Load only
   checkpoints you trust. Metadata (:meth:`Checkpoint.get_metadata`) is JSON and can be
   read without unpickling anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import io
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import dask.config
import fsspec.callbacks
from dask.utils import parse_bytes
from fsspec.callbacks import DEFAULT_CALLBACK

from dckpt import _config, _storage, _transfer
from dckpt._formats import (
    ArchiveReader,
    ArchiveWriter,
    atomic_directory,
    copy_tree,
    is_packed,
    unpack_to_directory,
    write_file_atomically,
)
from dckpt._formats import _ray as ray_format
from dckpt._formats._layout import (
    CONTROL_FILES,
    DICT_FILE,
    HEADER_FILE,
    PREPROCESSOR_FILE,
    PREPROCESSOR_KEY,
    RESERVED_KEY,
    STATE_FILE,
    CheckpointHeader,
    check_metadata,
    dump_pickle,
    load_pickle,
    read_header,
    read_pickle_file,
    split_reserved,
)
from dckpt._shared_dir import shared_directory, shared_name
from dckpt._sources import (
    DictData,
    LocalDirectory,
    NodeReference,
    Source,
    UriFolder,
    with_uri,
)
from dckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    IncompatibleCheckpointError,
)

if TYPE_CHECKING:
    from dckpt.cluster import NodeRef

__all__ = ["Checkpoint", "node_ref_of", "source_of", "with_node_ref"]

C = TypeVar("C", bound="Checkpoint")
F = TypeVar("F", bound=Callable[..., Any])


def _uses_data(method: F) -> F:
    """Run a method within :meth:`Checkpoint._data_here` (resolve and pin a reference);
    the method's ``callback`` also follows a fetch from another node."""

    @functools.wraps(method)
    def wrapper(self: Checkpoint, *args: Any, **kwargs: Any) -> Any:
        with self._data_here(kwargs.get("callback", DEFAULT_CALLBACK)):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class _Unset:
    """Marks "no preprocessor was set on this object"; pickles as the singleton."""

    def __repr__(self) -> str:
        return "<unset>"

    def __reduce__(self) -> str:
        return "_UNSET"


_UNSET: Any = _Unset()
_REPR_MAX = 120


class Checkpoint:
    """A model's state as a dict, a local directory or a folder at a URI.

    Create one with :meth:`from_dict`, :meth:`from_directory`, :meth:`from_uri`,
    :meth:`from_bytes` or :meth:`from_checkpoint`; read it with :meth:`to_dict`,
    :meth:`to_directory`, :meth:`as_directory`, :meth:`to_uri` or :meth:`to_bytes`.

    Guarantees, as in Ray AIR:

    - Any chain of conversions gives back the original data: ``from_dict(d)`` →
      directory → dict equals ``d``; a directory → dict → directory has the same files.
    - Data added on the way survives: keys added to the dict of a directory checkpoint
      come back in its dict after a trip through a directory; files added to the
      directory of a dict checkpoint come back in the directory after a trip through a
      dict.
    - ``from_dict(d).to_dict() == d`` for a plain checkpoint, and ``from_dict`` never
      changes ``d``. What must travel inside a dict besides the user's keys (a subclass,
      its ``_SERIALIZED_ATTRS``, metadata, files added to a directory) rides under the
      single key ``"_dckpt"``, present only when there is something to carry.
    - A subclass lists instance attributes in ``_SERIALIZED_ATTRS``; they travel with
      the data. Data saved by class ``S`` and loaded through class ``C`` comes back as
      the more derived of the two; unrelated classes raise
      :class:`~dckpt.errors.IncompatibleCheckpointError` (a ``ValueError``).

    Pickling, without a cluster, behaves as in Ray: dict and URI checkpoints keep
    their representation, a directory checkpoint travels as its data (a dict
    checkpoint). Only the checkpoint's own state and its ``_SERIALIZED_ATTRS``
    travel; the copy is built through the class's ``__init__`` (as
    :meth:`from_checkpoint` builds one), so a subclass's other attributes are what
    its ``__init__`` sets. A subclass's constructor must therefore accept Ray's
    ``local_path=``, ``data_dict=`` and ``uri=`` keywords (and ``storage_options=``
    for URIs that have some).

    In-memory changes (:meth:`set_preprocessor`, :meth:`set_metadata`, subclass
    attributes) are never written into a checkpoint's own directory or URI; they are
    part of every representation this object produces.
    """

    #: Names of instance attributes that travel with the checkpoint's data.
    _SERIALIZED_ATTRS: tuple[str, ...] = ()

    # The checkpoint's own state, all of which travels when it is pickled (besides
    # the _SERIALIZED_ATTRS); a field added below must be added here to travel.
    # A NodeReference's path does not (see dckpt._sources): it is of this node only.
    _PICKLED_FIELDS = ("_source", "_metadata", "_preprocessor", "_uuid")

    _source: Source  # where the data is: exactly one of dckpt._sources' kinds
    _metadata: dict[str, Any] | None  # None: not read from the source yet
    _preprocessor: Any
    _uuid: uuid.UUID

    def __init__(
        self,
        local_path: str | os.PathLike[str] | None = None,
        data_dict: dict[Any, Any] | None = None,
        uri: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Developer API: wrap exactly one representation as it is.

        Prefer the ``from_*`` class methods, which also restore the checkpoint's class,
        subclass state and metadata. A ``file://`` URI or a plain path given as ``uri``
        becomes a directory checkpoint, as in Ray.
        """
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

        self._metadata = None
        self._preprocessor = _UNSET
        self._uuid = uuid.uuid4()

        if local_path is not None:
            self._source = LocalDirectory(_existing_directory(local_path))
        elif data_dict is not None:
            if not isinstance(data_dict, Mapping):
                raise TypeError(
                    f"data_dict must be a dict, not {type(data_dict).__name__}"
                )
            user, reserved = split_reserved(data_dict)
            self._source = DictData(user, _checked_files(reserved.get("files")))
            self._metadata = check_metadata(reserved.get("metadata", {}))
            self.__dict__.update(reserved.get("state", {}))
        else:
            assert uri is not None
            options = dict(storage_options or {})
            _storage.resolve_uri(uri, options)  # fail early on bad protocols
            self._source = UriFolder(uri, options)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_dict(cls: type[C], data: dict[Any, Any]) -> C:
        """Create a checkpoint from a dict. ``data`` is copied (shallowly), not changed."""
        _, reserved = split_reserved(data)
        checkpoint_cls = cls._class_for(reserved.get("class"))
        checkpoint = checkpoint_cls(data_dict=data)
        # Again once the subclass's __init__ is done, as Ray does: it may set defaults.
        checkpoint.__dict__.update(reserved.get("state", {}))
        return checkpoint

    @classmethod
    def from_directory(cls: type[C], path: str | os.PathLike[str]) -> C:
        """Create a checkpoint from a local directory, which it then refers to.

        The caller promises not to delete the directory while the checkpoint is used.
        Raises :class:`~dckpt.errors.CheckpointNotFoundError` (a ``FileNotFoundError``)
        if ``path`` does not exist and ``NotADirectoryError`` if it is a file.

        A directory Ray AIR 2.x wrote is read as such (:mod:`dckpt._formats._ray`): its
        class from Ray's ``.metadata.pkl``, mapped to dckpt's, or
        :class:`~dckpt.errors.UnsupportedRayClassError` for a class dckpt does not map.
        """
        directory = _existing_directory(path)
        header = read_header(directory)
        # A directory Ray AIR wrote names its class in Ray's metadata instead.
        ray = None if header else ray_format.read_directory_metadata(directory)
        checkpoint_cls = cls._class_for(
            header.checkpoint_class if header else ray.dckpt_class(directory) if ray else None
        )
        checkpoint = checkpoint_cls(local_path=directory)
        checkpoint._metadata = header.metadata if header else {}
        state_path = os.path.join(directory, STATE_FILE)
        if os.path.exists(state_path):
            checkpoint.__dict__.update(read_pickle_file(state_path))
        if ray is not None:
            checkpoint.__dict__.update(ray.checkpoint_state)
        return checkpoint

    @classmethod
    def from_uri(
        cls: type[C], uri: str, *, storage_options: Mapping[str, Any] | None = None
    ) -> C:
        """Create a checkpoint that refers to a folder at ``uri`` (any fsspec URI).

        ``file://`` URIs and plain paths give a directory checkpoint, as in Ray. For
        other URIs only the small control files are read now; the data is downloaded
        on first use. A folder uploaded by another tool is accepted as a directory
        checkpoint; an unfinished dckpt upload raises
        :class:`~dckpt.errors.IncompleteCheckpointError` and a missing folder
        :class:`~dckpt.errors.CheckpointNotFoundError` (both ``FileNotFoundError``).
        ``storage_options`` (endpoint, credentials, ...) go to fsspec and travel with
        the checkpoint, also when it is pickled. A folder Ray AIR 2.x uploaded is read
        as :meth:`from_directory` reads one.
        """
        if _storage.is_local_uri(uri):
            return cls.from_directory(_storage.local_path_of(uri))
        options = dict(storage_options or {})
        _storage.uri_status(uri, storage_options=options)
        header = _read_uri_header(uri, options)
        ray = None if header else _read_uri_ray_metadata(uri, options)
        checkpoint_cls = cls._class_for(
            header.checkpoint_class if header else ray.dckpt_class(uri) if ray else None
        )
        checkpoint = checkpoint_cls(uri=uri, storage_options=options)
        checkpoint._metadata = header.metadata if header else {}
        raw_state = _storage.read_file(uri, STATE_FILE, storage_options=options)
        if raw_state is not None:
            checkpoint.__dict__.update(load_pickle(raw_state, f"{uri}/{STATE_FILE}"))
        if ray is not None:
            checkpoint.__dict__.update(ray.checkpoint_state)
        return checkpoint

    @classmethod
    def from_bytes(cls: type[C], data: bytes | bytearray | memoryview) -> C:
        """Create a dict checkpoint from the output of :meth:`to_bytes`.

        The header, and the checkpoint class it names, are checked before anything is
        unpickled: bytes that are not a packed checkpoint raise
        :class:`~dckpt.errors.CheckpointFormatError` (a ``ValueError``), as do
        truncated or corrupted bytes and a class that cannot be imported; a class
        unrelated to this one raises
        :class:`~dckpt.errors.IncompatibleCheckpointError`.

        Ray AIR 2.x's ``to_bytes()`` (a pickle of its dict form) is recognised from its
        opcodes, also before anything is unpickled: a pickled dict naming Ray's
        checkpoint metadata or holding ``"fs_checkpoint"``. It gives a dict checkpoint
        of the class Ray's maps to (see :mod:`dckpt._formats._ray`); other pickles are
        refused as before.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"from_bytes() takes bytes, not {type(data).__name__}")
        if not is_packed(data) and ray_format.is_ray_pickle(data):
            # Ray AIR's to_bytes(), recognised from its opcodes before any unpickling.
            return cls.from_dict(ray_format.bytes_to_dict_form(data))
        files = io.BytesIO()
        with ArchiveWriter(files) as writer:
            control, has_files = _copy_archive(data, writer, keep_apart=CONTROL_FILES)
        header = (
            CheckpointHeader.from_json(control[HEADER_FILE], f"the packed {HEADER_FILE}")
            if HEADER_FILE in control else None
        )
        # The class is checked before anything is unpickled, as in from_directory.
        checkpoint_cls = cls._class_for(header.checkpoint_class if header else None)
        user = _user_dict(control, "the packed data")
        checkpoint = checkpoint_cls(data_dict=user)
        source = checkpoint._source
        assert isinstance(source, DictData)
        checkpoint._source = dataclasses.replace(
            source, files=files.getvalue() if has_files else None
        )
        checkpoint._metadata = header.metadata if header else {}
        if STATE_FILE in control:
            checkpoint.__dict__.update(load_pickle(control[STATE_FILE], STATE_FILE))
        return checkpoint

    @classmethod
    def from_checkpoint(cls: type[C], other: Checkpoint) -> C:
        """Convert a checkpoint to this class (e.g. a generic one to a framework's).

        ``other`` is returned as it is when it already has this exact class. Otherwise
        the new checkpoint is built through this class's constructor, as Ray does
        (``cls(local_path=..., data_dict=..., uri=...)``: what a subclass sets in
        ``__init__`` is there), shares ``other``'s data and copies its metadata,
        preprocessor and the attributes named by this class's ``_SERIALIZED_ATTRS``.
        A node reference has no path, dict or URI to give the constructor: it is built
        as an empty dict checkpoint, then given the reference.
        """
        if type(other) is cls:
            return other
        source = other._source
        if isinstance(source, DictData):
            source = dataclasses.replace(source, data=dict(source.data))
        elif isinstance(source, UriFolder):
            source = dataclasses.replace(source, storage_options=dict(source.storage_options))
        fields: dict[str, Any] = {
            "_source": source,
            "_preprocessor": other._preprocessor,
            "_metadata": None if other._metadata is None else dict(other._metadata),
        }
        fields.update(
            (attr, getattr(other, attr))
            for attr in cls._SERIALIZED_ATTRS
            if hasattr(other, attr)
        )
        return cls._built(fields)

    # ------------------------------------------------------------------ conversions

    def to_dict(self) -> dict[Any, Any]:
        """Return the checkpoint's data as a new dict.

        For a dict checkpoint that is the user's dict (plus the preprocessor set with
        :meth:`set_preprocessor`, and the ``"_dckpt"`` entry when there is something
        to carry). A directory's files are packed into ``result["_dckpt"]["files"]``;
        a ``dict_checkpoint.pkl`` in it gives the dict's keys.
        """
        source = self._source
        if isinstance(source, DictData):
            user, files = dict(source.data), source.files
        else:
            with self.as_directory() as directory:
                user, files = _read_directory_as_dict(directory)
        if self._preprocessor is not _UNSET:
            user[PREPROCESSOR_KEY] = self._preprocessor
        reserved: dict[str, Any] = {}
        class_path = _class_path(type(self))
        if class_path is not None:
            reserved["class"] = class_path
        state = self._serialized_state()
        if state:
            reserved["state"] = state
        metadata = self.get_metadata()
        if metadata:
            reserved["metadata"] = metadata
        if files is not None:
            reserved["files"] = files
        if reserved:
            user[RESERVED_KEY] = reserved
        return user

    @_uses_data
    def to_directory(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        callback: fsspec.callbacks.Callback = DEFAULT_CALLBACK,
    ) -> str:
        """Write the checkpoint to a directory and return its path.

        Without ``path``, a new directory under ``dckpt.temporary-directory`` (which
        the caller then owns). The directory is built beside its final place and
        renamed into it, so it is never seen half-written; an existing directory at
        ``path`` is replaced as a whole. ``callback`` (an fsspec ``Callback``) follows
        the copy: one update per file, and a branched child per file for its bytes.
        A node reference fetched from another node first reports that fetch too: a
        child branched as ``(the reference, this node's cache)`` gets its total size
        and every chunk received (``to_uri`` and ``to_bytes`` likewise).

        Symlinks are treated as by :meth:`to_bytes` and the dict form, whatever the
        working directory: a relative link whose target stays inside the checkpoint
        stays a link with that target (dangling or not); a link leading out (or
        absolute) is followed and what it points to copied, as Ray's ``copytree``
        does; a link leading out to nothing is skipped with a logged warning. Object
        stores hold no links: :meth:`to_uri` to one uploads what links point to.
        """
        if path is None:
            path = os.path.join(
                _config.temporary_directory(), f"checkpoint_tmp_{uuid.uuid4().hex}"
            )
        target = os.path.abspath(os.fspath(path))
        directory = self._directory()
        if directory is not None and _same_path(directory, target):
            self._write_control_files(target, source=target, write=write_file_atomically)
            return target
        if directory is not None and _nested(directory, target):
            raise ValueError(
                f"cannot write checkpoint {directory} into {target}: "
                "one lies inside the other"
            )
        with atomic_directory(target) as staging:
            self._materialize(staging, callback)
        return target

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        """Yield a local directory holding the checkpoint's data.

        A directory checkpoint yields its own directory, which is never deleted (and in
        which in-memory changes such as :meth:`set_preprocessor` are not written).
        Others are written to a temporary directory named after this checkpoint, shared
        by every process on this machine that holds a copy of it (it was pickled to
        them), and removed when the last of them leaves the ``with`` block. A URI
        checkpoint's is named after the URI, its committed version (a rewritten URI
        gets a directory of its own) and what this object adds to it (preprocessor,
        metadata, subclass state), so every object of it shares one download, as in
        Ray. Treat the directory as read-only.
        """
        source = self._source
        if isinstance(source, NodeReference):
            with self._data_here() as found:
                assert found is not None
                yield found
            return
        if isinstance(source, LocalDirectory):
            yield source.path
            return
        name = self._uuid.hex
        materialize: Callable[[str], object] = self.to_directory
        if isinstance(source, UriFolder):
            uri, options = source.uri, source.storage_options
            version = _storage.uri_version(uri, storage_options=options)
            name = shared_name(uri, version, options, self._control_files(None))

            def download(path: str) -> None:
                self.to_directory(path)
                if _storage.uri_version(uri, storage_options=options) != version:
                    shutil.rmtree(path, ignore_errors=True)  # not what `name` says
                    raise CheckpointFormatError(
                        f"the checkpoint at {uri} was rewritten while it was being "
                        "downloaded; try again"
                    )

            materialize = download

        path = os.path.join(_config.temporary_directory(), f"checkpoint_tmp_{name}")
        with shared_directory(path, materialize) as directory:
            yield directory

    @_uses_data
    def to_uri(
        self,
        uri: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        callback: fsspec.callbacks.Callback = DEFAULT_CALLBACK,
    ) -> str:
        """Upload the checkpoint to a folder at ``uri`` and return ``uri``.

        Files are uploaded in parallel (``dckpt.storage.max-concurrency``); a commit
        marker is written last, so :meth:`from_uri` never takes a half-written upload
        for a checkpoint. ``file://`` URIs and plain paths are written with
        :meth:`to_directory`. ``callback`` counts files, and its children bytes.

        Files with the same content as a file of a checkpoint uploaded next to ``uri``
        (an earlier step of the same run, in a sibling folder) are copied from there
        on the storage side rather than uploaded (``dckpt.storage.reuse-siblings``);
        the upload is the same plain folder of whole files either way.
        """
        if _storage.is_local_uri(uri):
            self.to_directory(_storage.local_path_of(uri), callback=callback)
        else:
            options = dict(storage_options or {})
            own = self._directory()
            if own is not None:
                overlay = self._control_files(own)
                _storage.upload_directory(
                    own, uri, storage_options=options, callback=callback,
                    overlay=overlay, hashes=_file_hashes(own),
                )
            else:
                with self.as_directory() as directory:
                    _storage.upload_directory(
                        directory, uri, storage_options=options, callback=callback,
                        hashes=_file_hashes(directory),
                    )
        # Recorded so that a node reference made from this object can fall back to it.
        self._source = with_uri(self._source, uri)
        return uri

    @_uses_data
    def to_bytes(
        self, *, callback: fsspec.callbacks.Callback = DEFAULT_CALLBACK
    ) -> bytes:
        """Return the checkpoint packed into bytes (see :meth:`from_bytes`).

        The packed format starts with a dckpt header and holds checksummed records,
        file contents in pieces stored raw or lz4-compressed where that shrinks them
        (:mod:`dckpt._formats._packing`). To stream a large checkpoint to a file or
        socket instead, use :func:`dckpt._formats.pack_directory` on
        :meth:`as_directory`. ``callback``
        follows the packing of a directory's files (a child per file for its bytes);
        a dict checkpoint's data is in memory already and reports nothing.
        """
        out = io.BytesIO()
        source = self._source
        with ArchiveWriter(out) as writer:
            if isinstance(source, DictData):
                if source.files is not None:
                    _copy_archive(source.files, writer)
                overlay = self._control_files(None)
            else:
                with self.as_directory() as directory:
                    overlay = self._control_files(directory)
                    writer.add_tree(
                        directory, exclude=overlay.__contains__, callback=callback
                    )
            for name, content in sorted(overlay.items()):
                if content is not None:
                    writer.add_bytes(name, content)
        return out.getvalue()

    def get_internal_representation(self) -> tuple[str, Any]:
        """Developer API: ``("local_path", path)``, ``("data_dict", dict)``, ``("uri", uri)``
        or, for a directory on another node not yet used here, ``("node_ref", ref)``.

        A node reference used here reports the directory it was found in, as a
        ``"local_path"``; :func:`source_of` tells the two apart.
        """
        match self._source:
            case NodeReference(ref=ref, path=None):
                return "node_ref", ref
            case LocalDirectory(path=path) | NodeReference(path=str(path)):
                return "local_path", path
            case DictData():
                return "data_dict", self.to_dict()
            case UriFolder(uri=uri):
                return "uri", uri
        raise AssertionError(f"unknown source {self._source!r}")

    @property
    def uri(self) -> str | None:
        """``file://<path>`` for a directory checkpoint, the URI for a URI checkpoint,
        ``None`` for a dict checkpoint."""
        if isinstance(self._source, UriFolder):
            return self._source.uri
        directory = self._directory()
        if directory is not None and os.path.exists(directory):
            return f"file://{directory}"
        return None

    # --------------------------------------------------------- preprocessor, metadata

    def get_preprocessor(self) -> Any:
        """Return the preprocessor stored with the checkpoint, or ``None``."""
        if self._preprocessor is not _UNSET:
            return self._preprocessor
        source = self._source
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
            # A folder Ray AIR uploaded may hold its preprocessor in its dict.
        with self.as_directory() as directory:
            path = os.path.join(directory, PREPROCESSOR_FILE)
            if os.path.exists(path):
                return read_pickle_file(path)
            # Ray AIR keeps a dict checkpoint's preprocessor in its dict instead.
            return ray_format.read_dict_preprocessor(directory)

    def set_preprocessor(self, preprocessor: Any) -> None:
        """Attach a preprocessor (any picklable object) to this checkpoint object.

        It is part of every representation produced from now on, under the dict key
        ``"_preprocessor"`` or in a file of that name; the checkpoint's own directory
        or URI is not changed.
        """
        self._preprocessor = preprocessor

    def get_metadata(self) -> dict[str, Any]:
        """Return a copy of the checkpoint's metadata: a small JSON-serialisable dict.

        Read from ``.dckpt.json`` for a directory or URI, without unpickling anything.
        """
        if self._metadata is None:
            self._metadata = self._read_source_metadata()
        return check_metadata(self._metadata)

    def set_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Replace the metadata. It must be JSON-serialisable (else ``TypeError``)."""
        self._metadata = check_metadata(metadata)

    def update_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Merge ``metadata`` into the existing metadata (top-level keys)."""
        merged = self.get_metadata()
        merged.update(check_metadata(metadata))
        self._metadata = merged

    # ------------------------------------------------------------------ dunder

    def __repr__(self) -> str:
        match self._source:
            case NodeReference(ref=ref, path=None):
                argument = f"node_ref={ref!r}"
            case LocalDirectory(path=path) | NodeReference(path=str(path)):
                argument = f"local_path={_shorten(path)}"
            case DictData(data=data):
                argument = f"data_dict={{...{len(data)} keys}}"
            case UriFolder(uri=uri):
                argument = f"uri={_shorten(uri)}"
        return f"{type(self).__name__}({argument})"

    def __fspath__(self) -> str:
        raise TypeError(
            "a Checkpoint is not a path; use Checkpoint.to_directory() or "
            "Checkpoint.as_directory() to get a directory"
        )

    def __getstate__(self) -> dict[str, Any]:
        """How a checkpoint travels depends on its source and where it is pickled.

        - A dict or URI checkpoint keeps its representation, as in Ray.
        - A node reference travels as that reference (same id, origin and URIs, with
          the URIs it was persisted to since), wherever it is pickled, used here or
          not: forwarding never mints a new checkpoint, and the path where this
          process found its data does not travel.
        - A directory pickled on a Dask worker with a node store becomes a node
          reference (a few hundred bytes, whatever its size): the store registers the
          directory and serves it to the nodes that use it
          (:func:`dckpt.cluster._resolve.make_ref`).
        - Elsewhere (the driver) a directory travels as its data (a dict checkpoint),
          as in Ray, up to ``dckpt.inline-max-bytes``. Above that, with a
          (synchronous) default Dask client, it is pushed to one worker's store and
          travels as a reference to that copy
          (:func:`dckpt.cluster._put.push_for_pickling`); else it is uploaded to
          ``dckpt.staging-uri`` when one is set and travels as that URI; else it
          travels inline with a :class:`LargeInlineCheckpointWarning`.

        What travels is the checkpoint's own state (:attr:`_PICKLED_FIELDS`: the
        source, metadata, preprocessor, uuid) and the attributes named in
        ``_SERIALIZED_ATTRS``, as in Ray; no other instance attribute does (a subclass
        may cache a loaded model or hold a lock on itself). See :meth:`__setstate__`.
        """
        state = self._pickled_state()
        source = self._source
        if isinstance(source, (DictData, UriFolder)):
            return state
        if isinstance(source, NodeReference):
            if source.path is not None:  # read here: the header is on this node
                state["_metadata"] = self.get_metadata()
            state["_source"] = NodeReference(source.ref)
            return state
        state["_metadata"] = self.get_metadata()
        from dckpt.cluster._resolve import make_ref  # imports distributed: only now

        ref = make_ref(source.path, uris=source.uris)
        if ref is not None:
            state["_source"] = NodeReference(ref)
            return state
        size = _directory_size(source.path)
        if size > parse_bytes(dask.config.get("dckpt.inline-max-bytes")):
            from dckpt.cluster._put import push_for_pickling

            ref = push_for_pickling(source.path, source.uris)
            if ref is not None:
                state["_source"] = NodeReference(ref)
                return state
            staging = dask.config.get("dckpt.staging-uri", None)
            if staging:
                uri = self.to_uri(f"{staging.rstrip('/')}/{uuid.uuid4().hex}")
                state["_source"] = UriFolder(uri, uris=source.uris)
                return state
            warnings.warn(
                f"pickling {self!r} inline: {size} bytes is above dckpt.inline-max-bytes "
                "and no dckpt.staging-uri is set, so all of it travels with the object",
                LargeInlineCheckpointWarning,
                stacklevel=2,
            )
        user, files = _read_directory_as_dict(source.path)
        state["_source"] = DictData(user, files, uris=source.uris)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Run the class's ``__init__`` as :meth:`from_checkpoint` does, then take ``state``.

        So a subclass's attributes that do not travel (not in ``_SERIALIZED_ATTRS``: a
        lock, a loaded model) are what its ``__init__`` sets, as after Ray's
        ``from_bytes``; those it sets later are absent.
        """
        type(self).__init__(self, **_constructor_arguments(state))
        self.__dict__.update(state)

    # ------------------------------------------------------------------ internals

    def _pickled_state(self) -> dict[str, Any]:
        """The checkpoint's own fields (:attr:`_PICKLED_FIELDS`) and its subclass state."""
        state = {name: self.__dict__[name] for name in self._PICKLED_FIELDS
                 if name in self.__dict__}
        state.update(self._serialized_state())
        return state

    @classmethod
    def _built(cls: type[C], state: Mapping[str, Any]) -> C:
        """A checkpoint of this class built through its constructor, then given ``state``."""
        new = cls(**_constructor_arguments(state))
        new.__dict__.update(state)
        return new

    def _directory(self) -> str | None:
        """The local directory the data is in, if it is in one here.

        A directory checkpoint's own, or where a node reference was found here
        (``None`` before its first use: see :meth:`_data_here`).
        """
        source = self._source
        if isinstance(source, (LocalDirectory, NodeReference)):
            return source.path
        return None

    @contextlib.contextmanager
    def _data_here(
        self, callback: fsspec.callbacks.Callback = DEFAULT_CALLBACK
    ) -> Iterator[str | None]:
        """Within the block the data of a node reference is on this node, and stays.

        The reference is resolved (:mod:`dckpt.cluster._resolve`) on first use, and
        its copy in this node's cache is pinned for the block, so the cache cannot
        evict it while it is read; a copy evicted since an earlier use is fetched
        again. Yields the directory it is in (:meth:`_directory`). Checkpoints that
        are no reference pass through. A fetch from another node is followed by a
        child of ``callback`` (see :func:`dckpt.cluster._resolve.pinned_copy`).
        """
        source = self._source
        if not isinstance(source, NodeReference):
            yield self._directory()
            return
        from dckpt.cluster._resolve import pinned_copy

        with pinned_copy(source.ref, source.path, callback) as path:
            self._source = dataclasses.replace(source, path=path)
            yield path

    @classmethod
    def _class_for(cls: type[C], saved_class_path: str | None) -> type[C]:
        """The class to load data saved by ``saved_class_path`` with, called on ``cls``:
        the more derived of the two."""
        saved = Checkpoint if saved_class_path is None else _import_class(saved_class_path)
        if issubclass(cls, saved):
            return cls
        if issubclass(saved, cls):
            return cast("type[C]", saved)
        raise IncompatibleCheckpointError(
            f"this checkpoint was saved by {saved.__qualname__}, which is not compatible "
            f"with {cls.__qualname__} (neither is a subclass of the other); load it with "
            f"{saved.__qualname__} or Checkpoint"
        )

    def _serialized_state(self) -> dict[str, Any]:
        return {
            attr: getattr(self, attr)
            for attr in self._SERIALIZED_ATTRS
            if hasattr(self, attr)
        }

    def _read_source_metadata(self) -> dict[str, Any]:
        source, directory = self._source, self._directory()
        if directory is not None:
            header = read_header(directory)
        elif isinstance(source, UriFolder):
            header = _read_uri_header(source.uri, source.storage_options)
        else:  # a dict's metadata is set when it is made; a reference's travels with it
            header = None
        return header.metadata if header else {}

    def _control_files(self, source: str | None) -> dict[str, bytes | None]:
        """The control files this object's state asks for, by name.

        ``source`` is the directory the data comes from (``None`` for a dict
        checkpoint). A value of ``None`` means "drop that file of the source".
        Written always: the user's dict (dict checkpoints), the preprocessor when there
        is one, the header when there is anything to say, the subclass state when the
        class has any.
        """
        # A copy of a directory Ray AIR wrote gets dckpt's control files instead of Ray's.
        files = {} if source is None else ray_format.converted_control_files(source)
        if isinstance(self._source, DictData):
            user = dict(self._source.data)
            if PREPROCESSOR_KEY in user:
                files[PREPROCESSOR_FILE] = dump_pickle(user.pop(PREPROCESSOR_KEY))
            if user:
                files[DICT_FILE] = dump_pickle(user)
        if self._preprocessor is not _UNSET:
            files[PREPROCESSOR_FILE] = dump_pickle(self._preprocessor)
        metadata = self.get_metadata()
        class_path = _class_path(type(self))
        had_header = source is not None and os.path.exists(os.path.join(source, HEADER_FILE))
        if metadata or class_path or had_header or DICT_FILE in files:
            files[HEADER_FILE] = CheckpointHeader(
                checkpoint_class=class_path, metadata=metadata
            ).to_json()
        state = self._serialized_state()
        if state:
            files[STATE_FILE] = dump_pickle(state)
        elif source is not None and os.path.exists(os.path.join(source, STATE_FILE)):
            files[STATE_FILE] = None  # this class carries no state: drop the stale file
        return files

    def _write_control_files(self, directory: str, source: str | None, write: Any) -> None:
        _write_overlay(directory, self._control_files(source), write)

    def _materialize(self, staging: str, callback: fsspec.callbacks.Callback) -> None:
        """Write the whole checkpoint into the empty directory ``staging``.

        A node reference must have been found here first (:meth:`_data_here`).
        """
        source, directory = self._source, self._directory()
        if isinstance(source, DictData):
            if source.files is not None:
                unpack_to_directory(source.files, staging, callback=callback)
            overlay = self._control_files(None)
        elif directory is not None:
            # Symlinks as in to_bytes (dckpt._formats._tree): links inside the tree stay
            # links, others are followed as Ray's copytree does. Control files this
            # object rewrites are not copied, so none is written through a link.
            overlay = self._control_files(directory)
            copy_tree(directory, staging, exclude=overlay.__contains__, callback=callback)
        else:
            assert isinstance(source, UriFolder), f"{source!r} is not on this node"
            _storage.download_directory(
                source.uri, staging, storage_options=source.storage_options,
                callback=callback,
            )
            overlay = self._control_files(staging)
        _write_overlay(staging, overlay, write=_write_plain)


# ------------------------------------------------ developer API for dckpt's layers
#
# What dckpt's other packages (dckpt.cluster, dckpt.train, ...) may know of a
# checkpoint beyond its public methods; none of them touches its private attributes.


def source_of(checkpoint: Checkpoint) -> Source:
    """Developer API for dckpt's own layers: where ``checkpoint``'s data is now.

    One of :class:`~dckpt._sources.DictData`, :class:`~dckpt._sources.LocalDirectory`,
    :class:`~dckpt._sources.UriFolder` and :class:`~dckpt._sources.NodeReference`: a
    frozen value, so changing it changes nothing in ``checkpoint``. Unlike
    :meth:`Checkpoint.get_internal_representation` it tells a node reference used here
    (its ``path`` set) from a directory of this machine, and reads nothing.
    """
    return checkpoint._source


def node_ref_of(checkpoint: Checkpoint) -> NodeRef | None:
    """Developer API for dckpt's own layers: the node reference ``checkpoint`` is.

    Also when it was already used in this process (its data was found or copied here):
    it is still that reference, whose origin and holders others can fetch from. Its
    ``uris`` include those ``checkpoint`` was persisted to since (with
    :meth:`Checkpoint.to_uri`). ``None`` for a dict, a local directory or a URI.
    """
    source = checkpoint._source
    return source.ref if isinstance(source, NodeReference) else None


def with_node_ref(checkpoint: C, ref: NodeRef) -> C:
    """Developer API for dckpt's own layers: a checkpoint like ``checkpoint`` whose data
    is ``ref``.

    The same class, metadata, preprocessor and ``_SERIALIZED_ATTRS``, built through the
    class's ``__init__`` (as :meth:`Checkpoint.from_checkpoint` builds one); a new
    object with a uuid of its own, not yet used here (no path), and with ``ref``'s
    URIs only (the caller merges any it wants kept, e.g. from :func:`node_ref_of`).
    ``checkpoint`` is not changed.
    """
    state = checkpoint._pickled_state()
    state.update(_source=NodeReference(ref), _metadata=checkpoint.get_metadata())
    del state["_uuid"]  # a new object: a new one
    return type(checkpoint)._built(state)


# ---------------------------------------------------------------------- helpers


class LargeInlineCheckpointWarning(UserWarning):
    """A large directory checkpoint was pickled with all of its data."""


def _constructor_arguments(state: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments Ray would build a checkpoint with, for the source in ``state``.

    ``local_path``, ``data_dict`` and ``uri`` (one set, as Ray passes them), plus
    ``storage_options`` for a URI that has some. A node reference (used here or not)
    has nothing to pass: it gets an empty ``data_dict``, and its source is set after.
    """
    arguments: dict[str, Any] = {"local_path": None, "data_dict": None, "uri": None}
    source: Source = state["_source"]
    if isinstance(source, DictData):
        arguments["data_dict"] = source.data
    elif isinstance(source, LocalDirectory):
        arguments["local_path"] = source.path
    elif isinstance(source, UriFolder):
        arguments["uri"] = source.uri
        if source.storage_options:
            arguments["storage_options"] = dict(source.storage_options)
    else:
        arguments["data_dict"] = {}
    return arguments


def _directory_size(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


def _existing_directory(path: str | os.PathLike[str]) -> str:
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


def _read_directory_as_dict(directory: str) -> tuple[dict[Any, Any], bytes | None]:
    """A directory's dict form: the user's keys and its other files, packed."""
    control = {}
    for name in (DICT_FILE, PREPROCESSOR_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                control[name] = f.read()
    user = _user_dict(control, directory)
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


def _user_dict(control: Mapping[str, bytes], source: str) -> dict[Any, Any]:
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


def _copy_archive(
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


def _write_overlay(directory: str, files: Mapping[str, bytes | None], write: Any) -> None:
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


def _class_path(cls: type) -> str | None:
    """``"module:qualname"`` of a checkpoint class; ``None`` for :class:`Checkpoint`."""
    if cls is Checkpoint:
        return None
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(class_path: str) -> type[Checkpoint]:
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
    if not (isinstance(found, type) and issubclass(found, Checkpoint)):
        raise CheckpointFormatError(f"{class_path!r} is not a Checkpoint class")
    return found


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _nested(a: str, b: str) -> bool:
    real_a, real_b = os.path.realpath(a), os.path.realpath(b)
    return os.path.commonpath([real_a, real_b]) in (real_a, real_b)


def _shorten(text: str) -> str:
    return text if len(text) <= _REPR_MAX else f"{text[:_REPR_MAX // 2]}...{text[-_REPR_MAX // 2:]}"


def _file_hashes(directory: str) -> dict[str, str]:
    """Each file's content hash by relative path: computed once per file version
    (:func:`dckpt._transfer.build_manifest`), so an upload of a checkpoint pickled or
    sent before reads nothing more."""
    return {entry.path: entry.hash for entry in _transfer.build_manifest(directory).files}
