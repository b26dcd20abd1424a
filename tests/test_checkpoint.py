"""``Checkpoint``'s API one method at a time: representations, casting, errors."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import dask.config
import fsspec
import pytest

import dckpt
from dckpt import (
    Checkpoint,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointURIError,
    IncompatibleCheckpointError,
    _node,
)
from dckpt._checkpoint import node_ref_of, source_of, with_node_ref
from dckpt._formats.layout import HEADER_FILE, RESERVED_KEY
from dckpt._sources import DictData, LocalDirectory, NodeReference, UriFolder
from dckpt.cluster._core import CheckpointId, NodeRef
from tests._trees import make_tree, read_tree
from tests.test_checkpoint_contract import (
    ModelCheckpoint,
    OtherCheckpoint,
    Preprocessor,
)


def test_the_example_from_the_issue():
    checkpoint = Checkpoint.from_dict({"data": 123})
    path = checkpoint.to_directory()
    try:
        assert Checkpoint.from_directory(path).to_dict() == {"data": 123}
    finally:
        import shutil

        shutil.rmtree(path)


def test_from_dict_copies_and_never_changes_the_callers_dict():
    data = {"a": [1, 2]}
    checkpoint = Checkpoint.from_dict(data)
    checkpoint.set_preprocessor(Preprocessor(1.0))
    checkpoint.set_metadata({"m": 1})
    data["b"] = 2
    assert data == {"a": [1, 2], "b": 2}
    out = checkpoint.to_dict()
    assert "b" not in out
    out["c"] = 3  # the result is the caller's to change
    assert "c" not in checkpoint.to_dict()


def test_reserved_key_is_present_only_when_something_must_travel():
    assert RESERVED_KEY not in Checkpoint.from_dict({"x": 1}).to_dict()
    with_metadata = Checkpoint.from_dict({"x": 1})
    with_metadata.set_metadata({"k": "v"})
    assert with_metadata.to_dict()[RESERVED_KEY] == {"metadata": {"k": "v"}}


def test_internal_representation_and_uri(tmp_path, memory_uri):
    d = Checkpoint.from_dict({"x": 1})
    assert d.get_internal_representation() == ("data_dict", {"x": 1})
    assert d.uri is None

    local = Checkpoint.from_directory(make_tree(tmp_path / "t"))
    assert local.get_internal_representation() == ("local_path", str(tmp_path / "t"))
    assert local.uri == f"file://{tmp_path / 't'}"

    remote = Checkpoint.from_uri(d.to_uri(f"{memory_uri}/c"))
    assert remote.get_internal_representation() == ("uri", f"{memory_uri}/c")
    assert remote.uri == f"{memory_uri}/c"


def test_file_uris_and_plain_paths_give_directory_checkpoints(tmp_path):
    path = make_tree(tmp_path / "t")
    for uri in (f"file://{path}", path):
        checkpoint = Checkpoint.from_uri(uri)
        assert checkpoint.get_internal_representation() == ("local_path", path)
    assert Checkpoint(uri=f"file://{path}").get_internal_representation()[0] == "local_path"


def test_raw_constructor_takes_exactly_one_representation(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        Checkpoint()
    with pytest.raises(ValueError, match="exactly one"):
        Checkpoint(local_path=str(tmp_path), data_dict={"a": 1})


def test_fspath_is_refused():
    with pytest.raises(TypeError, match="not a path"):
        os.fspath(Checkpoint.from_dict({"x": 1}))


def test_repr_is_short_whatever_the_size(tmp_path):
    huge = Checkpoint.from_dict({i: b"x" * 1000 for i in range(10_000)})
    assert repr(huge) == "Checkpoint(data_dict={...10000 keys})"
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    assert len(repr(Checkpoint.from_directory(deep))) < 200
    assert repr(ModelCheckpoint.from_dict({})).startswith("ModelCheckpoint(")


def test_preprocessor_of_each_representation(tmp_path, memory_uri):
    assert Checkpoint.from_dict({"x": 1}).get_preprocessor() is None
    d = Checkpoint.from_dict({"_preprocessor": Preprocessor(5.0)})
    assert d.get_preprocessor() == Preprocessor(5.0)
    path = Path(d.to_directory(tmp_path / "d"))
    assert (path / "_preprocessor").is_file()  # a file of that name in a directory
    assert Checkpoint.from_directory(path).get_preprocessor() == Preprocessor(5.0)
    uri = d.to_uri(f"{memory_uri}/p")
    assert Checkpoint.from_uri(uri).get_preprocessor() == Preprocessor(5.0)
    # set_preprocessor overrides what is stored, without touching the source
    local = Checkpoint.from_directory(path)
    local.set_preprocessor(Preprocessor(6.0))
    assert local.get_preprocessor() == Preprocessor(6.0)
    assert Checkpoint.from_directory(path).get_preprocessor() == Preprocessor(5.0)


def test_metadata_is_json_readable_without_unpickling(tmp_path):
    import json

    checkpoint = ModelCheckpoint.from_dict({"x": 1})
    checkpoint.framework = "numpy"
    checkpoint.set_metadata({"epoch": 2})
    path = Path(checkpoint.to_directory(tmp_path / "c"))
    header = json.loads((path / HEADER_FILE).read_text())
    assert header["metadata"] == {"epoch": 2}
    assert header["checkpoint_class"].endswith(":ModelCheckpoint")
    assert header["format_version"] == 1


def test_metadata_must_be_json_serialisable():
    checkpoint = Checkpoint.from_dict({"x": 1})
    with pytest.raises(TypeError, match="JSON"):
        checkpoint.set_metadata({"bad": object()})
    with pytest.raises(TypeError, match="JSON"):
        checkpoint.update_metadata({"bad": {1, 2}})
    assert checkpoint.get_metadata() == {}
    returned = checkpoint.get_metadata()
    returned["changed"] = True
    assert checkpoint.get_metadata() == {}


class TestSubclassCasting:
    def _saved_as_other(self) -> dict:
        other = OtherCheckpoint.from_dict({"x": 1})
        other.other = 1
        return other.to_dict()

    def test_base_class_loads_a_subclass_as_the_subclass(self, tmp_path):
        model = ModelCheckpoint.from_dict({"x": 1})
        model.framework = "f"
        for loaded in (
            Checkpoint.from_dict(model.to_dict()),
            Checkpoint.from_bytes(model.to_bytes()),
            Checkpoint.from_directory(model.to_directory(tmp_path / "m")),
        ):
            assert type(loaded) is ModelCheckpoint and loaded.framework == "f"

    def test_subclass_loads_base_class_data_as_itself(self, tmp_path):
        plain = Checkpoint.from_dict({"x": 1})
        assert type(ModelCheckpoint.from_dict(plain.to_dict())) is ModelCheckpoint
        path = plain.to_directory(tmp_path / "p")
        assert type(ModelCheckpoint.from_directory(path)) is ModelCheckpoint

    def test_unrelated_classes_are_refused(self, tmp_path, memory_uri):
        data = self._saved_as_other()
        saved = OtherCheckpoint.from_dict(data)
        with pytest.raises(ValueError, match="OtherCheckpoint.*not compatible.*ModelCheckpoint"):
            ModelCheckpoint.from_dict(data)
        with pytest.raises(IncompatibleCheckpointError):
            ModelCheckpoint.from_bytes(saved.to_bytes())
        with pytest.raises(IncompatibleCheckpointError):
            ModelCheckpoint.from_directory(saved.to_directory(tmp_path / "o"))
        with pytest.raises(IncompatibleCheckpointError):
            ModelCheckpoint.from_uri(saved.to_uri(f"{memory_uri}/o"))

    def test_from_checkpoint_converts_and_keeps_data(self, tmp_path):
        plain = Checkpoint.from_directory(make_tree(tmp_path / "t"))
        plain.set_metadata({"a": 1})
        model = ModelCheckpoint.from_checkpoint(plain)
        assert type(model) is ModelCheckpoint
        assert model.get_internal_representation() == plain.get_internal_representation()
        assert model.get_metadata() == {"a": 1}
        assert ModelCheckpoint.from_checkpoint(model) is model

    def test_a_class_that_cannot_be_imported_is_a_clear_error(self):
        data = {"x": 1, RESERVED_KEY: {"class": "no_such_module_xyz:Ckpt"}}
        with pytest.raises(CheckpointFormatError, match="cannot be imported"):
            Checkpoint.from_dict(data)


class _StubCheckpoint(Checkpoint):
    """A subclass that sets attributes in ``__init__``, as Ray code does: a default
    for its serialized ``epoch``, a lock, and a cache for a loaded model."""

    _SERIALIZED_ATTRS = ("epoch",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.foo = "set by __init__"
        self.epoch = 0
        self.lock = threading.Lock()
        self.model = None


def _fake_node_ref() -> NodeRef:
    return NodeRef(node_id="node-x", path="/nowhere/ckpt", checkpoint_id=CheckpointId("c" * 16),
                   size=10, digest="d" * 16, store_address="tcp://127.0.0.1:1")


class TestSubclassConstructor:
    @pytest.mark.parametrize("kind", ["dict", "directory", "uri", "node_ref"])
    def test_from_checkpoint_builds_through_the_subclass_constructor(
        self, tmp_path, memory_uri, kind
    ):
        other = {
            "dict": lambda: Checkpoint.from_dict({"x": 1}),
            "directory": lambda: Checkpoint.from_directory(make_tree(tmp_path / "t")),
            "uri": lambda: Checkpoint.from_uri(
                Checkpoint.from_dict({"x": 1}).to_uri(f"{memory_uri}/c")),
            "node_ref": lambda: with_node_ref(Checkpoint.from_dict({}), _fake_node_ref()),
        }[kind]()
        other.set_metadata({"m": 1})
        stub = _StubCheckpoint.from_checkpoint(other)
        assert type(stub) is _StubCheckpoint
        assert stub.foo == "set by __init__" and stub.model is None
        def shown(checkpoint):  # a dict's reserved key names its class: leave it out
            kind, value = checkpoint.get_internal_representation()
            if kind == "data_dict":
                value = {k: v for k, v in value.items() if k != RESERVED_KEY}
            return kind, value

        assert shown(stub) == shown(other)
        assert stub.get_metadata() == {"m": 1}

    def test_serialized_attrs_set_after_init_survive_every_constructor(self, tmp_path):
        stub = _StubCheckpoint.from_dict({"x": 1})
        stub.epoch = 5
        assert _StubCheckpoint.from_checkpoint(Checkpoint.from_dict({"x": 1})).epoch == 0
        for back in (Checkpoint.from_dict(stub.to_dict()),
                     Checkpoint.from_bytes(stub.to_bytes()),
                     Checkpoint.from_directory(stub.to_directory(tmp_path / "d")),
                     pickle.loads(pickle.dumps(stub))):
            assert type(back) is _StubCheckpoint and back.epoch == 5

    def test_pickling_carries_only_serialized_attrs_and_reruns_init(self, tmp_path, memory_uri):
        starts = [
            _StubCheckpoint.from_dict({"x": 1}),
            _StubCheckpoint.from_directory(
                Checkpoint.from_dict({"x": 1}).to_directory(tmp_path / "d")),
            _StubCheckpoint.from_uri(Checkpoint.from_dict({"x": 1}).to_uri(f"{memory_uri}/u")),
        ]
        for stub in starts:
            stub.epoch = 7
            stub.model = threading.Lock()  # what a cache may hold: it cannot be pickled
            stub.extra = "set later, not serialized"
            back = pickle.loads(pickle.dumps(stub))
            assert type(back) is _StubCheckpoint and back.epoch == 7
            assert back.foo == "set by __init__" and back.model is None
            assert not hasattr(back, "extra")
            assert back.lock is not stub.lock
            with back.lock:
                assert back.to_dict()["x"] == 1
            # The other representations write only the _SERIALIZED_ATTRS too.
            for again in (Checkpoint.from_bytes(stub.to_bytes()),
                          Checkpoint.from_directory(stub.to_directory(tmp_path / "again"))):
                assert again.epoch == 7 and again.model is None


def _ref_to_here(path: str) -> NodeRef:
    """A reference to ``path`` made on this node, as a worker here would make it."""
    return NodeRef(node_id=_node.node_id(), path=path,
                   checkpoint_id=CheckpointId("e" * 16), size=1, digest="f" * 16,
                   store_address="tcp://127.0.0.1:1")


class TestSources:
    """One source per checkpoint (dckpt._sources), read through the developer API."""

    def test_source_of_reports_each_representation(self, tmp_path, memory_uri):
        assert source_of(Checkpoint.from_dict({"x": 1})) == DictData({"x": 1}, None)
        tree = make_tree(tmp_path / "t")
        assert source_of(Checkpoint.from_directory(tree)) == LocalDirectory(tree)
        # Files added to the directory of a dict checkpoint: packed beside the dict.
        with_files = source_of(Checkpoint.from_dict(Checkpoint.from_directory(tree).to_dict()))
        assert isinstance(with_files, DictData) and with_files.files
        assert RESERVED_KEY not in with_files.data
        uri = Checkpoint.from_dict({"x": 1}).to_uri(f"{memory_uri}/c")
        assert source_of(Checkpoint.from_uri(uri)) == UriFolder(uri, {})
        ref = _fake_node_ref()
        moved = with_node_ref(Checkpoint.from_dict({}), ref)
        assert source_of(moved) == NodeReference(ref)
        assert node_ref_of(moved) is ref
        assert node_ref_of(Checkpoint.from_directory(tree)) is None

    def test_to_uri_records_where_each_source_was_persisted(self, tmp_path, memory_uri):
        first, second = f"{memory_uri}/first", f"{memory_uri}/second"
        for checkpoint in (Checkpoint.from_dict({"x": 1}),
                           Checkpoint.from_directory(make_tree(tmp_path / "t"))):
            checkpoint.to_uri(first)
            checkpoint.to_uri(second)
            checkpoint.to_uri(first)  # again: recorded once
            assert source_of(checkpoint).uris == (first, second)

    def test_with_node_ref_keeps_class_metadata_preprocessor_and_state(self):
        stub = _StubCheckpoint.from_dict({"x": 1})
        stub.epoch = 3
        stub.model = "a loaded model"  # not serialized: __init__'s value in the copy
        stub.set_metadata({"m": 1})
        stub.set_preprocessor(Preprocessor(2.0))
        ref = _fake_node_ref()
        moved = with_node_ref(stub, ref)
        assert type(moved) is _StubCheckpoint and moved is not stub
        assert moved.epoch == 3 and moved.model is None and moved.foo == "set by __init__"
        assert moved.get_metadata() == {"m": 1}
        assert moved.get_preprocessor() == Preprocessor(2.0)  # read without the data
        assert moved.get_internal_representation() == ("node_ref", ref)
        assert source_of(stub) == DictData({"x": 1}, None)  # the original is unchanged

    def test_a_node_reference_used_here_pickles_as_the_reference_alone(
        self, tmp_path, memory_uri
    ):
        tree = make_tree(tmp_path / "t")
        ref = _ref_to_here(tree)
        checkpoint = with_node_ref(Checkpoint.from_dict({}), ref)
        assert checkpoint.get_internal_representation() == ("node_ref", ref)
        with checkpoint.as_directory() as directory:  # same node: found where it is
            assert directory == tree
        assert source_of(checkpoint) == NodeReference(ref, path=tree)
        assert checkpoint.get_internal_representation() == ("local_path", tree)
        uri = checkpoint.to_uri(f"{memory_uri}/persisted")
        persisted = dataclasses.replace(ref, uris=(uri,))
        assert node_ref_of(checkpoint) == persisted  # merged into the reference

        state = checkpoint.__getstate__()
        assert state["_source"] == NodeReference(persisted)
        assert state["_source"].path is None  # a path of this node means nothing elsewhere
        back = pickle.loads(pickle.dumps(checkpoint))
        assert source_of(back) == NodeReference(persisted)
        assert read_tree(back.to_directory(tmp_path / "back")) == read_tree(tree)

    def test_a_pickled_node_reference_never_carries_its_path(self):
        ref = _fake_node_ref()
        found = NodeReference(ref, path="/only/on/this/node")
        blob = pickle.dumps(found)
        assert b"/only/on/this/node" not in blob
        assert pickle.loads(blob) == NodeReference(ref)

    def test_repr_of_a_dict_source_is_bounded(self):
        source = source_of(Checkpoint.from_dict({i: "x" * 1000 for i in range(1000)}))
        assert len(repr(source)) < 100


class TestAsDirectory:
    def test_own_directory_is_yielded_and_never_deleted(self, tmp_path):
        path = make_tree(tmp_path / "t")
        with Checkpoint.from_directory(path).as_directory() as directory:
            assert directory == path
        assert os.path.isdir(path)

    def test_temporary_directory_is_removed_after_the_last_user(self, tmp_path):
        checkpoint = Checkpoint.from_dict({"x": 1})
        with dask_temporary_directory(tmp_path):
            with checkpoint.as_directory() as outer:
                with checkpoint.as_directory() as inner:
                    assert inner == outer
                assert os.path.exists(os.path.join(outer, "dict_checkpoint.pkl"))
            assert not os.path.exists(outer)
            assert os.listdir(tmp_path) == []  # no lock file, no marker left behind

    def test_an_error_inside_the_block_still_cleans_up(self, tmp_path):
        with dask_temporary_directory(tmp_path):
            with pytest.raises(RuntimeError):
                with Checkpoint.from_dict({"x": 1}).as_directory():
                    raise RuntimeError("boom")
            assert os.listdir(tmp_path) == []

    def test_two_processes_share_it_and_the_last_one_removes_it(self, tmp_path):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        checkpoint = Checkpoint.from_dict({"x": 1})
        blob = pickle.dumps(checkpoint)
        entered = [ctx.Event(), ctx.Event()]
        leave = [ctx.Event(), ctx.Event()]
        paths = ctx.Queue()
        procs = [
            ctx.Process(target=_hold_directory,
                        args=(blob, str(tmp_path), entered[i], leave[i], paths))
            for i in range(2)
        ]
        for p in procs:
            p.start()
        try:
            for event in entered:
                assert event.wait(60)
            first, second = paths.get(timeout=10), paths.get(timeout=10)
            assert first == second and os.path.isdir(first)
            leave[0].set()
            procs[0].join(60)
            assert procs[0].exitcode == 0
            assert os.path.isdir(first), "removed while the other process still uses it"
            leave[1].set()
            procs[1].join(60)
            assert procs[1].exitcode == 0
            assert not os.path.exists(first)
            assert os.listdir(tmp_path) == []
        finally:
            for event in leave:
                event.set()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()

    def test_a_dead_users_marker_does_not_keep_the_directory(self, tmp_path):
        import subprocess

        checkpoint = Checkpoint.from_dict({"x": 1})
        with dask_temporary_directory(tmp_path):
            with checkpoint.as_directory() as directory:
                dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                      capture_output=True, text=True, check=True)
                marker = Path(f"{directory}.users") / f"{dead.stdout.strip()}.deadbeef"
                marker.touch()
            assert not os.path.exists(directory)


def _hold_directory(blob, temporary, entered, leave, paths):
    import dask.config

    with dask.config.set({"dckpt.temporary-directory": temporary}):
        checkpoint = pickle.loads(blob)
        with checkpoint.as_directory() as directory:
            assert Checkpoint.from_directory(directory).to_dict() == {"x": 1}
            paths.put(directory)
            entered.set()
            leave.wait(60)


def dask_temporary_directory(path):
    import dask.config

    return dask.config.set({"dckpt.temporary-directory": str(path)})


def test_links_leading_out_are_followed_and_dangling_ones_skipped(
    tmp_path, monkeypatch, caplog
):
    """The symlink policy of every representation (dckpt._formats._tree), from a
    working directory that is not the source's."""
    import logging

    (tmp_path / "outside.txt").write_text("outside")
    source = Path(make_tree(tmp_path / "t"))
    (source / "relative_out").symlink_to("../outside.txt")
    (source / "absolute_out").symlink_to(tmp_path / "outside.txt")
    (source / "dangling_out").symlink_to("../nowhere")
    (source / "dangling_in").symlink_to("missing")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    checkpoint = Checkpoint.from_directory(source)
    with caplog.at_level(logging.WARNING, logger="dckpt._formats._tree"):
        outs = [
            checkpoint.to_directory(tmp_path / "dir"),
            checkpoint.to_uri(f"file://{tmp_path / 'uri'}").removeprefix("file://"),
            Checkpoint.from_bytes(checkpoint.to_bytes()).to_directory(tmp_path / "bytes"),
            Checkpoint.from_dict(checkpoint.to_dict()).to_directory(tmp_path / "dict"),
        ]
    for out in map(Path, outs):
        for name in ("relative_out", "absolute_out"):  # followed, as Ray's copytree does
            assert not (out / name).is_symlink() and (out / name).read_text() == "outside"
        assert not os.path.lexists(out / "dangling_out")
        assert os.readlink(out / "dangling_in") == "missing"  # inside: kept as it is
    assert "dangling symlink" in caplog.text


class TestPickling:
    def test_dict_and_uri_checkpoints_keep_their_representation(self, memory_uri):
        d = Checkpoint.from_dict({"x": 1})
        assert pickle.loads(pickle.dumps(d)).get_internal_representation()[0] == "data_dict"
        u = Checkpoint.from_uri(d.to_uri(f"{memory_uri}/u"))
        back = pickle.loads(pickle.dumps(u))
        assert back.get_internal_representation() == ("uri", f"{memory_uri}/u")

    def test_directory_checkpoint_travels_as_its_data(self, tmp_path):
        source = make_tree(tmp_path / "t")
        blob = pickle.dumps(Checkpoint.from_directory(source))
        back = pickle.loads(blob)
        assert back.get_internal_representation()[0] == "data_dict"
        assert read_tree(back.to_directory(tmp_path / "out")) == read_tree(source)

    def test_a_pickled_directory_checkpoint_works_in_another_process(self, tmp_path):
        import subprocess

        source = make_tree(tmp_path / "t")
        blob = tmp_path / "ckpt.pkl"
        blob.write_bytes(pickle.dumps(Checkpoint.from_directory(source)))
        import shutil

        moved = tmp_path / "moved"
        shutil.move(source, moved)  # the original path no longer exists
        code = (
            "import pickle, sys; c = pickle.load(open(sys.argv[1], 'rb'));"
            "print(c.to_directory(sys.argv[2]))"
        )
        subprocess.run([sys.executable, "-c", code, str(blob), str(tmp_path / "out")],
                       check=True, cwd=Path(__file__).parent.parent)
        assert read_tree(tmp_path / "out") == read_tree(moved)


class TestBadInput:
    def test_missing_directory(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            Checkpoint.from_directory(tmp_path / "missing")
        with pytest.raises(CheckpointNotFoundError):
            Checkpoint(local_path=tmp_path / "missing")

    def test_a_file_is_not_a_directory(self, tmp_path):
        (tmp_path / "f").write_text("x")
        with pytest.raises(NotADirectoryError, match="enclosing|holds it"):
            Checkpoint.from_directory(tmp_path / "f")

    def test_garbage_bytes_are_refused_before_unpickling(self, tmp_path):
        canary = tmp_path / "unpickled"
        evil = pickle.dumps(_Evil(str(canary)))
        for data in (evil, b"", b"PK\x03\x04rest-of-a-zip", b"\x80\x04garbage"):
            with pytest.raises(CheckpointFormatError, match="dckpt header|empty"):
                Checkpoint.from_bytes(data)
        assert not canary.exists()

    def test_from_bytes_checks_the_class_before_unpickling(self, tmp_path):
        from dckpt._formats import ArchiveWriter
        from dckpt._formats.layout import DICT_FILE, CheckpointHeader

        canary = tmp_path / "unpickled"
        evil_dict = pickle.dumps({"evil": _Evil(str(canary))})
        incompatible = OtherCheckpoint.from_dict({"x": 1}).to_bytes()
        assert not canary.exists()
        unimportable = io.BytesIO()
        with ArchiveWriter(unimportable) as writer:
            header = CheckpointHeader(checkpoint_class="no_such_module_xyz:Ckpt")
            writer.add_bytes(HEADER_FILE, header.to_json())
            writer.add_bytes(DICT_FILE, evil_dict)
        with pytest.raises(CheckpointFormatError, match="cannot be imported"):
            Checkpoint.from_bytes(unimportable.getvalue())
        assert not canary.exists()
        evil = OtherCheckpoint.from_dict({"evil": _Evil(str(canary))})
        with pytest.raises(IncompatibleCheckpointError, match="OtherCheckpoint"):
            ModelCheckpoint.from_bytes(evil.to_bytes())
        assert not canary.exists(), "the dict was unpickled before its class was checked"
        with pytest.raises(IncompatibleCheckpointError):
            ModelCheckpoint.from_bytes(incompatible)

    def test_damaged_bytes_are_refused(self):
        good = Checkpoint.from_dict({"w": os.urandom(50_000)}).to_bytes()
        with pytest.raises(ValueError):
            Checkpoint.from_bytes(good[: len(good) // 2])
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0x10
        with pytest.raises(ValueError):
            Checkpoint.from_bytes(bytes(flipped))

    def test_from_bytes_takes_bytes(self):
        with pytest.raises(TypeError, match="bytes"):
            Checkpoint.from_bytes("not bytes")  # type: ignore[arg-type]

    def test_unknown_uri_protocol_names_it(self):
        with pytest.raises(CheckpointURIError, match="nosuchproto"):
            Checkpoint.from_uri("nosuchproto://bucket/ckpt")
        with pytest.raises(CheckpointURIError, match="nosuchproto"):
            Checkpoint.from_dict({"x": 1}).to_uri("nosuchproto://bucket/ckpt")

    def test_missing_uri(self, memory_uri):
        with pytest.raises(FileNotFoundError):
            Checkpoint.from_uri(f"{memory_uri}/nothing-here")

    def test_malformed_reserved_key(self):
        with pytest.raises(CheckpointFormatError, match="reserved"):
            Checkpoint.from_dict({RESERVED_KEY: "not a dict"})
        with pytest.raises(CheckpointFormatError, match="packed"):
            Checkpoint.from_dict({RESERVED_KEY: {"files": b"not packed"}})

    def test_failed_to_directory_leaves_nothing_behind(self, tmp_path):
        checkpoint = Checkpoint.from_dict({"x": 1})
        checkpoint.set_preprocessor(_Unpicklable())
        with pytest.raises(RuntimeError, match="cannot pickle"):
            checkpoint.to_directory(tmp_path / "out")
        assert os.listdir(tmp_path) == []

    def test_failed_to_directory_keeps_the_old_directory(self, tmp_path):
        old = make_tree(tmp_path / "out")
        before = read_tree(old)
        checkpoint = Checkpoint.from_dict({"x": 1})
        checkpoint.set_preprocessor(_Unpicklable())
        with pytest.raises(RuntimeError):
            checkpoint.to_directory(old)
        assert read_tree(old) == before
        assert os.listdir(tmp_path) == ["out"]

    def test_deeply_nested_json_is_a_format_error(self, tmp_path, memory_uri):
        # json raises RecursionError on this; a header must never do that.
        nested = "[" * 100_000
        path = make_tree(tmp_path / "t")
        (Path(path) / HEADER_FILE).write_text(nested)
        with pytest.raises(CheckpointFormatError, match="nested too deeply"):
            Checkpoint.from_directory(path)
        uri = Checkpoint.from_dict({"x": 1}).to_uri(f"{memory_uri}/c")
        fsspec.filesystem("memory").pipe_file(f"{uri}/{HEADER_FILE}", nested.encode())
        with pytest.raises(CheckpointFormatError, match="nested too deeply"):
            Checkpoint.from_uri(uri)

    def test_to_directory_into_itself_is_refused(self, tmp_path):
        path = make_tree(tmp_path / "t")
        with pytest.raises(ValueError, match="inside"):
            Checkpoint.from_directory(path).to_directory(os.path.join(path, "sub"))


_BLOCKING_WRITER = """
import sys
from fsspec.callbacks import Callback
from dckpt import Checkpoint

class Block(Callback):
    def relative_update(self, inc=1):
        super().relative_update(inc)
        if self.value == 1:  # one file is in the partial directory
            print("writing", flush=True)
            sys.stdin.readline()  # until the test lets go, or kills this process

Checkpoint.from_directory(sys.argv[1]).to_directory(sys.argv[2], callback=Block())
"""


def _start_blocked_writer(source: str, target: Path, log: Path) -> subprocess.Popen:
    """A process blocked inside ``to_directory(target)``, its partial half-written."""
    with open(log, "ab") as err:
        process = subprocess.Popen(
            [sys.executable, "-c", _BLOCKING_WRITER, source, str(target)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            cwd=Path(__file__).parent.parent,
        )
    line = process.stdout.readline()
    assert line == "writing\n", f"the writer did not start: {log.read_text()[-2000:]}"
    return process


def _partials_of(target: Path) -> list[str]:
    return sorted(n for n in os.listdir(target.parent)
                  if n.startswith(f".{target.name}.") and n.endswith(".partial"))


def test_the_next_write_removes_the_partial_of_a_killed_writer_only(tmp_path):
    source = make_tree(tmp_path / "source")
    target = tmp_path / "out"
    log = tmp_path / "writers.log"
    killed = _start_blocked_writer(source, target, log)
    live = None
    try:
        [left] = _partials_of(target)
        assert f".{killed.pid}." in left  # the partial names its writer (and host)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        live = _start_blocked_writer(source, target, log)
        [live_partial] = [n for n in _partials_of(target) if f".{live.pid}." in n]
        # Another host's writer with a pid that is dead here: not ours to judge.
        other_host = tmp_path / f".out.some-other-host.{killed.pid}.0123456789ab.partial"
        other_host.mkdir()

        Checkpoint.from_dict({"x": 1}).to_directory(target)
        assert Checkpoint.from_directory(target).to_dict() == {"x": 1}
        assert _partials_of(target) == sorted([live_partial, other_host.name])

        live.stdin.write("go\n")
        live.stdin.flush()
        assert live.wait(60) == 0, log.read_text()[-2000:]
        assert read_tree(target) == read_tree(source)
        assert _partials_of(target) == [other_host.name]
    finally:
        for process in (killed, live):
            if process is not None:
                if process.poll() is None:
                    process.kill()
                process.wait()
                process.stdin.close()
                process.stdout.close()


def test_a_killed_writers_partial_control_file_goes_with_the_next_write(tmp_path):
    from dckpt._formats._atomic import writer_sibling

    path = make_tree(tmp_path / "t")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = os.path.basename(writer_sibling(os.path.join(path, HEADER_FILE)))
    stale = Path(path) / ours.replace(f".{os.getpid()}.", f".{dead}.")
    stale.write_text("half a header")
    checkpoint = Checkpoint.from_directory(path)
    checkpoint.set_metadata({"m": 1})
    checkpoint.to_directory(path)  # rewrites .dckpt.json in place
    assert not stale.exists()
    assert Checkpoint.from_directory(path).get_metadata() == {"m": 1}
    assert not [n for n in os.listdir(path) if n.endswith(".partial")]


class _Evil:
    """Unpickling this creates a file: proof that nothing was unpickled if absent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this preprocessor")


def test_package_exports():
    assert set(dckpt.__all__) >= {"Checkpoint", "CheckpointError", "CheckpointFormatError"}
    for name in dckpt.__all__:
        assert hasattr(dckpt, name)


def test_a_temporary_directory_that_does_not_exist_yet_is_created(tmp_path):
    import dask.config

    folder = tmp_path / "fresh" / "tmp"
    with dask.config.set({"dckpt.temporary-directory": str(folder)}), \
            Checkpoint.from_dict({"x": 1}).as_directory() as directory:
        assert os.path.dirname(directory) == str(folder)
        assert Checkpoint.from_directory(directory).to_dict() == {"x": 1}


def test_to_directory_and_to_bytes_report_progress_per_file(tmp_path):
    from tests.test_storage import Recorder

    path = make_tree(tmp_path / "t")
    sizes = {rel: len(data) for rel, data in read_tree(path).items() if isinstance(data, bytes)}
    copied, packed = Recorder(), Recorder()
    Checkpoint.from_directory(path).to_directory(str(tmp_path / "copy"), callback=copied)
    Checkpoint.from_directory(path).to_bytes(callback=packed)
    for recorder in (copied, packed):
        assert sum(c.value for _, _, c in recorder.children) == sum(sizes.values())
    assert copied.value == len(sizes)


def test_a_uri_rewritten_just_after_its_download_is_refused_and_nothing_kept(
    tmp_path, memory_uri, monkeypatch
):
    """as_directory() checks the URI's committed version again once its download is
    done: a commit that landed meanwhile is refused, and the download is removed."""
    uri = Checkpoint.from_dict({"x": 1}).to_uri(f"{memory_uri}/c")
    checkpoint = Checkpoint.from_uri(uri)
    versions = iter(["v1", "v2"])
    monkeypatch.setattr(dckpt._storage, "uri_version", lambda *a, **k: next(versions))
    temp = tmp_path / "temp"
    with dask.config.set({"dckpt.temporary-directory": str(temp)}), \
            pytest.raises(dckpt.CheckpointFormatError, match="rewritten while it was being"):
        with checkpoint.as_directory():
            pytest.fail("a download of another version was served")
    assert [p for p in temp.rglob("*") if p.is_file() and "dict_checkpoint" in p.name] == []
