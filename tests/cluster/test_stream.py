"""The sender's read-ahead guesses the chunk a receiver asks for next."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dckpt.cluster._stream import _following
from dckpt.transfer import ChunkSource, build_manifest


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1024, 1 << 20])
def test_following_walks_the_chunks_in_manifest_order(tmp_path: Path, chunk_bytes: int):
    rng = random.Random(3)
    for name, size in {"a": 0, "b": 1, "c": 2500, "d": 0, "e/f": 1024, "g": 7}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(rng.randbytes(size))
    manifest = build_manifest(tmp_path)
    expected = manifest.chunks(chunk_bytes)
    with ChunkSource(str(tmp_path), manifest, chunk_bytes) as source:
        walked = [expected[0]]
        while (step := _following(source, walked[-1])) is not None:
            walked.append(step)
    assert walked == expected
