"""Shared filesystems found, not only configured: is the path of a reference the very
directory its origin registered, seen through a disk both nodes share?

Step 2 of resolution (:meth:`dckpt.cluster._store.NodeStore.materialize`) used a
reference's path in place only under ``dckpt.shared-paths``. Now a reader also uses it
in place when it sees, at that path, the *same files* the origin saw — the same NFS
export mounted on both nodes,
a host folder bind-mounted into two containers, any folder of the one machine a
non-isolated :class:`~dckpt.cluster.NodeCluster` runs on — and never when a folder of the
same name holds something else.

How "the same files" is decided
-------------------------------
Where the reference is made, :func:`fingerprint` walks the directory with ``lstat`` only
(no byte is read) and digests, per entry in a fixed order: relative path, type and mode,
size (files and links), ``mtime_ns``, ``ctime_ns``, inode number and link target. The
reference carries the digest and the count of entries, not the list, so it stays a few
hundred bytes whatever the number of files; the reader recomputes the same digest over
its own path (:func:`same_files`) and stops walking after one entry too many.

Inode numbers, ``mtime`` and ``ctime`` are what a shared filesystem shows alike on every
client (an NFS client shows the server's file ids and times) and what two independent
disks almost never do; ``ctime`` cannot be set by any tool (``touch``, ``cp -p`` and
``rsync`` set ``mtime``), so no write leaves it unchanged. Even so, a match of the
digest alone is not trusted, because fresh file systems hand out inode numbers
deterministically and kernel timestamps tick in milliseconds: two nodes writing the
same-sized files to fresh ``/tmp`` folders within one tick could collide. So the
reference also carries which filesystem the path lies on, and the digest is compared only
when the reader's filesystem is provably the origin's:

- the same kernel (``/proc/sys/kernel/random/boot_id``, one per boot of a machine, shared
  by its containers and mount namespaces) and the same device number: one disk, seen
  through bind mounts or directly; inode numbers then name files unambiguously;
- or, across machines, a filesystem type in ``dckpt.shared-filesystem-types`` (network
  and cluster filesystems: NFS, SMB, CephFS, Lustre, GPFS, GlusterFS) with the same
  mount source (``server:/export``) and the same path inside that filesystem.

Anything else is *unsure* and the reader copies: a local disk type (ext4, xfs, tmpfs,
overlay, ...) seen from another machine can only be another disk; a FUSE filesystem names
any source as it likes. No content hashes: a hash of the reader's side costs reading every
byte, as a copy does, and a wrong "same" would read another checkpoint's data; on every
doubt, the answer is "copy", whose transfer is integrity-checked. Filesystems that number
inodes per client (sshfs, gcsfuse) never match and are copied from too.

Only Linux (``/proc/self/mountinfo``) is covered; elsewhere :func:`fingerprint` returns
``None`` and nothing is found. ``dckpt.find-shared-paths: false`` turns finding off.

What the reader remembers
-------------------------
A match is remembered per process by (origin node id, mount point of the path here),
with the filesystem it was found on (:func:`remembered`), and logged once at INFO, so
that a user sees which prefixes were found shared with which node. The memo decides
nothing: every reference is checked in full, because the filesystem check costs one
read of the mount table (microseconds), and the walk, one ``lstat`` per entry, is what
tells *this* directory from another one under the same prefix — a prefix remembered as
shared is never used for a directory whose fingerprint differs, and a memo of mounts
could go stale under a remount. A directory used in place is not copied, so there is
nothing to pin: as with ``dckpt.shared-paths``, it stays the origin's own directory,
there as long as the origin keeps it.

This module runs in task threads (a stat walk), never on the event loop.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import threading
from dataclasses import dataclass

import dask.config

logger = logging.getLogger(__name__)

__all__ = ["Fingerprint", "fingerprint", "remembered", "same_files"]

FIND_SETTING = "dckpt.find-shared-paths"
TYPES_SETTING = "dckpt.shared-filesystem-types"

_MOUNTINFO = "/proc/self/mountinfo"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


@dataclass(frozen=True)
class Fingerprint:
    """A directory's entries as ``lstat`` shows them, and the filesystem it lies on.

    Attributes
    ----------
    entries
        How many entries the directory holds, itself included.
    digest
        Digest of each entry's relative path, type and mode, size, ``mtime_ns``,
        ``ctime_ns``, inode number and link target (:func:`fingerprint`).
    device
        ``"<boot id> <major>:<minor>"``: the disk, as the kernel that made the
        fingerprint names it.
    export
        ``"<fs type> <mount source> <path inside that filesystem>"``: the same
        directory as a network filesystem names it on every client.
    """

    entries: int
    digest: str
    device: str
    export: str

    def __repr__(self) -> str:
        return f"Fingerprint({self.entries} entries, {self.digest[:12]}, {self.export[:60]})"


@dataclass(frozen=True)
class _Mount:
    point: str
    root: str
    device: str  # major:minor
    fstype: str
    source: str


def fingerprint(path: str) -> Fingerprint | None:
    """The fingerprint of directory ``path`` (an absolute, resolved path).

    ``None`` when finding shared paths is off (``dckpt.find-shared-paths``) or the
    filesystem of ``path`` cannot be told (not Linux). Costs one ``lstat`` per entry.
    """
    if not dask.config.get(FIND_SETTING, True):
        return None
    try:
        mount = _mount_of(path)
        if mount is None:
            return None
        entries, digest = _walk(path, limit=None)
    except OSError as e:
        logger.debug("No fingerprint of %s: %s", path, e)
        return None
    return Fingerprint(entries, digest, _device(mount), _export(mount, path))


def same_files(path: str, expected: Fingerprint | None, origin: str) -> tuple[bool, str]:
    """Whether ``path`` here is the directory that node ``origin`` fingerprinted.

    Returns
    -------
    (bool, str)
        True and ``""`` only when this process sees ``path`` on the origin's very
        filesystem (see the module docstring) and with the same fingerprint; else False
        and why not, in a few words, for the message of an unavailable checkpoint.
        False when ``expected`` is None (a reference made without a fingerprint).
    """
    if not dask.config.get(FIND_SETTING, True):
        return False, f"finding shared paths is off ({FIND_SETTING})"
    if expected is None:
        return False, "the reference carries no fingerprint"
    try:
        real = os.path.realpath(path)
        if not stat.S_ISDIR(os.lstat(real).st_mode):
            return False, f"{path} is not a directory here"
        mount = _mount_of(real)
        if mount is None:
            return False, f"no mount of {path} in {_MOUNTINFO}"
        found_on = _same_filesystem(expected, mount, real)
        if found_on is None:
            return False, (f"{path} is on {mount.fstype} {mount.source} here, not on the "
                           "filesystem of the origin")
        seen = _walk(real, limit=expected.entries)
    except FileNotFoundError:
        return False, f"{path} does not exist here"
    except OSError as e:
        return False, f"{path} cannot be compared here ({e})"
    if seen != (expected.entries, expected.digest):
        return False, f"{path} here holds other files than on node {origin}"
    key = (origin, mount.point)
    with _lock:
        new = _remembered.get(key) != found_on
        _remembered[key] = found_on
    if new:
        logger.info("%s is shared with node %s (%s %s): its checkpoints under it are used "
                    "in place when their files match", mount.point, origin, mount.fstype,
                    mount.source)
    return True, ""


def remembered() -> dict[tuple[str, str], str]:
    """What this process has found shared: (origin node id, mount point here) → the
    filesystem it was found on (a ``device`` or ``export`` of :class:`Fingerprint`)."""
    with _lock:
        return dict(_remembered)


_lock = threading.Lock()
_remembered: dict[tuple[str, str], str] = {}


def _same_filesystem(expected: Fingerprint, mount: _Mount, real: str) -> str | None:
    """The identity under which ``real`` here is on the origin's filesystem, else None."""
    if expected.device == _device(mount):
        return expected.device
    types = dask.config.get(TYPES_SETTING, None) or []
    if mount.fstype in types and expected.export == _export(mount, real):
        return expected.export
    return None


def _device(mount: _Mount) -> str:
    return f"{_boot_id()} {mount.device}"


def _export(mount: _Mount, real: str) -> str:
    inside = os.path.relpath(real, mount.point)
    where = os.path.normpath(os.path.join(mount.root, inside))
    return f"{mount.fstype} {mount.source} {where}"


@functools.cache
def _boot_id() -> str:
    try:
        with open(_BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        # No boot id: nothing can prove the same kernel, so match no other process.
        return f"unknown-{os.getpid()}-{id(_lock)}"


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes (\040 ...).
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(
        errors="surrogateescape")


def _mount_of(real: str) -> _Mount | None:
    """The mount that ``real`` lies on in this process's mount namespace.

    The mount with the longest mount point above ``real`` among those of the device
    that ``stat`` shows for it, so that a mount hidden under a later one is not taken
    for it. None when there is no mount table or no such mount (a btrfs subvolume
    below the mounted one has a device number of its own): nothing is then found.
    """
    try:
        st_dev = os.stat(real).st_dev
        with open(_MOUNTINFO) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    device = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    best: _Mount | None = None
    for line in lines:
        # id parent major:minor root point options [optional...] - fstype source super
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2 or fields[2] != device:
            continue
        point = _unescape(fields[4])
        if not (real == point or real.startswith(point.rstrip("/") + "/")):
            continue
        # The longest mount point wins; of stacked mounts on one point, the last.
        if best is None or len(point) >= len(best.point):
            best = _Mount(point, _unescape(fields[3]), fields[2], tail[0], _unescape(tail[1]))
    return best


def _walk(root: str, limit: int | None) -> tuple[int, str]:
    """(number of entries, digest) of the tree at ``root``; stops after ``limit`` + 1."""
    h = hashlib.blake2b(digest_size=16)
    count = 0
    pending = [("", root)]
    while pending:
        relative, path = pending.pop()
        st = os.lstat(path)
        count += 1
        if limit is not None and count > limit:
            break
        link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
        size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size  # a folder's size is the fs's
        h.update(f"{relative}\0{st.st_mode:o}\0{size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0"
                 f"{st.st_ino}\0{link}\n".encode(errors="surrogateescape"))
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(path), reverse=True)  # popped in sorted order
            pending.extend((f"{relative}/{name}", os.path.join(path, name)) for name in names)
    return count, h.hexdigest()
