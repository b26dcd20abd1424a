"""Put a directory in place all at once: build it in a sibling, then rename.

The sibling lives next to the target (never in the system temporary directory), so the
final step is a rename within one filesystem, not a copy.

A writer killed midway (``SIGKILL``, a lost node) cannot remove its sibling, which
may be as large as the checkpoint. So the siblings a write makes name their writer,
``.{name}.{host}.{pid}.{token}.partial`` (and ``.old`` for a replaced directory on
its way out), and every write to a target first removes the siblings of that target
whose writer is gone: same host name, and a process id that no longer runs
(:func:`dckpt._locks.is_alive`). Siblings of another host — a folder shared between
machines — and of live processes are never touched, nor are those that name no
writer. Process ids are those of the host's pid namespace: processes that share a
folder and a host name must share one (as :mod:`dckpt._locks` assumes).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from typing import IO, Any

from dckpt._locks import is_alive

logger = logging.getLogger(__name__)

# The tags of the siblings a write leaves when killed: the one being built, and the
# old directory being removed after a replace.
_PARTIAL_TAG = "partial"
_OLD_TAG = "old"
_WRITER_TAGS = frozenset({_PARTIAL_TAG, _OLD_TAG})
_NOT_IN_HOST = re.compile(r"[^A-Za-z0-9-]")
_NAME_MAX = 255  # bytes in one path component on every filesystem we write to
# What a writer sibling adds to the target's name besides the host: dots, the pid
# (at most 10 digits), the token and the longest tag.
_SIBLING_OVERHEAD = 4 + 10 + 12 + max(len(tag) for tag in _WRITER_TAGS) + 1


def partial_sibling(target: str, tag: str = "partial") -> str:
    """A fresh hidden name beside ``target``: ``.{name}.{uuid}.{tag}``."""
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.{tag}")


def writer_sibling(target: str, tag: str = _PARTIAL_TAG) -> str:
    """A fresh hidden name beside ``target`` that names this process and host.

    ``.{name}.{host}.{pid}.{token}.{tag}``, where ``host`` is the host name with
    every character but letters, digits and ``-`` replaced by ``-``. A ``name`` too
    long to leave room is shortened, with a hash of the whole name.
    """
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(
        parent, f"{_sibling_prefix(name)}{_host()}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{tag}"
    )


def remove_stale_siblings(target: str) -> None:
    """Remove the siblings of ``target`` left by writers of this host that are gone.

    Those of :func:`writer_sibling`, tagged ``partial`` or ``old``: directories and
    files alike. Errors are logged, never raised: a leftover costs disk space only.
    """
    parent, name = os.path.split(os.path.abspath(target))
    prefix, host = _sibling_prefix(name), _host()
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        parts = entry[len(prefix):].split(".")
        if len(parts) != 4 or parts[3] not in _WRITER_TAGS:
            continue  # another target's sibling (its name goes on with dots), or not ours
        sibling_host, pid, _, _ = parts
        if sibling_host != host or not pid.isdigit() or is_alive(int(pid)):
            continue
        path = os.path.join(parent, entry)
        logger.info("removing %s, left by process %s of this host, which is gone", path, pid)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass  # another writer of the same target removed it first
        except OSError as e:
            logger.warning("could not remove the leftover %s: %s", path, e)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", *,
                fsync: bool = False) -> Iterator[IO[Any]]:
    """Yield a file open for writing; on success it replaces ``path`` by a rename.

    ``path`` holds its old content or the whole new one, never a part. The file is a
    sibling naming this process (:func:`writer_sibling`); those of earlier writers of
    ``path`` that were killed are removed first. If the block raises, the sibling is
    removed and ``path`` is left as it was. ``fsync`` flushes the data to the disk
    before the rename (for state that must survive a crash of the machine).
    """
    path = os.path.abspath(os.fspath(path))
    remove_stale_siblings(path)
    staging = writer_sibling(path)
    try:
        with open(staging, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise


def write_file_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename
    (:func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[str]:
    """Yield an empty directory to fill; on success it replaces ``target``.

    If ``target`` exists, its old contents are replaced as a whole: the old directory is
    renamed aside, the new one renamed in, and the old one removed. If the block raises,
    the partial directory is removed and ``target`` is left as it was. Siblings left
    by earlier writers of ``target`` that were killed are removed first
    (:func:`remove_stale_siblings`).
    """
    target = os.path.abspath(os.fspath(target))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    remove_stale_siblings(target)
    staging = writer_sibling(target)
    os.mkdir(staging)
    try:
        yield staging
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_directory(new: str, target: str) -> None:
    try:
        # rename(2) replaces a missing target or an empty directory in one step.
        os.replace(new, target)
        return
    except OSError as e:
        if not os.path.lexists(target) or e.errno not in _NOT_EMPTY_ERRNOS:
            raise
    old = writer_sibling(target, _OLD_TAG)
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _host() -> str:
    # Read each time: a process may move into a namespace with a host name of its own.
    return _NOT_IN_HOST.sub("-", socket.gethostname()) or "unknown"


def _sibling_prefix(name: str) -> str:
    """``.{name}.``, with ``name`` shortened (and hashed) if a sibling would be too long."""
    room = _NAME_MAX - _SIBLING_OVERHEAD - len(_host())
    raw = os.fsencode(name)
    if len(raw) <= room:
        return f".{name}."
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return f".{os.fsdecode(raw[: room - 17])}~{digest}."


# What rename(2) says when the target is a directory that is not empty.
_NOT_EMPTY_ERRNOS = {errno.ENOTEMPTY, errno.EEXIST}
