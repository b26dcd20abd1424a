"""How a directory checkpoint travels when it is pickled, and how a copy is rebuilt.

:meth:`Checkpoint.__getstate__ <dckpt._checkpoint.Checkpoint.__getstate__>` says what
travels for each source; for a directory of this machine the choice is
:func:`travelling_source`'s: a node reference on a Dask worker with a node store
(:func:`dckpt.cluster._resolve.make_ref`: the store registers the directory and serves
it to the nodes that use it), else the data inline up to ``dckpt.inline-max-bytes``,
else, with a (synchronous) default Dask client, a copy pushed to one worker's store
(:func:`dckpt.cluster._push.push_for_pickling`), else an upload to
``dckpt.staging-uri``, else inline with a :class:`LargeInlineCheckpointWarning`.
:func:`constructor_arguments` gives the arguments a copy is built with, as Ray builds
one, and :func:`serialized_state` the subclass state that travels with it. The cluster
is imported at call time: it imports distributed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import dask.config
from dask.utils import parse_bytes

from dckpt._checkpoint_reading import read_directory_as_dict
from dckpt._sources import DictData, LocalDirectory, NodeReference, Source, UriFolder

if TYPE_CHECKING:
    from dckpt._checkpoint import Checkpoint

__all__ = [
    "LargeInlineCheckpointWarning", "constructor_arguments", "serialized_state",
    "travelling_source",
]


class LargeInlineCheckpointWarning(UserWarning):
    """A large directory checkpoint was pickled with all of its data."""


def travelling_source(
    source: LocalDirectory, checkpoint: object, upload: Callable[[str], str]
) -> Source:
    """What a directory ``source`` of this machine travels as, pickled here.

    ``checkpoint`` names it in the warning; ``upload(uri)`` uploads it to ``uri`` and
    returns the URI (``Checkpoint.to_uri``).
    """
    from dckpt.cluster._resolve import make_ref  # imports distributed: only now

    ref = make_ref(source.path, uris=source.uris)
    if ref is not None:
        return NodeReference(ref)
    size = _directory_size(source.path)
    if size > parse_bytes(dask.config.get("dckpt.inline-max-bytes")):
        from dckpt.cluster._push import push_for_pickling

        ref = push_for_pickling(source.path, source.uris)
        if ref is not None:
            return NodeReference(ref)
        staging = dask.config.get("dckpt.staging-uri", None)
        if staging:
            uri = upload(f"{staging.rstrip('/')}/{uuid.uuid4().hex}")
            return UriFolder(uri, uris=source.uris)
        warnings.warn(
            f"pickling {checkpoint!r} inline: {size} bytes is above dckpt.inline-max-bytes "
            "and no dckpt.staging-uri is set, so all of it travels with the object",
            LargeInlineCheckpointWarning,
            stacklevel=3,  # the caller of Checkpoint.__getstate__
        )
    user, files = read_directory_as_dict(source.path)
    return DictData(user, files, uris=source.uris)


def serialized_state(checkpoint: Checkpoint) -> dict[str, Any]:
    """The values of ``checkpoint``'s ``_SERIALIZED_ATTRS`` it has: they travel with
    its data, in every representation."""
    return {
        attr: getattr(checkpoint, attr)
        for attr in checkpoint._SERIALIZED_ATTRS
        if hasattr(checkpoint, attr)
    }


def constructor_arguments(state: Mapping[str, Any]) -> dict[str, Any]:
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
