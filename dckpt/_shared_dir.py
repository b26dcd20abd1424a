"""A temporary directory shared by every process of one machine that uses it.

``Checkpoint.as_directory()`` materializes a checkpoint without a directory of its own
at a path derived from the checkpoint's id (for a URI checkpoint: :func:`shared_name`
of its URI, committed version and in-memory additions), so that the copies of one
checkpoint that several processes hold share one directory. Each user leaves
a marker file while inside the ``with`` block; the last one out removes the directory.
Markers of processes that died are ignored, so a crash leaks nothing for long.

Layout beside the directory ``D``: ``D.lock`` (an ``flock``-ed file serializing
set-up and tear-down) and ``D.users/`` (one marker per user, ``{pid}.{token}``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

from dckpt._locks import flocked, marker_is_alive, new_marker_name

logger = logging.getLogger(__name__)


def shared_name(*parts: Any) -> str:
    """A name for the directory of what ``parts`` identify, the same in every process.

    ``parts`` are JSON-like values (bytes too); dict keys are sorted, so equal options
    built in another order give the same name. Values JSON cannot hold count by their
    ``repr``. A hash: credentials among the parts do not show in the name.
    """
    def default(value: Any) -> Any:
        return value.hex() if isinstance(value, bytes) else repr(value)

    text = json.dumps(parts, sort_keys=True, default=default)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextlib.contextmanager
def shared_directory(path: str, materialize: Callable[[str], object]) -> Iterator[str]:
    """Yield ``path``, calling ``materialize(path)`` first if it does not exist yet.

    ``materialize`` must create ``path`` atomically (build a sibling and rename it), so
    that other processes never see it half-written. It runs under the lock, so one
    process materializes while the others wait for it.
    """
    marker = os.path.join(f"{path}.users", new_marker_name())
    with flocked(f"{path}.lock"):
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "x").close()
        try:
            if not os.path.isdir(path):
                materialize(path)
        except BaseException:
            _leave(path, marker)
            raise
    try:
        yield path
    finally:
        with flocked(f"{path}.lock"):
            _leave(path, marker)


def _leave(path: str, marker: str) -> None:
    """Drop our marker; remove everything when no live user is left. Lock held."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(marker)
    users_dir = os.path.dirname(marker)
    live = [name for name in _list(users_dir) if marker_is_alive(name)]
    if live:
        return
    logger.debug("removing shared checkpoint directory %s: no users left", path)
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(users_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{path}.lock")


def _list(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except FileNotFoundError:
        return []
