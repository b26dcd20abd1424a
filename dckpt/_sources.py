"""Where a :class:`~dckpt.Checkpoint`'s data is: one value, four kinds.

A checkpoint holds exactly one :data:`Source`; each kind is a small frozen dataclass,
so "which representation is this" is a ``match`` on one field rather than a question
asked of seven nullable ones. A checkpoint changes source by replacing the value (a
node reference found on this node, a URI it was persisted to), never by editing it.

Every kind knows ``uris``, the URIs it is known to be persisted at, so that a node
reference made from it (when it is pickled on a worker, or staged with
:func:`dckpt.put`) can fall back to them once its node is gone.

Nothing here imports :mod:`distributed` or :mod:`dckpt.cluster`: a
:class:`~dckpt.cluster._core.NodeRef` is held, never built or resolved, in this module.

Also here, as it reads a checkpoint's source: the developer API through which dckpt's
other layers know a checkpoint's source (:func:`source_of`, :func:`node_ref_of`,
:func:`with_node_ref`), and the pieces of ``Checkpoint`` that depend on the source's
kind alone (:func:`copied`, :func:`representation_of`, :func:`argument_of`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from dckpt._checkpoint import Checkpoint
    from dckpt.cluster import NodeRef

__all__ = [
    "DictData", "LocalDirectory", "NodeReference", "Source", "UriFolder", "argument_of",
    "copied", "node_ref_of", "representation_of", "source_of", "with_node_ref", "with_uri",
]

C = TypeVar("C", bound="Checkpoint")
_REPR_MAX = 120


@dataclass(frozen=True, repr=False)
class DictData:
    """An in-memory dict checkpoint.

    ``data`` is the user's dict with the reserved ``"_dckpt"`` key already split off
    (:func:`dckpt._formats.layout.split_reserved`); ``files`` are the files added to
    its directory form, packed (:mod:`dckpt._formats._packing`), or ``None``.
    """

    data: dict[Any, Any]
    files: bytes | None = None
    uris: tuple[str, ...] = ()

    def __repr__(self) -> str:  # bounded whatever the dict holds
        files = "no files" if self.files is None else f"{len(self.files)} bytes of files"
        return f"DictData({{...{len(self.data)} keys}}, {files})"


@dataclass(frozen=True)
class LocalDirectory:
    """A directory on this machine that the checkpoint refers to (and does not own).

    ``path`` is absolute. ``uris``: where this object was persisted with ``to_uri``.
    """

    path: str
    uris: tuple[str, ...] = ()


@dataclass(frozen=True)
class UriFolder:
    """A folder at a URI that fsspec opens (never ``file://``: that is a directory).

    ``storage_options`` go to fsspec and travel with the checkpoint. ``uris``: other
    URIs this object was persisted to with ``to_uri``.
    """

    uri: str
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    uris: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeReference:
    """A directory checkpoint on some node of the cluster, as a :class:`NodeRef`.

    ``path`` is where this process found its data (the origin's directory, a shared
    path, this node's cached copy), or ``None`` until it is first used here. It is a
    path of this node only, so it never travels: a pickled ``NodeReference`` is its
    ``ref`` alone. URIs the checkpoint is persisted to since it was made are merged
    into ``ref.uris`` (:func:`with_uri`), so forwarding the reference carries them.
    """

    ref: NodeRef
    path: str | None = None

    @property
    def uris(self) -> tuple[str, ...]:
        """The URIs the reference can fall back to: ``ref.uris``."""
        return self.ref.uris

    def __reduce__(self) -> tuple[type[NodeReference], tuple[NodeRef]]:
        return NodeReference, (self.ref,)


#: The one field that says where a checkpoint's data is.
Source = DictData | LocalDirectory | UriFolder | NodeReference


def with_uri(source: Source, uri: str) -> Source:
    """``source`` known to be persisted at ``uri`` too (once, in the order persisted)."""
    if isinstance(source, NodeReference):
        ref = dataclasses.replace(source.ref, uris=_added(source.ref.uris, uri))
        return dataclasses.replace(source, ref=ref)
    return dataclasses.replace(source, uris=_added(source.uris, uri))


def copied(source: Source) -> Source:
    """``source`` sharing no mutable part with it (a dict's dict, a URI's options), for
    a checkpoint converted to another class (``Checkpoint.from_checkpoint``)."""
    if isinstance(source, DictData):
        return dataclasses.replace(source, data=dict(source.data))
    if isinstance(source, UriFolder):
        return dataclasses.replace(source, storage_options=dict(source.storage_options))
    return source


def representation_of(source: Source) -> tuple[str, Any] | None:
    """``Checkpoint.get_internal_representation()`` of ``source``: ``("node_ref",
    ref)`` before its first use here, ``("local_path", path)``, ``("uri", uri)``;
    ``None`` for a dict, whose representation is its dict form."""
    match source:
        case NodeReference(ref=ref, path=None):
            return "node_ref", ref
        case LocalDirectory(path=path) | NodeReference(path=str(path)):
            return "local_path", path
        case UriFolder(uri=uri):
            return "uri", uri
    return None


def argument_of(source: Source) -> str:
    """The argument naming ``source`` in a checkpoint's ``repr``: short and bounded."""
    match source:
        case NodeReference(ref=ref, path=None):
            return f"node_ref={ref!r}"
        case LocalDirectory(path=path) | NodeReference(path=str(path)):
            return f"local_path={_shorten(path)}"
        case DictData(data=data):
            return f"data_dict={{...{len(data)} keys}}"
        case UriFolder(uri=uri):
            return f"uri={_shorten(uri)}"
    raise AssertionError(f"unknown source {source!r}")


def _added(uris: tuple[str, ...], uri: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*uris, uri)))


def _shorten(text: str) -> str:
    return text if len(text) <= _REPR_MAX else f"{text[:_REPR_MAX // 2]}...{text[-_REPR_MAX // 2:]}"


# ------------------------------------------------ developer API for dckpt's layers
#
# What dckpt's other packages (dckpt.cluster, dckpt.train, ...) may know of a
# checkpoint beyond its public methods; none of them touches its private attributes.
# Re-exported by dckpt._checkpoint, where they are imported from.


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

