"""Content hashes of files, computed once per file version and remembered in memory.

A checkpoint's identity is built from the hash of each of its files
(:func:`~dckpt._transfer.build_manifest`). :func:`file_hash` reads a file once and
remembers the hash by ``(device, inode, size, ctime)``: every write to a file, a
``chmod``, a ``truncate``, even a rename, sets its ctime, and nothing a process can do
sets it back, so an unchanged key means unchanged bytes. Pickling the same directory
again, serving it again, or building the manifest of a copy received a while ago (whose
hashes were checked as it was written) then reads nothing.

A key is remembered only once the file has *settled*: its ctime at least
:data:`SETTLE_NS` in the past (two seconds where the filesystem keeps whole seconds).
Filesystems stamp ctime from a clock that moves in ticks (a few milliseconds, or a
second), so a file deleted and another one of the same size written in the same tick
may get the same inode and ctime, hence the same key, with other bytes (ext4 reuses a
freed inode at once; Linux stamps ctime from a coarse clock before 6.13 — this
project's machine runs 6.18, so its tests simulate such a clock). A file older than
the tick cannot share its key with any file written later.
The price: a file hashed within :data:`SETTLE_NS` of its last change is read again
next time (git calls such files "racily clean" and does the same).

With a file's hash, the xxh3_64 of each of its chunks of ``dckpt.transfer.chunk-bytes``
is remembered when the file is read for it, and when a transfer writes it (the
checksums it checked the chunks against): :func:`chunk_checksums`. They are what a
sender puts in the headers of the chunks it sends straight from the file, which it
would otherwise read once more for every transfer (0.15 s of the sender's CPU per GiB;
computed with the hash, from the same blocks in cache, they cost 0.06 s once).

The memo lives in the process (a dict bounded at :data:`MEMO_ENTRIES` files, least
recently used dropped first), not on disk: a memo on disk would have to be trusted across
processes and restarts, where a restored file or a clock set back could fake a key; a
restarted worker rehashes what it serves, once (what it costs, below).

Cost, measured on this project's machine (2 shared cores; 1 GiB of random bytes)::

    python -c "import os,time,xxhash; b=os.urandom(1<<30); t=time.perf_counter();
               xxhash.xxh3_128(b).hexdigest(); print(time.perf_counter()-t)"

xxh3-128 takes 0.057 s per GiB in memory; :func:`hash_file` of a 1 GiB file in the
page cache, reads included, 0.12-0.18 s per GiB. A file read from disk costs what the
disk takes to read it. The first pickling of a 10 GiB checkpoint on a worker thus spends
about a second hashing it (plus the reads); every later one, none.
"""

from __future__ import annotations

import collections
import os
import stat
import threading
import time
from typing import NamedTuple

import xxhash

from dckpt._transfer._settings import config_chunk_bytes

__all__ = [
    "HASH_HEX_LENGTH", "MEMO_ENTRIES", "SETTLE_NS", "chunk_checksums", "file_hash",
    "hash_file", "hash_file_and_chunks", "hash_file_now", "remember",
]

#: Files remembered; an entry is ~200 bytes, so the memo stays below ~20 MB (plus
#: ~40 bytes per chunk of the files' chunk checksums: 5 MB for 1 TB in 8 MiB chunks).
MEMO_ENTRIES = 100_000
#: Hex digits of an xxh3-128 hash.
HASH_HEX_LENGTH = 32

#: How long after its last change a file's hash may be remembered: several of the
#: coarse clock's ticks that stamp ctime (1-10 ms); two seconds on a filesystem that
#: keeps whole seconds (a ctime with no nanoseconds).
SETTLE_NS = 50_000_000
_SETTLE_WHOLE_SECONDS_NS = 2_000_000_000

# Read size: large enough that a call per block costs nothing, small enough to stay in
# a core's cache (1 MiB of L2 here) for the chunk checksums' pass over it (0.06 s per
# GiB extra against 0.09-0.11 s with 4 MiB blocks; the hash alone was no slower).
_BLOCK = 1 << 20

_Key = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_ctime_ns


class _Known(NamedTuple):
    digest: str
    chunk_bytes: int  # 0: no chunk checksums
    checksums: tuple[int, ...] = ()


_now_ns = time.time_ns  # the clock ctime is compared with (a test moves it on)
_memo: collections.OrderedDict[_Key, _Known] = collections.OrderedDict()
_lock = threading.Lock()


def _key(st: os.stat_result) -> _Key:
    return st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns


def hash_file(path: str) -> str:
    """The xxh3-128 hash (hex) of the bytes of ``path``, read now, never remembered."""
    return _read_hashes(path, None)[0]


def hash_file_and_chunks(path: str, chunk_bytes: int) -> tuple[str, tuple[int, ...]]:
    """:func:`hash_file`, and the xxh3_64 of each chunk of ``chunk_bytes`` of it (the
    checksum of a chunk frame), from one read; never remembered."""
    return _read_hashes(path, chunk_bytes)


def _read_hashes(path: str, chunk_bytes: int | None) -> tuple[str, tuple[int, ...]]:
    hasher = xxhash.xxh3_128()
    checksums: list[int] = []
    chunk = xxhash.xxh3_64()
    filled = 0  # bytes of the current chunk hashed so far
    with open(path, "rb", buffering=0) as f:
        # No larger than the file: where MALLOC_TRIM_THRESHOLD_ is set (a nanny sets
        # it), glibc maps every block over 128 KiB anew and the pages fault in: 0.74 ms
        # per 4 KiB file with a 1 MiB buffer, 12 us with one of its size (measured here).
        buffer = bytearray(max(1, min(_BLOCK, os.fstat(f.fileno()).st_size)))
        view = memoryview(buffer)
        while True:
            read = f.readinto(buffer)
            if not read:
                break
            hasher.update(view[:read])
            start = 0
            while chunk_bytes is not None and start < read:
                take = min(read - start, chunk_bytes - filled)
                chunk.update(view[start : start + take])  # still in cache
                filled += take
                start += take
                if filled == chunk_bytes:
                    checksums.append(chunk.intdigest())
                    chunk.reset()
                    filled = 0
    if filled:
        checksums.append(chunk.intdigest())
    return hasher.hexdigest(), tuple(checksums)


def hash_file_now(path: str) -> str:
    """The xxh3-128 hash (hex) of the bytes of ``path``, read now whatever is remembered,
    then remembered unless the file changed during the read."""
    return _hash_and_remember(path, _key(os.stat(path)))


def file_hash(path: str, st: os.stat_result | None = None) -> str:
    """The xxh3-128 hash (hex) of the regular file ``path``, remembered by version.

    ``st`` is the file's ``os.stat`` if the caller has it. A file that changes while
    it is read (its key differs after the read) is hashed, but not remembered.
    """
    st = os.stat(path) if st is None else st
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path!r} is not a regular file")
    key = _key(st)
    with _lock:
        known = _memo.get(key)
        if known is not None:
            _memo.move_to_end(key)
            return known.digest
    return _hash_and_remember(path, key)


def _hash_and_remember(path: str, key: _Key) -> str:
    """Hash ``path`` (whose key was ``key`` before the read) with its chunk checksums at
    ``dckpt.transfer.chunk-bytes``; remember both unless the file changed meanwhile."""
    chunk_bytes = config_chunk_bytes()
    digest, checksums = hash_file_and_chunks(path, chunk_bytes)
    if _key(os.stat(path)) == key:
        _remember_key(key, _Known(digest, chunk_bytes, checksums))
    return digest


def chunk_checksums(st: os.stat_result, chunk_bytes: int) -> tuple[int, ...] | None:
    """The xxh3_64 of each chunk of ``chunk_bytes`` of the file whose ``os.stat`` (or
    ``os.fstat``) is ``st``, as remembered with its hash; None when the file was not
    read for its hash in this version, or at another chunk size."""
    with _lock:
        known = _memo.get(_key(st))
    if known is None or known.chunk_bytes != chunk_bytes:
        return None
    return known.checksums


def remember(
    path: str, digest: str, chunks: tuple[int, tuple[int, ...]] | None = None
) -> None:
    """Record that ``path``, as it is now, hashes to ``digest`` (checked by the caller),
    and, with ``chunks`` (``(chunk_bytes, checksums)``), that its chunks of that size
    have those checksums (:func:`chunk_checksums`; checked by the caller too)."""
    chunk_bytes, checksums = chunks if chunks is not None else (0, ())
    _remember_key(_key(os.stat(path)), _Known(digest, chunk_bytes, checksums))


def _settled(ctime_ns: int, now_ns: int) -> bool:
    """Whether a file last changed at ``ctime_ns`` can no longer share its key with a
    file written from ``now_ns`` on (see the module)."""
    settle = _SETTLE_WHOLE_SECONDS_NS if ctime_ns % 1_000_000_000 == 0 else SETTLE_NS
    return now_ns - ctime_ns >= settle


def _remember_key(key: _Key, known: _Known) -> None:
    if not _settled(key[3], _now_ns()):
        return  # racily fresh: hashed again next time
    with _lock:
        _memo[key] = known
        _memo.move_to_end(key)
        while len(_memo) > MEMO_ENTRIES:
            _memo.popitem(last=False)
