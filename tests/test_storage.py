"""The storage contract (``dckpt._storage``), written once and bound to every backend.

:class:`StorageContract` holds the tests; the ``Test...`` subclasses bind it to
``memory://``, to a local folder through ``file://`` and to S3 (a real moto server,
reached over HTTP by s3fs), the way fsspec's ``tests/abstract`` binds one contract to
many filesystems. Faults are injected by wrapping methods of the real filesystem
instance that dckpt uses; the calls still go through to the real store.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import dask.config
import fsspec
import pytest
from fsspec.callbacks import Callback
from fsspec.registry import _registry as fsspec_registry

from dckpt import _storage
from dckpt._storage import COMMIT_MARKER, PENDING_MARKER
from dckpt.errors import (
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointURIError,
    IncompleteCheckpointError,
    StorageError,
    UnsafePathError,
)
from tests._backends import LocalBackend, MemoryBackend, S3Backend
from tests._trees import make_tree, read_tree

BIG = 3 * 2**20


def build_tree(root: Path) -> str:
    """make_tree's shapes (nested and empty folders, an empty file) plus 3 MiB of noise."""
    make_tree(root)
    (root / "model" / "big.bin").write_bytes(os.urandom(BIG))
    return str(root)


def file_sizes(root: str | os.PathLike[str]) -> dict[str, int]:
    return {
        rel: len(content) for rel, content in read_tree(root).items() if content is not None
    }


def files_only(tree: dict[str, bytes | None]) -> dict[str, bytes | None]:
    return {rel: content for rel, content in tree.items() if content is not None}


def fail_puts_of(fs: Any, monkeypatch: pytest.MonkeyPatch, suffix: str, message: str) -> None:
    """Make ``fs.put_file`` raise ``OSError(message)`` for local files ending in ``suffix``."""
    original = fs.put_file

    def failing(lpath: str, rpath: str, **kwargs: Any) -> Any:
        if lpath.endswith(suffix):
            raise OSError(message)
        return original(lpath, rpath, **kwargs)

    monkeypatch.setattr(fs, "put_file", failing)


class Recorder(Callback):
    """Counts files itself and hands out a child per file that counts its bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[tuple[str, str, Callback]] = []

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Callback:
        child = Callback()
        self.children.append((path_1, path_2, child))
        return child


class StorageContract:
    """What every backend must do. Subclasses provide the fixtures below."""

    # fsspec's LocalFileSystem ignores put_file/get_file callbacks: no byte counts.
    counts_bytes = True

    FOLDER = "prefix"  # base_uri's folder in the back-end (tests/_backends.py)

    @pytest.fixture
    def uri(self, base_uri: str) -> str:
        return f"{base_uri}/ckpt"

    @pytest.fixture
    def fs(self, uri: str, storage_options: dict[str, Any]) -> fsspec.AbstractFileSystem:
        """The (cached) filesystem instance dckpt itself uses for ``uri``."""
        return _storage.resolve_uri(uri, storage_options)[0]

    @pytest.fixture
    def tree(self, tmp_path: Path) -> str:
        return build_tree(tmp_path / "source")

    @pytest.fixture
    def out(self, tmp_path: Path) -> Path:
        path = tmp_path / "inner" / "out"
        path.mkdir(parents=True)
        return path

    # ------------------------------------------------------------------ round trip

    def test_round_trip_is_byte_identical(self, tree, uri, storage_options, out):
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        assert _storage.uri_status(uri, storage_options=storage_options) == "committed"
        assert _storage.list_files(uri, storage_options=storage_options) == file_sizes(tree)
        _storage.download_directory(uri, out, storage_options=storage_options)
        # Folders too, the empty one included: the manifest carries it.
        assert read_tree(out) == read_tree(tree)
        assert (out / "empty_file").read_bytes() == b""
        assert len((out / "model" / "big.bin").read_bytes()) == BIG

    def test_empty_directory_round_trip(self, tmp_path, uri, storage_options, out):
        (tmp_path / "empty").mkdir()
        _storage.upload_directory(tmp_path / "empty", uri, storage_options=storage_options)
        assert _storage.uri_status(uri, storage_options=storage_options) == "committed"
        assert _storage.list_files(uri, storage_options=storage_options) == {}
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert os.listdir(out) == []

    def test_local_marker_names_are_not_uploaded_at_the_top(self, tmp_path, uri,
                                                            storage_options):
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / COMMIT_MARKER).write_text("not a manifest")
        (src / PENDING_MARKER).write_text("")
        (src / "sub" / COMMIT_MARKER).write_text("just a file down here")
        _storage.upload_directory(src, uri, storage_options=storage_options)
        assert _storage.list_files(uri, storage_options=storage_options) == {
            f"sub/{COMMIT_MARKER}": 21
        }

    def test_overlay_replaces_adds_and_drops_files(self, tree, uri, storage_options, out):
        overlay = {"notes.txt": b"replaced", "added/new.bin": b"\x00" * 5,
                   "run.sh": None}
        _storage.upload_directory(tree, uri, storage_options=storage_options,
                                 overlay=overlay)
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert (out / "notes.txt").read_bytes() == b"replaced"
        assert (out / "added" / "new.bin").read_bytes() == b"\x00" * 5
        assert not (out / "run.sh").exists()
        assert (out / "model" / "big.bin").read_bytes() == Path(
            tree, "model", "big.bin").read_bytes()

    # ------------------------------------------------------------ markers and order

    def test_markers_are_written_pending_first_and_commit_last(
        self, tree, uri, fs, storage_options, monkeypatch
    ):
        events: list[tuple[str, str]] = []
        prefix = fs._strip_protocol(uri).rstrip("/") + "/"

        def record(method: str) -> None:
            original = getattr(fs, method)

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                path = args[1] if method in ("put_file", "cp_file", "mv") else args[0]
                events.append((method, fs._strip_protocol(path).removeprefix(prefix)))
                return original(*args, **kwargs)

            monkeypatch.setattr(fs, method, wrapper)

        for method in ("pipe_file", "put_file", "rm_file", "cp_file", "mv"):
            record(method)
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        _storage.upload_directory(tree, uri, storage_options=storage_options)  # overwrite

        def is_commit(event: tuple[str, str]) -> bool:
            # Local disks write the marker beside and rename it into place.
            return event in (("pipe_file", COMMIT_MARKER), ("mv", COMMIT_MARKER))

        assert events[0] == ("pipe_file", PENDING_MARKER)
        starts = [i for i, event in enumerate(events) if event == ("pipe_file", PENDING_MARKER)]
        assert len(starts) == 2
        first, second = events[:starts[1]], events[starts[1]:]
        # A first upload: the files to the top, the commit marker after all of them.
        puts = [i for i, (method, _) in enumerate(first) if method == "put_file"]
        assert {first[i][1] for i in puts} == set(file_sizes(tree))
        assert next(i for i, e in enumerate(first) if is_commit(e)) > max(puts)
        # An overwrite never removes the old commit marker: it is replaced, once the
        # new files are all up beside the old ones ...
        assert ("rm_file", COMMIT_MARKER) not in events
        puts = [i for i, (method, _) in enumerate(second) if method == "put_file"]
        assert len(puts) == len(file_sizes(tree))
        assert all(second[i][1].startswith(f"{_storage.VERSIONS_FOLDER}/") for i in puts)
        commits = [i for i, e in enumerate(second) if is_commit(e)]
        assert len(commits) == 2 and commits[0] > max(puts)
        # ... then copied to the top, and the marker switched to them.
        # (Local disks' put_file is a cp_file too, into the versioned folder.)
        copies = [i for i, (method, path) in enumerate(second) if method == "cp_file"
                  and not path.startswith(f"{_storage.VERSIONS_FOLDER}/")]
        assert {second[i][1] for i in copies} == set(file_sizes(tree))
        assert commits[0] < min(copies) and max(copies) < commits[1]
        assert second.index(("rm_file", PENDING_MARKER)) > commits[1]

    def test_failed_upload_is_refused_by_readers(
        self, tree, uri, fs, storage_options, monkeypatch, out
    ):
        fail_puts_of(fs, monkeypatch, "big.bin", "disk on fire")
        with pytest.raises(OSError, match="disk on fire"):
            _storage.upload_directory(tree, uri, storage_options=storage_options)
        monkeypatch.undo()

        never_finished = r"dckpt upload at .*ckpt never finished \(there is no commit marker"
        with pytest.raises(IncompleteCheckpointError, match=never_finished):
            _storage.uri_status(uri, storage_options=storage_options)
        with pytest.raises(IncompleteCheckpointError, match="upload the checkpoint again"):
            _storage.download_directory(uri, out, storage_options=storage_options)
        with pytest.raises(IncompleteCheckpointError):
            _storage.list_files(uri, storage_options=storage_options)
        assert os.listdir(out) == []
        # A FileNotFoundError: "look for an older checkpoint" code catches it.
        assert issubclass(IncompleteCheckpointError, FileNotFoundError)

        _storage.upload_directory(tree, uri, storage_options=storage_options)
        assert _storage.uri_status(uri, storage_options=storage_options) == "committed"

    def test_failed_overwrite_is_cleaned_up_by_the_next_upload(
        self, tmp_path, uri, fs, raw_fs, storage_options, monkeypatch
    ):
        old = tmp_path / "old"
        (old / "sub").mkdir(parents=True)
        (old / "keep.txt").write_text("old")
        (old / "sub" / "old_only.txt").write_text("old")
        _storage.upload_directory(old, uri, storage_options=storage_options)

        failed = tmp_path / "failed"
        failed.mkdir()
        (failed / "keep.txt").write_text("failed")
        (failed / "partial_only.txt").write_text("partial")
        (failed / "zz_fails.txt").write_text("x")
        fail_puts_of(fs, monkeypatch, "zz_fails.txt", "network gone")
        with (dask.config.set({"dckpt.storage.max-concurrency": 1}),
              pytest.raises(OSError, match="network gone")):
            _storage.upload_directory(failed, uri, storage_options=storage_options)
        monkeypatch.undo()
        raw_fs.invalidate_cache()
        assert any(p.endswith("/partial_only.txt") for p in raw_fs.find(uri))

        new = tmp_path / "new"
        new.mkdir()
        (new / "keep.txt").write_text("new")
        _storage.upload_directory(new, uri, storage_options=storage_options)
        raw_fs.invalidate_cache()
        # The old checkpoint's files and the failed upload's were listed by dckpt
        # markers, so they go; nothing else is left but the new commit marker.
        assert sorted(p.rpartition("/")[2] for p in raw_fs.find(uri)) == [
            COMMIT_MARKER, "keep.txt"
        ]

    # ------------------------------------------------------------------- overwrite

    def test_overwrite_lists_only_new_files_and_removes_stale_ones(
        self, tmp_path, tree, uri, raw_fs, storage_options, out
    ):
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        # Someone else's file in the folder: no dckpt manifest ever listed it.
        raw_fs.pipe_file(f"{uri}/foreign.txt", b"not ours")
        new = tmp_path / "new"
        (new / "model").mkdir(parents=True)
        (new / "model" / "big.bin").write_bytes(b"smaller now")
        (new / "fresh.txt").write_text("fresh")

        _storage.upload_directory(new, uri, storage_options=storage_options)
        assert _storage.list_files(uri, storage_options=storage_options) == {
            "model/big.bin": 11, "fresh.txt": 5
        }
        raw_fs.invalidate_cache()
        assert not raw_fs.exists(f"{uri}/notes.txt")
        assert not raw_fs.exists(f"{uri}/model/weights.bin")
        assert raw_fs.cat_file(f"{uri}/foreign.txt") == b"not ours"
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert files_only(read_tree(out)) == files_only(read_tree(new))

    def test_names_that_look_like_glob_patterns_are_plain_names(
        self, tmp_path, uri, raw_fs, storage_options, out
    ):
        first = tmp_path / "first"
        first.mkdir()
        (first / "w[0].bin").write_bytes(b"bracket")
        (first / "w0.bin").write_bytes(b"zero")
        (first / "a*b?").write_bytes(b"star")
        _storage.upload_directory(first, uri, storage_options=storage_options)
        second = tmp_path / "second"
        second.mkdir()
        (second / "w0.bin").write_bytes(b"zero again")
        _storage.upload_directory(second, uri, storage_options=storage_options)
        raw_fs.invalidate_cache()
        # Removing the stale "w[0].bin" did not take "w0.bin" along as a glob match.
        assert sorted(p.rpartition("/")[2] for p in raw_fs.find(uri)) == [
            COMMIT_MARKER, "w0.bin"
        ]
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert (out / "w0.bin").read_bytes() == b"zero again"

    # ------------------------------------------------------------------ plain folders

    def test_plain_folder_is_accepted_and_downloads(
        self, tree, uri, raw_fs, storage_options, out
    ):
        sizes = file_sizes(tree)
        raw_fs.put([os.path.join(tree, *rel.split("/")) for rel in sizes],
                   [f"{uri}/{rel}" for rel in sizes])
        assert _storage.uri_status(uri, storage_options=storage_options) == "plain"
        assert _storage.list_files(uri, storage_options=storage_options) == sizes
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert files_only(read_tree(out)) == files_only(read_tree(tree))

    # ------------------------------------------------------------------ bad input

    def test_missing_prefix_is_not_found(self, base_uri, storage_options, out):
        missing = f"{base_uri}/nothing-here"
        for call in (
            lambda: _storage.uri_status(missing, storage_options=storage_options),
            lambda: _storage.list_files(missing, storage_options=storage_options),
            lambda: _storage.download_directory(missing, out,
                                               storage_options=storage_options),
            lambda: _storage.delete(missing, storage_options=storage_options),
        ):
            with pytest.raises(CheckpointNotFoundError, match="no checkpoint at .*nothing-here"):
                call()
        assert _storage.read_file(missing, "x", storage_options=storage_options) is None
        assert os.listdir(out) == []

    def test_file_changed_after_commit_is_detected(
        self, tree, uri, raw_fs, storage_options, tmp_path
    ):
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        raw_fs.pipe_file(f"{uri}/notes.txt", b"rewritten behind dckpt's back, longer")
        (tmp_path / "a").mkdir()
        with pytest.raises(CheckpointFormatError,
                           match="'notes.txt'.* changed since the checkpoint was committed"):
            _storage.download_directory(uri, tmp_path / "a", storage_options=storage_options)

        raw_fs.rm_file(f"{uri}/notes.txt")
        (tmp_path / "b").mkdir()
        with pytest.raises(CheckpointFormatError, match="'notes.txt'.* is missing"):
            _storage.download_directory(uri, tmp_path / "b", storage_options=storage_options)

    def test_unreadable_manifest_is_a_format_error(self, tree, uri, raw_fs,
                                                   storage_options, out):
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        raw_fs.pipe_file(f"{uri}/{COMMIT_MARKER}", b"{not json")
        with pytest.raises(CheckpointFormatError, match="commit marker .* not valid JSON"):
            _storage.download_directory(uri, out, storage_options=storage_options)
        raw_fs.pipe_file(f"{uri}/{COMMIT_MARKER}", b"[" * 100_000)  # RecursionError in json
        with pytest.raises(CheckpointFormatError, match="nested too deeply"):
            _storage.list_files(uri, storage_options=storage_options)
        raw_fs.pipe_file(f"{uri}/{PENDING_MARKER}", b"[" * 100_000)
        # Both unreadable markers are ignored by the next upload, which replaces them.
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        assert _storage.list_files(uri, storage_options=storage_options)
        raw_fs.pipe_file(f"{uri}/{COMMIT_MARKER}", b"[]")
        with pytest.raises(CheckpointFormatError, match="not a dckpt manifest"):
            _storage.list_files(uri, storage_options=storage_options)
        newer = {"format_version": 99, "files": {}}
        raw_fs.pipe_file(f"{uri}/{COMMIT_MARKER}", json.dumps(newer).encode())
        with pytest.raises(CheckpointFormatError, match="upgrade dckpt"):
            _storage.list_files(uri, storage_options=storage_options)

    def test_unsafe_key_in_a_plain_listing_is_refused(
        self, uri, raw_fs, storage_options, out
    ):
        raw_fs.pipe_file(f"{uri}/fine.txt", b"ok")
        raw_fs.pipe_file(f"{uri}/a/../../x", b"evil")
        raw_fs.invalidate_cache()
        assert any("/../" in p for p in raw_fs.find(uri)), "the store normalized the key"
        assert _storage.uri_status(uri, storage_options=storage_options) == "plain"
        with pytest.raises(UnsafePathError, match=r"refusing entry 'a/\.\."):
            _storage.list_files(uri, storage_options=storage_options)
        with pytest.raises(UnsafePathError, match="outside the target directory"):
            _storage.download_directory(uri, out, storage_options=storage_options)
        assert os.listdir(out) == []
        assert sorted(os.listdir(out.parent)) == ["out"]
        assert sorted(os.listdir(out.parent.parent)) == ["inner"]

    def test_unsafe_name_in_a_manifest_is_refused(self, tree, uri, raw_fs,
                                                  storage_options, out):
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        raw_fs.pipe_file(f"{uri}/evil", b"abc")
        manifest = {"format_version": 1, "files": {"../evil": 3}}
        raw_fs.pipe_file(f"{uri}/{COMMIT_MARKER}", json.dumps(manifest).encode())
        with pytest.raises(UnsafePathError, match="outside the target directory"):
            _storage.download_directory(uri, out, storage_options=storage_options)
        assert os.listdir(out) == []
        assert not (out.parent / "evil").exists()

    # ------------------------------------------------------- progress and parallelism

    def test_progress_callbacks_count_files_and_bytes(self, tree, uri, storage_options,
                                                      out):
        sizes = file_sizes(tree)
        up = Recorder()
        _storage.upload_directory(tree, uri, storage_options=storage_options, callback=up)
        down = Recorder()
        _storage.download_directory(uri, out, storage_options=storage_options,
                                   callback=down)
        for recorder in (up, down):
            assert recorder.size == recorder.value == len(sizes)
            assert len(recorder.children) == len(sizes)
            if self.counts_bytes:
                assert sum(c.value for _, _, c in recorder.children) == sum(sizes.values())
                assert {c.size for _, _, c in recorder.children} == set(sizes.values())
        assert {Path(src).name for src, _, _ in up.children} == {
            rel.rpartition("/")[2] for rel in sizes
        }

    @pytest.mark.parametrize("limit", [1, 4])
    def test_transfers_run_in_parallel_up_to_the_setting(
        self, tmp_path, uri, fs, storage_options, monkeypatch, out, limit
    ):
        src = tmp_path / "many"
        src.mkdir()
        for i in range(12):
            (src / f"f{i:02d}").write_bytes(os.urandom(1000))
        peaks: dict[str, int] = {}

        def track(method: str) -> None:
            original = getattr(fs, method)
            changed = threading.Condition()
            running, started = [0], [0]

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                with changed:
                    running[0] += 1
                    started[0] += 1
                    peaks[method] = max(peaks.get(method, 0), running[0])
                    changed.notify_all()
                    # Hold this call until another one runs beside it (or none is left
                    # to start), so that parallel calls are seen to overlap however
                    # slow the machine; with a limit of 1 nothing can join it.
                    changed.wait_for(lambda: limit == 1 or running[0] > 1
                                     or started[0] == len(os.listdir(src)), timeout=10)
                try:
                    return original(*args, **kwargs)
                finally:
                    with changed:
                        running[0] -= 1
                        changed.notify_all()

            monkeypatch.setattr(fs, method, wrapper)

        track("put_file")
        track("get_file")
        with dask.config.set({"dckpt.storage.max-concurrency": limit}):
            _storage.upload_directory(src, uri, storage_options=storage_options)
            _storage.download_directory(uri, out, storage_options=storage_options)
        if limit == 1:
            assert peaks == {"put_file": 1, "get_file": 1}
        else:
            assert 1 < peaks["put_file"] <= limit
            assert 1 < peaks["get_file"] <= limit
        assert files_only(read_tree(out)) == files_only(read_tree(src))

    # ------------------------------------------------------------- read_file, delete

    def test_read_file(self, tree, uri, raw_fs, storage_options):
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        read = lambda rel: _storage.read_file(uri, rel, storage_options=storage_options)
        assert read("notes.txt") == b"trained for 3 epochs\n"
        assert read("empty_file") == b""
        assert read("no/such/file") is None
        # A file the manifest does not list is not part of the checkpoint.
        raw_fs.pipe_file(f"{uri}/ghost.txt", b"boo")
        assert read("ghost.txt") is None
        with pytest.raises(UnsafePathError):
            read("../notes.txt")

    def test_read_file_of_a_plain_folder(self, uri, raw_fs, storage_options):
        raw_fs.pipe_file(f"{uri}/sub/meta.json", b"{}")
        assert _storage.read_file(uri, "sub/meta.json",
                                 storage_options=storage_options) == b"{}"

    def test_delete_committed_removes_commit_marker_first(
        self, tree, uri, fs, raw_fs, storage_options, monkeypatch
    ):
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        removed: list[str] = []
        original = fs.rm_file

        def wrapper(path: str, *args: Any, **kwargs: Any) -> Any:
            removed.append(path.rpartition("/")[2])
            return original(path, *args, **kwargs)

        monkeypatch.setattr(fs, "rm_file", wrapper)
        _storage.delete(uri, storage_options=storage_options)
        assert removed[0] == COMMIT_MARKER
        assert len(removed) >= 1 + len(file_sizes(tree))
        with pytest.raises(CheckpointNotFoundError):
            _storage.uri_status(uri, storage_options=storage_options)
        raw_fs.invalidate_cache()
        assert raw_fs.find(uri) == []

    def test_delete_leaves_files_no_manifest_listed(self, tree, uri, raw_fs,
                                                    storage_options):
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        raw_fs.pipe_file(f"{uri}/foreign.txt", b"not ours")
        _storage.delete(uri, storage_options=storage_options)
        raw_fs.invalidate_cache()
        assert [p.rpartition("/")[2] for p in raw_fs.find(uri)] == ["foreign.txt"]
        # What is left is someone else's plain folder.
        assert _storage.uri_status(uri, storage_options=storage_options) == "plain"

    def test_delete_plain_folder_and_unfinished_upload(
        self, tree, uri, fs, raw_fs, storage_options, monkeypatch
    ):
        raw_fs.pipe_file(f"{uri}/a/b.txt", b"plain")
        _storage.delete(uri, storage_options=storage_options)
        with pytest.raises(CheckpointNotFoundError):
            _storage.uri_status(uri, storage_options=storage_options)

        fail_puts_of(fs, monkeypatch, "notes.txt", "interrupted")
        with pytest.raises(OSError, match="interrupted"):
            _storage.upload_directory(tree, uri, storage_options=storage_options)
        monkeypatch.undo()
        with pytest.raises(IncompleteCheckpointError):
            _storage.uri_status(uri, storage_options=storage_options)
        _storage.delete(uri, storage_options=storage_options)
        raw_fs.invalidate_cache()
        assert raw_fs.find(uri) == []

    # ------------------------------------------------- overwrites that do not finish

    @pytest.mark.parametrize("fail_after", [0, 2])
    def test_interrupted_overwrite_keeps_the_old_checkpoint(
        self, tmp_path, uri, raw_fs, storage_options, fail_after
    ):
        old, new = _old_and_new_trees(tmp_path)
        _storage.upload_directory(old, uri, storage_options=storage_options)
        with (dask.config.set({"dckpt.storage.max-concurrency": 1}),
              pytest.raises(StorageError, match="connection dropped") as info):
            _storage.upload_directory(new, uri, storage_options=storage_options,
                                     callback=FailAfter(fail_after))
        assert isinstance(info.value.__cause__, ConnectionError)

        # The old checkpoint, exactly: files, folders, modes, and nothing of the new.
        assert _storage.uri_status(uri, storage_options=storage_options) == "committed"
        assert _storage.list_files(uri, storage_options=storage_options) == file_sizes(old)
        assert _storage.read_file(uri, "a.txt", storage_options=storage_options) == b"old a"
        assert _storage.read_file(uri, "c.txt", storage_options=storage_options) is None
        (tmp_path / "got_old").mkdir()
        _storage.download_directory(uri, tmp_path / "got_old", storage_options=storage_options)
        assert read_tree(tmp_path / "got_old") == read_tree(old)
        assert modes_of(tmp_path / "got_old") == modes_of(old)

        _storage.upload_directory(new, uri, storage_options=storage_options)
        (tmp_path / "got_new").mkdir()
        _storage.download_directory(uri, tmp_path / "got_new", storage_options=storage_options)
        assert read_tree(tmp_path / "got_new") == read_tree(new)
        # The old files and the failed upload's are gone; a plain folder is left, with
        # the user's files at the top, as another tool would read it.
        raw_fs.invalidate_cache()
        top = fs_prefix(raw_fs, uri)
        assert sorted(p.removeprefix(top) for p in raw_fs.find(uri)) == sorted(
            [COMMIT_MARKER, *file_sizes(new)])

    def test_interrupted_overwrite_of_a_checkpoint_object(
        self, tmp_path, uri, storage_options
    ):
        """The same through ``Checkpoint.to_uri`` / ``from_uri`` (``file://`` URIs go
        through ``to_directory``, which renames into place)."""
        from dckpt import Checkpoint

        old, new = _old_and_new_trees(tmp_path)
        Checkpoint.from_directory(old).to_uri(uri, storage_options=storage_options)
        with (dask.config.set({"dckpt.storage.max-concurrency": 1}),
              pytest.raises(OSError, match="connection dropped")):
            Checkpoint.from_directory(new).to_uri(uri, storage_options=storage_options,
                                                  callback=FailAfter(2))
        got = Checkpoint.from_uri(uri, storage_options=storage_options).to_directory(
            tmp_path / "got_old")
        assert read_tree(got) == read_tree(old)
        Checkpoint.from_directory(new).to_uri(uri, storage_options=storage_options)
        got = Checkpoint.from_uri(uri, storage_options=storage_options).to_directory(
            tmp_path / "got_new")
        assert read_tree(got) == read_tree(new)

    def test_upload_after_an_interrupted_copy_to_the_top(
        self, tmp_path, uri, fs, raw_fs, storage_options, monkeypatch
    ):
        """A crash after the switch, while the new files are copied to the top: the
        new checkpoint is read from its versioned folder, and the next upload cleans up."""
        old, new = _old_and_new_trees(tmp_path)
        _storage.upload_directory(old, uri, storage_options=storage_options)
        original, copied = fs.cp_file, []

        def failing(path1: str, path2: str, **kwargs: Any) -> Any:
            if f"/{_storage.VERSIONS_FOLDER}/" not in fs._strip_protocol(path2):
                if copied:
                    raise OSError("crashed while copying")
                copied.append(path2)
            return original(path1, path2, **kwargs)

        monkeypatch.setattr(fs, "cp_file", failing)
        with (dask.config.set({"dckpt.storage.max-concurrency": 1}),
              pytest.raises(StorageError, match="crashed while copying")):
            _storage.upload_directory(new, uri, storage_options=storage_options)
        monkeypatch.undo()
        (tmp_path / "got").mkdir()
        _storage.download_directory(uri, tmp_path / "got", storage_options=storage_options)
        assert read_tree(tmp_path / "got") == read_tree(new)

        _storage.upload_directory(old, uri, storage_options=storage_options)
        raw_fs.invalidate_cache()
        top = fs_prefix(raw_fs, uri)
        assert sorted(p.removeprefix(top) for p in raw_fs.find(uri)) == sorted(
            [COMMIT_MARKER, *file_sizes(old)])
        _storage.delete(uri, storage_options=storage_options)
        raw_fs.invalidate_cache()
        assert raw_fs.find(uri) == []

    def test_overwrite_where_a_folder_becomes_a_file(self, tmp_path, uri,
                                                     storage_options, out):
        old, new = tmp_path / "old", tmp_path / "new"
        (old / "x").mkdir(parents=True)
        (old / "x" / "y").write_text("below")
        new.mkdir()
        (new / "x").write_text("a file now")
        _storage.upload_directory(old, uri, storage_options=storage_options)
        _storage.upload_directory(new, uri, storage_options=storage_options)
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert read_tree(out) == {"x": b"a file now"}

    def test_version_changes_with_every_commit_only(self, tmp_path, uri, raw_fs,
                                                    storage_options):
        old, new = _old_and_new_trees(tmp_path)
        _storage.upload_directory(old, uri, storage_options=storage_options)
        first = _storage.uri_version(uri, storage_options=storage_options)
        assert _storage.uri_version(uri, storage_options=storage_options) == first
        with (dask.config.set({"dckpt.storage.max-concurrency": 1}),
              pytest.raises(StorageError)):
            _storage.upload_directory(new, uri, storage_options=storage_options,
                                     callback=FailAfter(1))
        assert _storage.uri_version(uri, storage_options=storage_options) == first
        _storage.upload_directory(old, uri, storage_options=storage_options)
        assert _storage.uri_version(uri, storage_options=storage_options) != first
        # A plain folder's version follows its listing.
        plain = f"{uri}-plain"
        raw_fs.pipe_file(f"{plain}/a", b"1")
        one = _storage.uri_version(plain, storage_options=storage_options)
        raw_fs.pipe_file(f"{plain}/b", b"2")
        assert _storage.uri_version(plain, storage_options=storage_options) != one

    def test_rewrite_during_a_download_is_refused(
        self, tmp_path, uri, fs, storage_options, monkeypatch, out
    ):
        # Same names, same sizes, other bytes: only the version tells them apart.
        old, new = tmp_path / "old", tmp_path / "new"
        for root in (old, new):
            root.mkdir()
            for name in ("a.bin", "b.bin", "c.bin"):
                (root / name).write_bytes(os.urandom(100))
        _storage.upload_directory(old, uri, storage_options=storage_options)
        original = fs.get_file

        def rewriting(rpath: str, lpath: str, **kwargs: Any) -> Any:
            result = original(rpath, lpath, **kwargs)
            if rpath.endswith("a.bin"):  # the first file: someone overwrites the rest
                _storage.upload_directory(new, uri, storage_options=storage_options)
            return result

        monkeypatch.setattr(fs, "get_file", rewriting)
        with (dask.config.set({"dckpt.storage.max-concurrency": 1}),
              pytest.raises(CheckpointFormatError, match="rewritten or deleted while it "
                                                         "was being downloaded")):
            _storage.download_directory(uri, out, storage_options=storage_options)

    # ------------------------------------------------------------------ file modes

    def test_file_modes_survive(self, tmp_path, uri, storage_options, out):
        src = tmp_path / "modes"
        src.mkdir()
        for name, mode in MODES.items():
            (src / name).write_text(name)
            (src / name).chmod(mode)
        _storage.upload_directory(src, uri, storage_options=storage_options)
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert modes_of(out) == MODES

    def test_format_1_manifest_is_still_read(self, tmp_path, uri, raw_fs,
                                             storage_options, out):
        raw_fs.pipe_file(f"{uri}/model.bin", b"weights")
        v1 = {"format_version": 1, "files": {"model.bin": 7}, "dirs": []}
        raw_fs.pipe_file(f"{uri}/{COMMIT_MARKER}", json.dumps(v1).encode())
        assert _storage.list_files(uri, storage_options=storage_options) == {"model.bin": 7}
        version = _storage.uri_version(uri, storage_options=storage_options)
        assert _storage.uri_version(uri, storage_options=storage_options) == version
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert read_tree(out) == {"model.bin": b"weights"}
        # Overwriting it keeps it readable until the switch, like any committed one.
        _storage.upload_directory(build_tree(tmp_path / "t"), uri,
                                 storage_options=storage_options)
        assert _storage.uri_version(uri, storage_options=storage_options) != version
        raw_fs.invalidate_cache()
        assert not raw_fs.exists(f"{uri}/model.bin")

    # ------------------------------------------------------------ back-end failures

    def test_failures_are_storage_errors_naming_the_uri(
        self, tree, uri, fs, storage_options, monkeypatch, out
    ):
        _storage.upload_directory(tree, uri, storage_options=storage_options)

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("back-end exploded")

        monkeypatch.setattr(fs, "get_file", broken)
        with pytest.raises(StorageError, match=r"cannot download the checkpoint at "
                                               r".*ckpt: RuntimeError: back-end exploded"):
            _storage.download_directory(uri, out, storage_options=storage_options)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_local_disk_is_not_a_storage_error(tmp_path, memory_uri, monkeypatch, code):
    """The node cache maps a full disk to CacheFullError: it must arrive as it is."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.bin").write_bytes(os.urandom(1000))
    _storage.upload_directory(tree, memory_uri)
    fs = fsspec.filesystem("memory")

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fs, "get_file", full)
    with pytest.raises(OSError) as info:
        _storage.download_directory(memory_uri, tmp_path / "out")
    assert info.value.errno == code and not isinstance(info.value, StorageError)


def _old_and_new_trees(tmp_path: Path) -> tuple[Path, Path]:
    """Two checkpoints that share some names (new content) and differ in others."""
    old, new = tmp_path / "old", tmp_path / "new"
    for root, tag in ((old, "old"), (new, "new")):
        (root / "sub").mkdir(parents=True)
        (root / "a.txt").write_bytes(f"{tag} a".encode())
        (root / "sub" / "b.bin").write_bytes(os.urandom(1000 if tag == "old" else 2000))
    (old / "only_old.txt").write_text("old only")
    (old / "a.txt").chmod(0o640)
    (old / "empty_dir").mkdir()
    (new / "c.txt").write_text("new only")
    (new / "sub" / "deeper").mkdir()
    (new / "sub" / "deeper" / "d.sh").write_text("#!/bin/sh\n")
    (new / "sub" / "deeper" / "d.sh").chmod(0o750)
    return old, new


def fs_prefix(fs: fsspec.AbstractFileSystem, uri: str) -> str:
    return fs._strip_protocol(uri).rstrip("/") + "/"


MODES = {"secret": 0o600, "group": 0o640, "run.sh": 0o755, "plain": 0o644,
         "read_only": 0o444, "group_exec": 0o710}


def modes_of(root: str | os.PathLike[str]) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(dirpath, name), root): stat.S_IMODE(
            os.stat(os.path.join(dirpath, name)).st_mode)
        for dirpath, _, names in os.walk(root) for name in names
    }


class FailAfter(Callback):
    """Fails the upload, as a dropped connection would, once ``n`` files are up."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Callback:
        if self.value >= self.n:
            raise ConnectionError("connection dropped mid-upload")
        return Callback()


def _calls(tree: str, uri: str, options: dict[str, Any], out: Path) -> dict[str, Any]:
    """One call of each kind of storage operation, by what its errors say it did."""
    return {
        "upload to": lambda: _storage.upload_directory(tree, uri, storage_options=options),
        "read the checkpoint at": lambda: _storage.uri_status(uri, storage_options=options),
        "download the checkpoint at": lambda: _storage.download_directory(
            uri, out, storage_options=options),
        "delete the checkpoint at": lambda: _storage.delete(uri, storage_options=options),
    }


class TestMemoryStorage(MemoryBackend, StorageContract):
    pass


class TestLocalStorage(LocalBackend, StorageContract):
    counts_bytes = False

    def test_unsafe_key_in_a_plain_listing_is_refused(self):
        pytest.skip("a local folder cannot hold a file named 'a/../../x'")


@pytest.mark.s3
class TestS3Storage(S3Backend, StorageContract):
    @pytest.mark.parametrize("plain", [False, True])
    def test_checkpoint_at_a_bucket_root_keeps_the_bucket(
        self, tree, s3_bucket, raw_fs, storage_options, out, plain
    ):
        if plain:
            raw_fs.pipe_file(f"{s3_bucket}/model.bin", b"weights")
        else:
            _storage.upload_directory(tree, s3_bucket, storage_options=storage_options)
            _storage.download_directory(s3_bucket, out, storage_options=storage_options)
            assert read_tree(out) == read_tree(tree)
        _storage.delete(s3_bucket, storage_options=storage_options)
        raw_fs.invalidate_cache()
        assert raw_fs.exists(s3_bucket)  # s3fs's rm(bucket, recursive=True) would not
        assert raw_fs.find(s3_bucket) == []

    # ------------------------------------------------- what S3 failures become

    @pytest.mark.parametrize("how", ["empty-environment", "unset-environment"])
    def test_no_credentials_is_a_storage_error(
        self, tree, uri, storage_options, monkeypatch, tmp_path, out, how
    ):
        exceptions = pytest.importorskip("botocore.exceptions")
        _storage.upload_directory(tree, uri, storage_options=storage_options)
        if how == "empty-environment":
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
        else:
            monkeypatch.delenv("AWS_ACCESS_KEY_ID")
            monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        # Nowhere else to find any: no files, no instance metadata service.
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-file"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-file"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        options = {"anon": False, "client_kwargs": storage_options["client_kwargs"],
                   "skip_instance_cache": True}
        for operation, call in _calls(tree, uri, options, out).items():
            with pytest.raises(StorageError, match=f"cannot {operation} {re.escape(uri)}: "
                                                   "NoCredentialsError") as info:
                call()
            assert isinstance(info.value.__cause__, exceptions.NoCredentialsError)
            assert isinstance(info.value, OSError)
        from dckpt import Checkpoint

        with pytest.raises(StorageError, match="NoCredentialsError"):
            Checkpoint.from_uri(uri, storage_options=options)

    def test_endpoint_nobody_listens_on_is_a_storage_error(
        self, tree, uri, storage_options, out
    ):
        exceptions = pytest.importorskip("botocore.exceptions")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))  # a free port, closed again: nobody listens
            port = sock.getsockname()[1]
        options = {**storage_options, "skip_instance_cache": True,
                   "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                     "region_name": "us-east-1"},
                   "config_kwargs": {"retries": {"max_attempts": 1}}}
        for operation, call in _calls(tree, uri, options, out).items():
            with pytest.raises(StorageError, match=f"cannot {operation} {re.escape(uri)}: "
                                                   "EndpointConnectionError") as info:
                call()
            assert isinstance(info.value.__cause__, exceptions.EndpointConnectionError)

    def test_missing_bucket_is_not_found_like_a_missing_memory_path(
        self, tree, raw_fs, storage_options, memory_uri, out
    ):
        from dckpt import Checkpoint

        bucket = f"dckpt-missing-{uuid.uuid4().hex[:12]}"
        for missing, options in ((f"s3://{bucket}/ckpt", storage_options),
                                 (f"{memory_uri}/ckpt", {})):
            for operation, call in _calls(tree, missing, options, out).items():
                if operation == "upload to":
                    continue
                with pytest.raises(CheckpointNotFoundError, match="no checkpoint at") as info:
                    call()
                assert type(info.value) is CheckpointNotFoundError
            with pytest.raises(CheckpointNotFoundError):
                Checkpoint.from_uri(missing, storage_options=options)
        # Writing into a bucket that does not exist: refused, and no bucket is made.
        with pytest.raises(StorageError, match=f"cannot upload to s3://{bucket}/ckpt: "
                                               ".*dckpt creates no buckets") as info:
            _storage.upload_directory(tree, f"s3://{bucket}/ckpt",
                                     storage_options=storage_options)
        assert isinstance(info.value.__cause__, FileNotFoundError)
        assert not raw_fs.exists(bucket)

    def test_a_key_that_is_file_and_folder_is_refused(self, uri, raw_fs,
                                                       storage_options, out):
        # S3 allows both "a" and "a/b"; a local directory cannot hold them.
        raw_fs.pipe_file(f"{uri}/a", b"file")
        raw_fs.pipe_file(f"{uri}/a/b", b"below")
        with pytest.raises(CheckpointFormatError, match="both a file and a folder named 'a'"):
            _storage.download_directory(uri, out, storage_options=storage_options)
        assert os.listdir(out) == []

    def test_plain_folder_with_folder_markers(self, uri, raw_fs, storage_options, out):
        # Consoles and some tools mark folders with empty objects named "d/".
        raw_fs.pipe_file(f"{uri}/d/", b"")
        raw_fs.pipe_file(f"{uri}/model.bin", b"weights")
        assert _storage.list_files(uri, storage_options=storage_options) == {"model.bin": 7}
        _storage.download_directory(uri, out, storage_options=storage_options)
        assert read_tree(out) == {"d/": None, "model.bin": b"weights"}
        _storage.delete(uri, storage_options=storage_options)
        raw_fs.invalidate_cache()
        assert raw_fs.find(uri) == []

    def test_listing_is_fresh_after_another_writer(self, uri, raw_fs, storage_options):
        """s3fs caches listings per instance; dckpt must see what others wrote since."""
        raw_fs.pipe_file(f"{uri}/one.txt", b"1")
        assert _storage.list_files(uri, storage_options=storage_options) == {"one.txt": 1}
        raw_fs.pipe_file(f"{uri}/two.txt", b"22")
        raw_fs.pipe_file(f"{uri}/{PENDING_MARKER}", b"{}")
        with pytest.raises(IncompleteCheckpointError):
            _storage.uri_status(uri, storage_options=storage_options)


# ------------------------------------------------------------------------- URIs


def test_unknown_protocol_is_named():
    with pytest.raises(CheckpointURIError,
                       match="fsspec does not know the protocol 'nosuchproto'") as info:
        _storage.resolve_uri("nosuchproto://bucket/x")
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(CheckpointURIError, match="nosuchproto"):
        _storage.uri_status("nosuchproto://bucket/x")


def test_missing_backend_names_the_package(monkeypatch):
    # As if s3fs were not installed: fsspec has not imported it and cannot.
    monkeypatch.delitem(fsspec_registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(CheckpointURIError,
                       match=r"backend for protocol 's3' is not installed; "
                             r"install it with pip install 'dckpt\[s3\]'.*s3fs") as info:
        _storage.resolve_uri("s3://bucket/x", {"anon": True})
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize(("uri", "local"), [
    ("/abs/path", True), ("relative/path", True), ("file:///abs/path", True),
    ("local:///abs/path", True), ("memory://x", False), ("s3://bucket/key", False),
])
def test_is_local_uri(uri: str, local: bool):
    assert _storage.is_local_uri(uri) is local


def test_local_path_of(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _storage.local_path_of("file:///abs/path/") == "/abs/path"
    assert _storage.local_path_of("/abs/path") == "/abs/path"
    assert _storage.local_path_of("rel/x") == str(tmp_path / "rel" / "x")
    with pytest.raises(CheckpointURIError, match="not a local path"):
        _storage.local_path_of("memory://x")


# ------------------------------------------------ one download per machine (Ray parity)

# A process that holds ``Checkpoint.from_uri(argv[1]).as_directory()`` until it reads
# a line; it reports the directory, its files and how many files it fetched itself.
_HOLDER = """
import json, os, sys
from dckpt import Checkpoint, _storage

uri, options = sys.argv[1], json.loads(sys.argv[2])
fs = _storage.resolve_uri(uri, options)[0]  # the instance dckpt uses
fetched, get_file = [], fs.get_file
fs.get_file = lambda rpath, lpath, **kw: (fetched.append(rpath), get_file(rpath, lpath, **kw))
checkpoint = Checkpoint.from_uri(uri, storage_options=options)
with checkpoint.as_directory() as directory:
    print(json.dumps({"dir": directory, "fetched": len(fetched),
                      "files": sorted(os.listdir(directory))}), flush=True)
    sys.stdin.readline()
"""


class _Holder:
    def __init__(self, uri: str, options: dict[str, Any], env: dict[str, str]) -> None:
        import subprocess

        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, uri, json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"the holder process died ({self.process.wait()})"
        self.report = json.loads(line)

    def leave(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.mark.s3
def test_processes_share_one_download_per_committed_version(
    tmp_path, s3_bucket, s3_storage_options
):
    from dckpt import Checkpoint

    uri = f"{s3_bucket}/shared"
    old, new = _old_and_new_trees(tmp_path)
    Checkpoint.from_directory(old).to_uri(uri, storage_options=s3_storage_options)
    temp = tmp_path / "machine-temp"
    env = {**os.environ, "DASK_DCKPT__TEMPORARY_DIRECTORY": str(temp)}

    first = _Holder(uri, s3_storage_options, env)
    second = _Holder(uri, s3_storage_options, env)
    # One download: the second process found the first one's directory.
    assert first.report["fetched"] == len(file_sizes(old))
    assert second.report == {**first.report, "fetched": 0}
    assert first.report["files"] == sorted(os.listdir(old))

    with dask.config.set({"dckpt.temporary-directory": str(temp)}):
        # What an object adds to the URI's content changes what it must show.
        changed = Checkpoint.from_uri(uri, storage_options=s3_storage_options)
        changed.set_metadata({"epoch": 3})
        with changed.as_directory() as directory:
            assert directory != first.report["dir"]
            assert ".dckpt.json" in os.listdir(directory)
        assert not os.path.exists(directory)
        # A new commit at the URI is never served from the old download.
        Checkpoint.from_directory(new).to_uri(uri, storage_options=s3_storage_options)
    third = _Holder(uri, s3_storage_options, env)
    assert third.report["dir"] != first.report["dir"]
    assert third.report["files"] == sorted(os.listdir(new))
    assert third.report["fetched"] == len(file_sizes(new))

    second.leave()
    assert os.path.isdir(first.report["dir"])  # the first one is still in there
    first.leave()
    third.leave()
    # The last user out removed everything, lock files and user markers included.
    assert os.listdir(temp) == []
