"""The storage back-ends the URI tests run on, as mixins of fixtures.

A contract class (``StorageContract`` in test_storage.py, ``ReuseContract`` in
test_storage_reuse.py) asks for ``base_uri``, ``storage_options`` and ``raw_fs``; a
test class is a back-end mixin and a contract: ``class TestS3Reuse(S3Backend,
ReuseContract)``. ``base_uri`` is ``{the back-end's folder}/{FOLDER}``, FOLDER being
the contract's. ``raw_fs`` is a filesystem instance of its own, as another process or
tool would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem


class _Backend:
    FOLDER: str  # the contract's

    @pytest.fixture
    def base_uri(self, backend_root: str) -> str:
        return f"{backend_root}/{self.FOLDER}"


class MemoryBackend(_Backend):
    """``memory://``, a folder of its own per test."""

    @pytest.fixture
    def backend_root(self, memory_uri: str) -> str:
        return memory_uri

    @pytest.fixture
    def storage_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def raw_fs(self, storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem("memory", skip_instance_cache=True)


class LocalBackend(_Backend):
    """``file://`` URIs of a local folder."""

    @pytest.fixture
    def backend_root(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/remote"

    @pytest.fixture
    def storage_options(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def raw_fs(self, storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
        return LocalFileSystem(auto_mkdir=True, skip_instance_cache=True)


@pytest.mark.s3
class S3Backend(_Backend):
    """S3 through s3fs, against the session's moto server (a bucket per test)."""

    @pytest.fixture
    def backend_root(self, s3_bucket: str) -> str:
        return s3_bucket

    @pytest.fixture
    def storage_options(self, s3_storage_options: dict[str, Any]) -> dict[str, Any]:
        return s3_storage_options

    @pytest.fixture
    def raw_fs(self, storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
        s3fs = pytest.importorskip("s3fs")
        return s3fs.S3FileSystem(**storage_options, skip_instance_cache=True)
