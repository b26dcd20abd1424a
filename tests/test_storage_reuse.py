"""to_uri next to an earlier checkpoint of the same run: files with the same content
are copied on the storage side instead of uploaded, and the result is still a plain
folder of whole files. Bound to memory:// and to a real S3 server (moto)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import dask.config
import pytest
from fsspec.callbacks import Callback

from dckpt import Checkpoint, _storage
from tests._backends import MemoryBackend, S3Backend
from tests._trees import read_tree

KiB = 1 << 10


class SourcesCallback(Callback):  # type: ignore[misc]
    """Records where each file of an upload came from (``branched(source, dest)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Callback:
        self.sources.append(path_1)
        return Callback()


def write_step(root: Path, head_seed: int) -> Path:
    root.mkdir(parents=True)
    (root / "frozen").mkdir()
    (root / "frozen" / "base.bin").write_bytes(random.Random("reuse-base").randbytes(200 * KiB))
    (root / "frozen" / "vocab.txt").write_bytes(b"word\n" * 1000)
    (root / "head.bin").write_bytes(random.Random(f"reuse-head-{head_seed}").randbytes(20 * KiB))
    return root


def copied(callback: SourcesCallback, sibling: str = "step-1") -> set[str]:
    """The files copied from the checkpoint ``sibling`` (their source, in progress
    callbacks, is ``<the stored object>``), relative to it."""
    marker = f"/{sibling}/"
    return {s.strip("<>").split(marker, 1)[1] for s in callback.sources
            if s.startswith("<") and marker in s}


class ReuseContract:
    FOLDER = "run"  # base_uri's folder in the back-end (tests/_backends.py)

    def upload(self, tmp_path: Path, base_uri: str, name: str, seed: int,
               options: dict[str, Any]) -> tuple[Path, SourcesCallback]:
        local = write_step(tmp_path / name, seed)
        callback = SourcesCallback()
        Checkpoint.from_directory(str(local)).to_uri(f"{base_uri}/{name}",
                                                     storage_options=options,
                                                     callback=callback)
        return local, callback

    def test_unchanged_files_are_copied_from_the_earlier_checkpoint(
        self, tmp_path, base_uri, storage_options, raw_fs
    ):
        _, first = self.upload(tmp_path, base_uri, "step-1", 1, storage_options)
        assert copied(first) == set()  # nothing next to it yet
        local, second = self.upload(tmp_path, base_uri, "step-2", 2, storage_options)
        assert copied(second) == {"frozen/base.bin", "frozen/vocab.txt"}
        assert str(local / "head.bin") in second.sources  # the changed file: uploaded

        # A plain folder of whole files: it reads alone, also once step 1 is gone.
        _storage.delete(f"{base_uri}/step-1", storage_options=storage_options)
        prefix = f"{base_uri}/step-2".split("://", 1)[-1]
        assert raw_fs.cat_file(f"{prefix}/frozen/base.bin") == (
            local / "frozen" / "base.bin").read_bytes()
        out = tmp_path / "out"
        Checkpoint.from_uri(f"{base_uri}/step-2", storage_options=storage_options
                            ).to_directory(str(out))
        assert read_tree(out) == read_tree(local)

    def test_a_file_rewritten_behind_the_earlier_checkpoints_back_is_uploaded(
        self, tmp_path, base_uri, storage_options, raw_fs
    ):
        self.upload(tmp_path, base_uri, "step-1", 1, storage_options)
        prefix = f"{base_uri}/step-1".split("://", 1)[-1]
        # Another tool writes other bytes of the same size there.
        raw_fs.pipe_file(f"{prefix}/frozen/base.bin", os.urandom(200 * KiB))
        local, second = self.upload(tmp_path, base_uri, "step-2", 2, storage_options)
        assert str(local / "frozen" / "base.bin") in second.sources
        assert copied(second) == {"frozen/vocab.txt"}
        out = tmp_path / "out"
        Checkpoint.from_uri(f"{base_uri}/step-2", storage_options=storage_options
                            ).to_directory(str(out))
        assert read_tree(out) == read_tree(local)

    def test_no_siblings_are_looked_at_when_the_setting_is_zero(
        self, tmp_path, base_uri, storage_options
    ):
        self.upload(tmp_path, base_uri, "step-1", 1, storage_options)
        with dask.config.set({"dckpt.storage.reuse-siblings": 0}):
            _, second = self.upload(tmp_path, base_uri, "step-2", 2, storage_options)
        assert copied(second) == set()


class TestMemoryReuse(MemoryBackend, ReuseContract):
    def test_an_overwrite_keeps_the_tokens_of_the_files_at_the_top(
        self, tmp_path, base_uri, storage_options
    ):
        # Overwritten, step 1's files move from .dckpt_versions/ to the top; a later
        # upload still finds them unchanged there.
        self.upload(tmp_path, base_uri, "step-1", 1, storage_options)
        local = write_step(tmp_path / "again", 1)
        Checkpoint.from_directory(str(local)).to_uri(f"{base_uri}/step-1",
                                                     storage_options=storage_options)
        _, second = self.upload(tmp_path, base_uri, "step-2", 2, storage_options)
        assert copied(second) == {"frozen/base.bin", "frozen/vocab.txt"}


@pytest.mark.s3
class TestS3Reuse(S3Backend, ReuseContract):
    pass
