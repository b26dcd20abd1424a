"""NodeCache: identical files shared between entries (hard links) count once in the
budget, whichever entry goes; share() offers them and reserves only the new bytes.
Pure: real files in tmp_path, no cluster."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from dckpt._transfer import build_manifest
from dckpt.cluster._cache import INDEX_NAME, CheckpointId, NodeCache
from dckpt.errors import CacheFullError

KiB = 1 << 10
FROZEN = 90 * KiB
HEAD = 10 * KiB


def cid(name: str) -> CheckpointId:
    return CheckpointId(name)


def model(directory: Path, seed: int) -> Path:
    """A checkpoint of a frozen file (the same bytes for every seed) and a head."""
    directory.mkdir(parents=True)
    (directory / "frozen.bin").write_bytes(random.Random(0).randbytes(FROZEN))
    (directory / "head.bin").write_bytes(random.Random(seed).randbytes(HEAD))
    return directory


def add_copy(cache: NodeCache, name: str, src: Path, link_from: str | None = None) -> str:
    """Stage ``src`` as a transfer would (frozen.bin hard-linked from the cached
    directory ``link_from`` when given) and add it; the entry's path."""
    staging = Path(cache.staging_directory(cid(name)))
    for item in src.iterdir():
        if link_from is not None and item.name == "frozen.bin":
            os.link(os.path.join(link_from, "frozen.bin"), staging / item.name)
        else:
            shutil.copyfile(item, staging / item.name)
    return cache.add(cid(name), build_manifest(src).digest, str(staging), FROZEN + HEAD)


def read_all(directory: str) -> dict[str, bytes]:
    return {name: Path(directory, name).read_bytes() for name in sorted(os.listdir(directory))}


@pytest.fixture
def cache(tmp_path: Path) -> NodeCache:
    return NodeCache(tmp_path / "cache", max_bytes="1MiB")


@pytest.mark.parametrize("evicted", ["first", "second"])
def test_a_shared_file_counts_once_and_either_entry_can_go(cache, tmp_path, evicted):
    first = add_copy(cache, "step-1", model(tmp_path / "s1", 1))
    second = add_copy(cache, "step-2", model(tmp_path / "s2", 2), link_from=first)
    assert os.stat(os.path.join(first, "frozen.bin")).st_ino == os.stat(
        os.path.join(second, "frozen.bin")).st_ino
    assert cache.used_bytes == FROZEN + 2 * HEAD
    assert cache.stats()["bytes_cached"] == FROZEN + 2 * HEAD
    assert [e.size for e in cache.entries()] == [FROZEN + HEAD] * 2  # sizes stay whole

    gone, kept, kept_src = (("step-1", second, tmp_path / "s2") if evicted == "first"
                            else ("step-2", first, tmp_path / "s1"))
    assert cache.evict(cid(gone))
    assert cache.used_bytes == FROZEN + HEAD
    assert read_all(kept) == read_all(str(kept_src))  # intact and readable
    assert build_manifest(kept).digest == build_manifest(kept_src).digest
    assert cache.evict(cid("step-2" if gone == "step-1" else "step-1"))
    assert cache.used_bytes == 0


def test_the_count_survives_a_restart_and_another_process_view(cache, tmp_path):
    first = add_copy(cache, "step-1", model(tmp_path / "s1", 1))
    add_copy(cache, "step-2", model(tmp_path / "s2", 2), link_from=first)
    again = NodeCache(cache.root, max_bytes="1MiB")
    assert again.used_bytes == FROZEN + 2 * HEAD
    assert again.evict(cid("step-1"))
    assert cache.used_bytes == FROZEN + HEAD  # the first object reads the index again


def test_a_shared_entry_fits_where_a_whole_copy_would_not(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=FROZEN + 2 * HEAD)
    first = add_copy(cache, "step-1", model(tmp_path / "s1", 1))
    add_copy(cache, "step-2", model(tmp_path / "s2", 2), link_from=first)
    assert sorted(e.checkpoint_id for e in cache.entries()) == ["step-1", "step-2"]
    # A third step needs room for its head only: the least recently used step goes,
    # and the frozen file, still held by step 2, keeps being counted once.
    add_copy(cache, "step-3", model(tmp_path / "s3", 3),
             link_from=cache.lookup(cid("step-2"), build_manifest(tmp_path / "s2").digest))
    assert [e.checkpoint_id for e in cache.entries()] == ["step-2", "step-3"]
    assert cache.used_bytes == FROZEN + 2 * HEAD


def test_share_offers_cached_files_pins_their_entry_and_reserves_the_new_bytes(cache, tmp_path):
    first = add_copy(cache, "step-1", model(tmp_path / "s1", 1))
    manifest = build_manifest(model(tmp_path / "s2", 2))
    shared = cache.share(manifest, manifest.total_bytes)
    try:
        frozen = next(e for e in manifest.files if e.path == "frozen.bin")
        head = next(e for e in manifest.files if e.path == "head.bin")
        assert shared.have(frozen.hash) == os.path.join(first, "frozen.bin")
        assert shared.have(head.hash) is None
        assert shared.new_bytes == HEAD
        assert not cache.evict(cid("step-1"))  # pinned while a transfer links from it
    finally:
        shared.release()
    shared.release()  # once is enough
    assert cache.evict(cid("step-1"))


def test_share_without_room_for_the_new_bytes_next_to_its_sources_shares_nothing(tmp_path):
    cache = NodeCache(tmp_path / "cache", max_bytes=FROZEN + HEAD + HEAD // 2)
    add_copy(cache, "step-1", model(tmp_path / "s1", 1))
    # Step 2 alone fits, and so would its new bytes beside step 1 if the frozen file
    # counted once; but the cache cannot hold step 1 and step 2's head at once.
    manifest = build_manifest(model(tmp_path / "s2", 2))
    shared = cache.share(manifest, manifest.total_bytes)
    assert (shared.offered, shared.new_bytes) == ({}, manifest.total_bytes)
    assert cached_ids(cache) == []  # evicted to make room for all of it, as without sharing
    with pytest.raises(CacheFullError, match="larger than the whole node cache"):
        cache.share(build_manifest(model(tmp_path / "big", 3)), 10 << 20)


def test_share_of_nothing_known_is_a_reserve(cache, tmp_path):
    shared = cache.share(None, 100)
    assert (shared.offered, shared.new_bytes, shared.pinned) == ({}, 100, ())
    shared.release()


def test_an_index_whose_inodes_are_not_the_files_counts_by_size(cache, tmp_path):
    first = add_copy(cache, "step-1", model(tmp_path / "s1", 1))
    add_copy(cache, "step-2", model(tmp_path / "s2", 2), link_from=first)
    # The folder copied elsewhere without its hard links: every file its own inode.
    copied = tmp_path / "copied"
    shutil.copytree(cache.root, copied, symlinks=True)
    index = json.loads((copied / INDEX_NAME).read_text())
    assert all(len(e["files"]) == 2 for e in index["entries"])
    moved = NodeCache(copied, max_bytes="1MiB")
    assert moved.used_bytes == 2 * (FROZEN + HEAD)
    assert all(e.files == () for e in moved.entries())


def test_a_hostile_file_list_in_the_index_rebuilds_it_empty(cache, tmp_path, caplog):
    add_copy(cache, "step-1", model(tmp_path / "s1", 1))
    path = Path(cache.root, INDEX_NAME)
    index = json.loads(path.read_text())
    index["entries"][0]["files"][0][0] = "../../etc/passwd"
    path.write_text(json.dumps(index))
    again = NodeCache(cache.root, max_bytes="1MiB")
    assert again.entries() == []
    assert "is not a plain relative path" in caplog.text


def cached_ids(cache: NodeCache) -> list[str]:
    return [e.checkpoint_id for e in cache.entries()]


def test_an_entry_added_with_its_transfer_manifest_records_its_hashes_unread(
        cache, tmp_path, monkeypatch):
    """The files a transfer just wrote (and checked) are racily fresh, so no hash of
    theirs is remembered: given the manifest, add() takes its hashes and reads no file."""
    src = model(tmp_path / "s1", 1)
    manifest = build_manifest(src)
    staging = Path(cache.staging_directory(cid("step-1")))
    for item in src.iterdir():
        shutil.copyfile(item, staging / item.name)

    def no_reads(*args, **kwargs):
        raise AssertionError("a file was hashed again")

    monkeypatch.setattr("dckpt._transfer._hashes._read_hashes", no_reads)
    path = cache.add(cid("step-1"), manifest.digest, str(staging), FROZEN + HEAD, manifest)
    monkeypatch.undo()
    assert read_all(path) == read_all(str(src))
    # The next checkpoint of the run is offered the cached frozen file by its hash.
    following = build_manifest(model(tmp_path / "s2", 2))
    shared = cache.share(following, following.total_bytes)
    try:
        frozen = next(e for e in following.files if e.path == "frozen.bin")
        assert shared.have(frozen.hash) == os.path.join(path, "frozen.bin")
    finally:
        shared.release()
