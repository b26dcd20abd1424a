"""``Checkpoint``: the API of Ray AIR's ``ray.air.checkpoint.Checkpoint`` for Dask.

A checkpoint holds a model's state in one of three representations — an in-memory dict,
a local directory, or a folder at a URI (anything fsspec opens) — and converts between
them so that every round trip gives back what went in. Ray code ports by changing the
import: ``from dckpt import Checkpoint``.

The file layout and what travels beside a dict are described in
:mod:`dckpt._formats.layout`; the byte format of :meth:`Checkpoint.to_bytes` in
:mod:`dckpt._formats._packing`; storage at URIs in :mod:`dckpt._storage`.

Which representation a checkpoint holds (or a node reference, on a cluster) is one
value of :mod:`dckpt._sources`. dckpt's other layers read it through the developer API
there, re-exported here (:func:`source_of`, :func:`node_ref_of`,
:func:`with_node_ref`), never through a checkpoint's private attributes.

The class keeps its state and its documented methods; their bodies read saved
checkpoints through :mod:`dckpt._checkpoint_reading`, write them through
:mod:`dckpt._checkpoint_writing`, and decide how a directory travels when pickled in
:mod:`dckpt._checkpoint_travel`.

.. warning::
   Dict checkpoints, preprocessors and subclass state are pickles. Load only
   checkpoints you trust. Metadata (:meth:`Checkpoint.get_metadata`) is JSON and can be
   read without unpickling anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import fsspec.callbacks
from fsspec.callbacks import DEFAULT_CALLBACK

from dckpt import _checkpoint_reading as reading
from dckpt import _checkpoint_travel as travel
from dckpt import _checkpoint_writing as writing
from dckpt import _config, _storage
from dckpt._checkpoint_travel import LargeInlineCheckpointWarning
from dckpt._formats import (
    atomic_directory,
    is_packed,
    ray_format,
    write_file_atomically,
)
from dckpt._formats.layout import (
    PREPROCESSOR_KEY,
    check_metadata,
    dump_pickle,
    split_reserved,
)
from dckpt._shared_dir import shared_directory
from dckpt._sources import (
    DictData,
    LocalDirectory,
    NodeReference,
    Source,
    UriFolder,
    argument_of,
    copied,
    node_ref_of,
    representation_of,
    source_of,
    with_node_ref,
    with_uri,
)

# Re-exported, dckpt's layers and tests import them from here: the warning of
# dckpt._checkpoint_travel and the developer API of dckpt._sources.
__all__ = ["Checkpoint", "LargeInlineCheckpointWarning", "node_ref_of", "source_of",
           "with_node_ref"]

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
        self._source, self._metadata, state = reading.initial_source(
            local_path, data_dict, uri, storage_options)
        self._preprocessor = _UNSET
        self._uuid = uuid.uuid4()
        self.__dict__.update(state)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_dict(cls: type[C], data: dict[Any, Any]) -> C:
        """Create a checkpoint from a dict. ``data`` is copied (shallowly), not changed."""
        _, reserved = split_reserved(data)
        checkpoint_cls = reading.class_to_load(cls, reserved.get("class"), Checkpoint)
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

        A directory Ray AIR 2.x wrote is read as such (:mod:`dckpt._formats.ray_format`): its
        class from Ray's ``.metadata.pkl``, mapped to dckpt's, or
        :class:`~dckpt.errors.UnsupportedRayClassError` for a class dckpt does not map.
        """
        directory = reading.existing_directory(path)
        saved = reading.saved_in_directory(directory)
        checkpoint = reading.class_to_load(cls, saved.class_path, Checkpoint)(local_path=directory)
        checkpoint._metadata = saved.metadata
        checkpoint.__dict__.update(saved.state())
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
        saved = reading.saved_at_uri(uri, options)
        checkpoint_cls = reading.class_to_load(cls, saved.class_path, Checkpoint)
        checkpoint = checkpoint_cls(uri=uri, storage_options=options)
        checkpoint._metadata = saved.metadata
        checkpoint.__dict__.update(saved.state())
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
        of the class Ray's maps to (see :mod:`dckpt._formats.ray_format`); other pickles are
        refused as before.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"from_bytes() takes bytes, not {type(data).__name__}")
        if not is_packed(data) and ray_format.is_ray_pickle(data):
            # Ray AIR's to_bytes(), recognised from its opcodes before any unpickling.
            return cls.from_dict(ray_format.bytes_to_dict_form(data))
        saved, control, files = reading.saved_in_bytes(data)
        # The class is checked before anything is unpickled, as in from_directory.
        checkpoint_cls = reading.class_to_load(cls, saved.class_path, Checkpoint)
        checkpoint = checkpoint_cls(data_dict=reading.user_dict(control, "the packed data"))
        source = checkpoint._source
        assert isinstance(source, DictData)
        checkpoint._source = dataclasses.replace(source, files=files)
        checkpoint._metadata = saved.metadata
        checkpoint.__dict__.update(saved.state())
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
        fields: dict[str, Any] = {
            "_source": copied(other._source),
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
        user, files = reading.dict_data(self._source, self.as_directory)
        if self._preprocessor is not _UNSET:
            user[PREPROCESSOR_KEY] = self._preprocessor
        return writing.dict_form(
            user, files, class_path=writing.class_path_of(type(self), Checkpoint),
            state=travel.serialized_state(self), metadata=self.get_metadata())

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
        target = writing.target_directory(path)
        directory = self._directory()
        if directory is not None and writing.same_path(directory, target):
            writing.write_overlay(target, self._control_files(target), write_file_atomically)
            return target
        writing.check_apart(directory, target)
        with atomic_directory(target) as staging:
            writing.materialize(staging, self._source, directory, self._control_files, callback)
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
        fill: Callable[[str], object] = self.to_directory
        if isinstance(source, UriFolder):
            name, fill = writing.uri_download(source, self._control_files(None), self.to_directory)
        path = os.path.join(_config.temporary_directory(), f"checkpoint_tmp_{name}")
        with shared_directory(path, fill) as directory:
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
            writing.upload(uri, dict(storage_options or {}), self._directory(),
                           self.as_directory, self._control_files, callback)
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
        return writing.pack(self._source, self.as_directory, self._control_files, callback)

    def get_internal_representation(self) -> tuple[str, Any]:
        """Developer API: ``("local_path", path)``, ``("data_dict", dict)``, ``("uri", uri)``
        or, for a directory on another node not yet used here, ``("node_ref", ref)``.

        A node reference used here reports the directory it was found in, as a
        ``"local_path"``; :func:`source_of` tells the two apart.
        """
        return representation_of(self._source) or ("data_dict", self.to_dict())

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
        return reading.preprocessor_of(self._source, self.as_directory)

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
            self._metadata = reading.source_metadata(self._source, self._directory())
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
        return f"{type(self).__name__}({argument_of(self._source)})"

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
          reference (a few hundred bytes, whatever its size); elsewhere (the driver)
          it travels as its data (a dict checkpoint), as in Ray, up to
          ``dckpt.inline-max-bytes``, and above that as a reference to a copy pushed
          to a worker's store, as a URI under ``dckpt.staging-uri`` or inline with a
          :class:`LargeInlineCheckpointWarning`: see
          :func:`dckpt._checkpoint_travel.travelling_source`.

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
        state["_source"] = travel.travelling_source(source, self, self.to_uri)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Run the class's ``__init__`` as :meth:`from_checkpoint` does, then take ``state``.

        So a subclass's attributes that do not travel (not in ``_SERIALIZED_ATTRS``: a
        lock, a loaded model) are what its ``__init__`` sets, as after Ray's
        ``from_bytes``; those it sets later are absent.
        """
        type(self).__init__(self, **travel.constructor_arguments(state))
        self.__dict__.update(state)

    # ------------------------------------------------------------------ internals

    def _pickled_state(self) -> dict[str, Any]:
        """The checkpoint's own fields (:attr:`_PICKLED_FIELDS`) and its subclass state."""
        state = {name: self.__dict__[name] for name in self._PICKLED_FIELDS
                 if name in self.__dict__}
        state.update(travel.serialized_state(self))
        return state

    @classmethod
    def _built(cls: type[C], state: Mapping[str, Any]) -> C:
        """A checkpoint of this class built through its constructor, then given ``state``."""
        new = cls(**travel.constructor_arguments(state))
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

    def _control_files(self, source: str | None) -> dict[str, bytes | None]:
        """The control files this object's state asks for, by name (see
        :func:`dckpt._checkpoint_writing.control_files`); ``source`` is the directory
        the data comes from (``None`` for a dict checkpoint)."""
        data = self._source
        return writing.control_files(
            source, data if isinstance(data, DictData) else None,
            preprocessor=None if self._preprocessor is _UNSET else dump_pickle(self._preprocessor),
            metadata=self.get_metadata(), class_path=writing.class_path_of(type(self), Checkpoint),
            state=travel.serialized_state(self),
        )
