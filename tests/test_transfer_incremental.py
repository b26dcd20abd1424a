"""receive_directory told what the receiver has (``have``): only the chunks of the other
files are asked for; the rest is linked or copied from local files and checked by
their bytes. Real files in ``tmp_path``; the stream reads a real ChunkSource."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from dckpt._transfer import (
    ChunkSource,
    ChunkSpec,
    ChunkStream,
    Manifest,
    Received,
    build_manifest,
    receive_directory,
)

KiB = 1 << 10
CHUNK = 64 * KiB


def write_model(root: Path, seed: int) -> Path:
    """A frozen base (two files), a head that ``seed`` changes, a small executable."""
    rng = random.Random(0)
    (root / "base").mkdir(parents=True)
    (root / "base" / "frozen.bin").write_bytes(rng.randbytes(300 * KiB))
    (root / "base" / "tokens.txt").write_bytes(b"token\n" * 20_000)
    (root / "head.bin").write_bytes(random.Random(seed).randbytes(100 * KiB))
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    return root


def recording_stream(source: ChunkSource, asked: list[ChunkSpec]) -> ChunkStream:
    async def stream(specs: Sequence[ChunkSpec]) -> AsyncIterator[tuple[ChunkSpec, bytes]]:
        for spec in specs:
            asked.append(spec)
            yield spec, source.read_chunk(spec)
    return stream


def receive(src: Path, dst: Path, have: dict[str, str] | None,
            asked: list[ChunkSpec]) -> tuple[Manifest, Received]:
    manifest = build_manifest(src)
    with ChunkSource(str(src), manifest, CHUNK) as source:
        received = asyncio.run(receive_directory(
            manifest, recording_stream(source, asked), dst, chunk_bytes=CHUNK,
            have=None if have is None else have.get))
    return manifest, received


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def local_files(root: Path) -> dict[str, str]:
    """hash -> path of every file of ``root``: what a receiver holding it can offer."""
    return {entry.hash: str(root / entry.path) for entry in build_manifest(root).files}


def test_only_the_changed_file_is_asked_for_and_the_rest_is_linked(tmp_path: Path):
    old = write_model(tmp_path / "step-1", seed=1)
    new = write_model(tmp_path / "step-2", seed=2)
    asked: list[ChunkSpec] = []
    manifest, received = receive(new, tmp_path / "dst", local_files(old), asked)

    assert files_of(tmp_path / "dst") == files_of(new)
    head = next(i for i, e in enumerate(manifest.files) if e.path == "head.bin")
    assert {spec.file_index for spec in asked} == {head}
    assert sum(spec.length for spec in asked) == 100 * KiB
    assert received == Received(fetched_bytes=100 * KiB,
                                linked_bytes=manifest.total_bytes - 100 * KiB)
    for name in ("base/frozen.bin", "base/tokens.txt", "run.sh"):  # one set of bytes
        assert os.stat(tmp_path / "dst" / name).st_ino == os.stat(old / name).st_ino
    assert (tmp_path / "dst" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert build_manifest(tmp_path / "dst").digest == manifest.digest


def test_without_have_everything_is_fetched_as_before(tmp_path: Path):
    new = write_model(tmp_path / "step-2", seed=2)
    asked: list[ChunkSpec] = []
    manifest, received = receive(new, tmp_path / "dst", None, asked)
    assert received == Received(fetched_bytes=manifest.total_bytes)
    assert sum(spec.length for spec in asked) == manifest.total_bytes
    assert files_of(tmp_path / "dst") == files_of(new)


def test_a_local_file_of_another_mode_is_copied_not_linked(tmp_path: Path):
    old = write_model(tmp_path / "step-1", seed=1)
    new = write_model(tmp_path / "step-2", seed=1)
    (old / "base" / "frozen.bin").chmod(0o600)  # same bytes, the new one is 0o644
    asked: list[ChunkSpec] = []
    _, received = receive(new, tmp_path / "dst", local_files(old), asked)
    assert asked == []
    placed = tmp_path / "dst" / "base" / "frozen.bin"
    assert placed.stat().st_ino != (old / "base" / "frozen.bin").stat().st_ino
    assert placed.stat().st_mode & 0o777 == (new / "base" / "frozen.bin").stat().st_mode & 0o777
    assert (old / "base" / "frozen.bin").stat().st_mode & 0o777 == 0o600  # untouched
    assert received.copied_bytes == 300 * KiB
    assert files_of(tmp_path / "dst") == files_of(new)


def test_a_local_file_changed_with_its_size_and_mtime_kept_is_fetched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    old = write_model(tmp_path / "step-1", seed=1)
    new = write_model(tmp_path / "step-2", seed=1)
    offered = local_files(old)  # hashes taken now, as a cache's index holds them
    frozen = old / "base" / "frozen.bin"
    st = frozen.stat()
    with open(frozen, "r+b") as f:  # same size, other bytes, the mtime set back
        f.seek(1000)
        f.write(b"\x00" * 16)
    os.utime(frozen, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (frozen.stat().st_size, frozen.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    asked: list[ChunkSpec] = []
    with caplog.at_level(logging.WARNING, "dckpt._transfer._place"):
        manifest, received = receive(new, tmp_path / "dst", offered, asked)
    index = next(i for i, e in enumerate(manifest.files) if e.path == "base/frozen.bin")
    assert {spec.file_index for spec in asked} == {index}
    assert received.fetched_bytes == 300 * KiB
    assert files_of(tmp_path / "dst") == files_of(new)
    assert "no longer holds the bytes of 'base/frozen.bin'" in caplog.text
    assert (tmp_path / "dst" / "base" / "frozen.bin").stat().st_ino != frozen.stat().st_ino


def test_an_offered_file_that_is_gone_or_of_another_size_is_fetched(tmp_path: Path):
    old = write_model(tmp_path / "step-1", seed=1)
    new = write_model(tmp_path / "step-2", seed=1)
    offered = local_files(old)
    (old / "base" / "frozen.bin").unlink()
    with open(old / "base" / "tokens.txt", "ab") as f:
        f.write(b"more\n")
    asked: list[ChunkSpec] = []
    manifest, received = receive(new, tmp_path / "dst", offered, asked)
    assert {manifest.files[s.file_index].path for s in asked} == {
        "base/frozen.bin", "base/tokens.txt"}
    assert received.fetched_bytes == 300 * KiB + 120_000
    assert files_of(tmp_path / "dst") == files_of(new)


def test_an_offered_symlink_is_not_followed(tmp_path: Path):
    old = write_model(tmp_path / "step-1", seed=1)
    new = write_model(tmp_path / "step-2", seed=1)
    offered = local_files(old)
    target = old / "base" / "frozen.bin"
    moved = tmp_path / "elsewhere.bin"
    target.rename(moved)
    target.symlink_to(moved)  # the same bytes, through a link: not placed
    asked: list[ChunkSpec] = []
    manifest, _ = receive(new, tmp_path / "dst", offered, asked)
    assert {manifest.files[s.file_index].path for s in asked} == {"base/frozen.bin"}
    assert not (tmp_path / "dst" / "base" / "frozen.bin").is_symlink()
    assert files_of(tmp_path / "dst") == files_of(new)


def test_files_with_the_same_content_in_one_manifest_are_asked_for_once(tmp_path: Path):
    old = write_model(tmp_path / "step-1", seed=1)
    new = write_model(tmp_path / "step-2", seed=2)
    (new / "copy-of-head.bin").write_bytes((new / "head.bin").read_bytes())
    (new / "tied.bin").write_bytes((new / "head.bin").read_bytes())
    (new / "tied.bin").chmod(0o600)
    asked: list[ChunkSpec] = []
    manifest, received = receive(new, tmp_path / "dst", local_files(old), asked)
    assert {manifest.files[s.file_index].path for s in asked} == {"copy-of-head.bin"}
    assert received.fetched_bytes == 100 * KiB
    assert files_of(tmp_path / "dst") == files_of(new)
    dst = tmp_path / "dst"
    assert (dst / "head.bin").stat().st_ino == (dst / "copy-of-head.bin").stat().st_ino
    assert (dst / "tied.bin").stat().st_mode & 0o777 == 0o600  # its own mode: a copy
    assert build_manifest(dst).digest == manifest.digest
