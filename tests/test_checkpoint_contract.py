"""The round-trip contract of ``Checkpoint``, written once and bound to every
representation (dict, directory, bytes, file:// and memory:// URIs, S3, pickle) and to
every ordered pair of them, in the way fsspec's ``tests/abstract`` binds one contract to
many filesystems.
"""

from __future__ import annotations

import itertools
import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from dckpt import Checkpoint
from dckpt._formats.layout import CONTROL_FILES, RESERVED_KEY
from tests._trees import make_tree, read_tree

# A "hop" turns a checkpoint into another representation and reads it back through the
# base class (so that subclass casting is exercised on every hop).
Hop = Callable[[Checkpoint, "Places"], Checkpoint]


class Places:
    """Where hops may write: a fresh local folder and URI prefixes per test."""

    def __init__(self, tmp_path: Path, memory_uri: str, s3: tuple[str, dict] | None):
        self.tmp_path = tmp_path
        self.memory_uri = memory_uri
        self.s3 = s3

    def fresh_dir(self) -> str:
        return str(self.tmp_path / f"hop-{uuid.uuid4().hex[:8]}")

    def fresh_memory_uri(self) -> str:
        return f"{self.memory_uri}/hop-{uuid.uuid4().hex[:8]}"


def via_dict(c: Checkpoint, places: Places) -> Checkpoint:
    return Checkpoint.from_dict(c.to_dict())


def via_directory(c: Checkpoint, places: Places) -> Checkpoint:
    return Checkpoint.from_directory(c.to_directory(places.fresh_dir()))


def via_default_directory(c: Checkpoint, places: Places) -> Checkpoint:
    # to_directory() without a path: a new temporary directory the caller owns.
    path = c.to_directory()
    target = places.fresh_dir()
    os.rename(path, target)
    return Checkpoint.from_directory(target)


def via_bytes(c: Checkpoint, places: Places) -> Checkpoint:
    return Checkpoint.from_bytes(c.to_bytes())


def via_file_uri(c: Checkpoint, places: Places) -> Checkpoint:
    return Checkpoint.from_uri(c.to_uri(f"file://{places.fresh_dir()}"))


def via_memory_uri(c: Checkpoint, places: Places) -> Checkpoint:
    return Checkpoint.from_uri(c.to_uri(places.fresh_memory_uri()))


def via_pickle(c: Checkpoint, places: Places) -> Checkpoint:
    return pickle.loads(pickle.dumps(c))


def via_cloudpickle(c: Checkpoint, places: Places) -> Checkpoint:
    return pickle.loads(cloudpickle.dumps(c))


def via_s3(c: Checkpoint, places: Places) -> Checkpoint:
    assert places.s3 is not None
    bucket, options = places.s3
    uri = f"{bucket}/hop-{uuid.uuid4().hex[:8]}"
    return Checkpoint.from_uri(
        c.to_uri(uri, storage_options=options), storage_options=options
    )


HOPS: dict[str, Hop] = {
    "dict": via_dict,
    "directory": via_directory,
    "default_directory": via_default_directory,
    "bytes": via_bytes,
    "file_uri": via_file_uri,
    "memory_uri": via_memory_uri,
    "pickle": via_pickle,
    "cloudpickle": via_cloudpickle,
}
SINGLE = [[name] for name in HOPS]
PAIRS = [list(pair) for pair in itertools.product(HOPS, repeat=2)]


class Preprocessor:
    """A stand-in for a fitted preprocessor: any picklable object."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocessor) and other.scale == self.scale


class ModelCheckpoint(Checkpoint):
    """A framework checkpoint that carries an attribute with its data."""

    _SERIALIZED_ATTRS = ("framework", "epoch")


class OtherCheckpoint(Checkpoint):
    _SERIALIZED_ATTRS = ("other",)


USER_DICT = {
    "weights": bytes(range(256)) * 40,
    "step": 7,
    "nested": {"lr": 0.1, "layers": [1, 2, 3]},
    3: "non-string key",
    "preprocessor_like": Preprocessor(2.0),
}


# Hops through an object store, which holds files only: links arrive as what they
# point to (dckpt._storage uploads follow them).
OBJECT_STORE_HOPS = {"memory_uri", "s3"}


def make_linked_tree(root: Path) -> str:
    """make_tree plus relative links inside the tree, to a file, up and to a folder."""
    make_tree(root)
    (root / "latest").symlink_to("model/weights.bin")
    (root / "model" / "layers" / "up").symlink_to("../../notes.txt")
    (root / "current").symlink_to("model")
    return str(root)


def read_links(root: str | os.PathLike[str]) -> dict[str, str]:
    """``relpath -> link target`` of every symlink below ``root``."""
    links = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                links[os.path.relpath(path, root)] = os.readlink(path)
    return links


class RoundTripContract:
    """Everything Ray documents about round trips, for a chain of hops."""

    hops: list[str]

    @pytest.fixture
    def travel(self, tmp_path, memory_uri, request) -> Callable[[Checkpoint], Checkpoint]:
        s3 = None
        if any(name == "s3" for name in self.hops):
            s3 = (request.getfixturevalue("s3_bucket"),
                  request.getfixturevalue("s3_storage_options"))
        places = Places(tmp_path, memory_uri, s3)

        def travel(checkpoint: Checkpoint) -> Checkpoint:
            for name in self.hops:
                checkpoint = ALL_HOPS[name](checkpoint, places)
            return checkpoint

        return travel

    def test_dict_comes_back(self, travel):
        assert travel(Checkpoint.from_dict(USER_DICT)).to_dict() == USER_DICT

    def test_directory_comes_back_exactly(self, tmp_path, travel):
        source = make_tree(tmp_path / "source")
        out = travel(Checkpoint.from_directory(source)).to_directory(tmp_path / "out")
        assert read_tree(out) == read_tree(source)

    def test_keys_added_to_a_directory_checkpoints_dict_survive(self, tmp_path, travel):
        source = make_tree(tmp_path / "source")
        data = Checkpoint.from_directory(source).to_dict()
        data["added"] = {"by": "user"}
        back = travel(Checkpoint.from_dict(data))
        # ... through a directory, as Ray documents, and then whatever the hops were.
        again = Checkpoint.from_directory(back.to_directory(tmp_path / "again"))
        assert again.to_dict()["added"] == {"by": "user"}
        tree = read_tree(tmp_path / "again")
        assert {k: v for k, v in tree.items() if k not in CONTROL_FILES} == read_tree(source)

    def test_files_added_to_a_dict_checkpoints_directory_survive(self, tmp_path, travel):
        path = Checkpoint.from_dict(USER_DICT).to_directory(tmp_path / "dict")
        (Path(path) / "added.txt").write_text("added on the way")
        (Path(path) / "sub").mkdir()
        (Path(path) / "sub" / "more.bin").write_bytes(b"\x00\x01")
        back = travel(Checkpoint.from_directory(path))
        data = back.to_dict()
        assert {k: v for k, v in data.items() if k != RESERVED_KEY} == USER_DICT
        out = Path(back.to_directory(tmp_path / "out"))
        assert (out / "added.txt").read_text() == "added on the way"
        assert (out / "sub" / "more.bin").read_bytes() == b"\x00\x01"
        assert Checkpoint.from_directory(out).to_dict() == data

    def test_preprocessor_travels(self, tmp_path, travel):
        for start in (Checkpoint.from_dict({"x": 1}),
                      Checkpoint.from_directory(make_tree(tmp_path / "source"))):
            start.set_preprocessor(Preprocessor(3.0))
            back = travel(start)
            assert back.get_preprocessor() == Preprocessor(3.0)
            assert back.to_dict()["_preprocessor"] == Preprocessor(3.0)

    def test_metadata_travels(self, tmp_path, travel):
        for start in (Checkpoint.from_dict({"x": 1}),
                      Checkpoint.from_directory(make_tree(tmp_path / "source"))):
            start.set_metadata({"epoch": 3, "metrics": {"loss": 0.25}})
            start.update_metadata({"note": "best"})
            back = travel(start)
            assert back.get_metadata() == {
                "epoch": 3, "metrics": {"loss": 0.25}, "note": "best"
            }

    def test_subclass_and_its_attributes_travel(self, tmp_path, travel):
        start = ModelCheckpoint.from_dict({"x": 1})
        start.framework, start.epoch = "numpy", 12
        back = travel(start)
        assert type(back) is ModelCheckpoint
        assert (back.framework, back.epoch) == ("numpy", 12)
        assert back.to_dict()["x"] == 1

    def test_links_inside_the_tree_stay_links_from_any_working_directory(
        self, tmp_path, travel, monkeypatch
    ):
        source = make_linked_tree(tmp_path / "source")
        elsewhere = tmp_path / "elsewhere"  # not the source: relative links dangle here
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        out = travel(Checkpoint.from_directory(source)).to_directory(tmp_path / "out")
        assert read_tree(out, follow_links=True) == read_tree(source, follow_links=True)
        if not set(self.hops) & OBJECT_STORE_HOPS:  # object stores hold no links
            assert read_links(out) == read_links(source)

    def test_plain_checkpoint_carries_no_reserved_key(self, travel):
        data = travel(Checkpoint.from_dict({"x": 1})).to_dict()
        assert data == {"x": 1}


ALL_HOPS: dict[str, Hop] = {**HOPS, "s3": via_s3}


def _bind(hop_lists: list[list[str]], prefix: str, marks: tuple = ()) -> None:
    for hops in hop_lists:
        name = f"Test{prefix}_" + "_then_".join(hops)
        attrs: dict[str, Any] = {"hops": hops}
        cls = type(name, (RoundTripContract,), attrs)
        for mark in marks:
            cls = mark(cls)
        globals()[name] = cls


_bind(SINGLE, "Via")
_bind(PAIRS, "Chain")
_bind([["s3"], ["s3", "bytes"], ["dict", "s3"]], "S3", marks=(pytest.mark.s3,))
