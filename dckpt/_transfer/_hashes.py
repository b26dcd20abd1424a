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

The memo lives in the process (a dict bounded at :data:`MEMO_ENTRIES` files, least
recently used dropped first), not on disk: a memo on disk would have to be trusted across
processes and restarts, where a restored file or a clock set back could fake a key; a
restarted worker rehashes what it serves, once (what it costs, below).

Cost, measured on this project's machine (2 shared cores; 1 GiB of random bytes)::

    python -c "import os,time,xxhash; b=os.urandom(1<<30); t=time.perf_counter();
               xxhash.xxh3_128(b).hexdigest(); print(time.perf_counter()-t)"

xxh3-128 takes 0.057 s per GiB in memory; :func:`hash_file` of a 1 GiB file in the
page cache, reads included, 0.12 s per GiB. A file read from disk costs what the disk
takes to read it. The first pickling of a 10 GiB checkpoint on a worker thus spends
about a second hashing it (plus the reads); every later one, none.
"""

from __future__ import annotations

import collections
import os
import stat
import threading
import time

import xxhash

__all__ = [
    "HASH_HEX_LENGTH", "MEMO_ENTRIES", "SETTLE_NS", "file_hash", "hash_file", "hash_file_now",
    "remember",
]

#: Files remembered; an entry is ~200 bytes, so the memo stays below ~20 MB.
MEMO_ENTRIES = 100_000
#: Hex digits of an xxh3-128 hash.
HASH_HEX_LENGTH = 32

#: How long after its last change a file's hash may be remembered: several of the
#: coarse clock's ticks that stamp ctime (1-10 ms); two seconds on a filesystem that
#: keeps whole seconds (a ctime with no nanoseconds).
SETTLE_NS = 50_000_000
_SETTLE_WHOLE_SECONDS_NS = 2_000_000_000

_BLOCK = 4 << 20  # read size: large enough that a call per block costs nothing

_Key = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_ctime_ns

_now_ns = time.time_ns  # the clock ctime is compared with (a test moves it on)
_memo: collections.OrderedDict[_Key, str] = collections.OrderedDict()
_lock = threading.Lock()


def _key(st: os.stat_result) -> _Key:
    return st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns


def hash_file(path: str) -> str:
    """The xxh3-128 hash (hex) of the bytes of ``path``, read now, never remembered."""
    hasher = xxhash.xxh3_128()
    buffer = bytearray(_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            read = f.readinto(buffer)
            if not read:
                break
            hasher.update(view[:read])
    return hasher.hexdigest()


def hash_file_now(path: str) -> str:
    """The xxh3-128 hash (hex) of the bytes of ``path``, read now whatever is remembered,
    then remembered unless the file changed during the read."""
    key = _key(os.stat(path))
    digest = hash_file(path)
    if _key(os.stat(path)) == key:
        _remember_key(key, digest)
    return digest


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
            return known
    digest = hash_file(path)
    if _key(os.stat(path)) == key:
        _remember_key(key, digest)
    return digest


def remember(path: str, digest: str) -> None:
    """Record that ``path``, as it is now, hashes to ``digest`` (checked by the caller)."""
    _remember_key(_key(os.stat(path)), digest)


def _settled(ctime_ns: int, now_ns: int) -> bool:
    """Whether a file last changed at ``ctime_ns`` can no longer share its key with a
    file written from ``now_ns`` on (see the module)."""
    settle = _SETTLE_WHOLE_SECONDS_NS if ctime_ns % 1_000_000_000 == 0 else SETTLE_NS
    return now_ns - ctime_ns >= settle


def _remember_key(key: _Key, digest: str) -> None:
    if not _settled(key[3], _now_ns()):
        return  # racily fresh: hashed again next time
    with _lock:
        _memo[key] = digest
        _memo.move_to_end(key)
        while len(_memo) > MEMO_ENTRIES:
            _memo.popitem(last=False)
