"""The directories a store serves and their index on the node's disk, without a cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dckpt._transfer import build_manifest
from dckpt.cluster._served import INDEX_NAME, ServedDirectories
from dckpt.errors import CheckpointNotFoundError


def _directory(path: Path, data: bytes) -> str:
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(data)
    return str(path)


def test_a_registration_is_served_under_its_content_id_and_outlives_the_process(tmp_path: Path):
    index = tmp_path / "served"
    path = _directory(tmp_path / "a", b"weights")
    served = ServedDirectories(str(index))
    registration = served.add(path, ("file:///persisted",))
    assert registration.checkpoint_id == build_manifest(path).content_id
    assert served.get(registration.checkpoint_id).path == os.path.realpath(path)

    after_restart = ServedDirectories(str(index))  # a new worker process of the node
    with pytest.raises(PermissionError, match="not registered"):
        after_restart.get(registration.checkpoint_id)
    [restored] = after_restart.restore()
    assert restored == registration and restored.restored
    assert restored.uris == ("file:///persisted",)


def test_what_is_gone_or_changed_is_not_served_again(tmp_path: Path):
    index = tmp_path / "served"
    served = ServedDirectories(str(index))
    gone = served.add(_directory(tmp_path / "gone", b"one"))
    changed_path = _directory(tmp_path / "changed", b"two")
    changed = served.add(changed_path)
    kept = served.add(_directory(tmp_path / "kept", b"three"))
    (tmp_path / "gone" / "weights.bin").unlink()
    (tmp_path / "gone").rmdir()
    (Path(changed_path) / "weights.bin").write_bytes(b"TWO")
    after_restart = ServedDirectories(str(index))
    assert [r.checkpoint_id for r in after_restart.restore()] == [kept.checkpoint_id]
    entries = json.loads((index / INDEX_NAME).read_text())["entries"]
    assert set(entries) == {kept.checkpoint_id}
    assert gone.checkpoint_id not in entries and changed.checkpoint_id not in entries


def test_a_directory_registered_again_with_other_content_has_only_its_new_id(tmp_path: Path):
    served = ServedDirectories(str(tmp_path / "served"))
    path = _directory(tmp_path / "a", b"before")
    old = served.add(path)
    (Path(path) / "weights.bin").write_bytes(b"after!")
    new = served.add(path)
    assert new.checkpoint_id != old.checkpoint_id
    assert served.ids() == [new.checkpoint_id]
    assert served.remove(new.checkpoint_id) == new and served.ids() == []
    assert ServedDirectories(str(tmp_path / "served")).restore() == []


def test_an_unusable_index_starts_afresh_and_a_missing_directory_is_refused(tmp_path: Path):
    index = tmp_path / "served"
    index.mkdir()
    (index / INDEX_NAME).write_text("{not json")
    served = ServedDirectories(str(index))
    assert served.restore() == []
    with pytest.raises(CheckpointNotFoundError, match="not a directory"):
        served.add(str(tmp_path / "nowhere"))


def test_a_registered_directory_that_is_gone_is_not_served(tmp_path: Path):
    served = ServedDirectories(str(tmp_path / "served"))
    path = _directory(tmp_path / "a", b"weights")
    registration = served.add(path)
    (Path(path) / "weights.bin").unlink()
    os.rmdir(path)
    with pytest.raises(CheckpointNotFoundError, match="which is gone"):
        served.get(registration.checkpoint_id)
    assert served.find(registration.checkpoint_id) is None and served.ids() == []
    assert ServedDirectories(str(tmp_path / "served")).restore() == []
