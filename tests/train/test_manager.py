"""CheckpointManager: top-K retention, deletion wherever checkpoints live, background
persistence, and restoring from the state written beside the checkpoints."""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import pytest

import dckpt._storage
from dckpt import Checkpoint, CheckpointFormatError, CheckpointNotFoundError
from dckpt.train import (
    CheckpointConfig,
    CheckpointManager,
    MetricNotFoundError,
    TrackedCheckpoint,
)
from dckpt.train._state import STATE_FILE

HOLD_TIMEOUT = 10.0  # seconds; only reached when a test fails


@pytest.fixture(params=["memory", "file"])
def storage_uri(request: pytest.FixtureRequest, memory_uri: str, tmp_path) -> str:
    """A fresh storage folder: ``memory://`` or a ``file://`` URI under tmp_path."""
    return memory_uri if request.param == "memory" else f"file://{tmp_path}/storage"


@pytest.fixture
def make_manager() -> Iterator[Callable[..., CheckpointManager]]:
    """Managers that are closed (background work finished, no error) after the test."""
    managers: list[CheckpointManager] = []

    def make(**config: Any) -> CheckpointManager:
        manager = CheckpointManager(CheckpointConfig(**config))
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.close()


def _folders(uri: str) -> set[str]:
    """The names of the checkpoint folders at ``uri``."""
    fs, root = dckpt._storage.resolve_uri(uri)
    fs.invalidate_cache()
    if not fs.exists(root):
        return set()
    return {os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)
            if os.path.basename(p.rstrip("/")).startswith("checkpoint_")}


def _register(manager: CheckpointManager, scores: list[Any], key: str = "score") -> None:
    for i, score in enumerate(scores):
        manager.register(Checkpoint.from_dict({"i": i}), {key: score, "step": i})


def _kept(manager: CheckpointManager) -> list[int]:
    return [t.index for t in manager.tracked]


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(("config", "match"), [
    ({"checkpoint_score_order": "maximum"}, "'max' or 'min'"),
    ({"num_to_keep": 0}, "num_to_keep"),
    ({"num_to_keep": 1.5}, "num_to_keep"),
    ({"persist_every": -1}, "persist_every"),
    ({"checkpoint_score_attribute": ""}, "checkpoint_score_attribute"),
    ({"storage_options": ["key"]}, "storage_options"),
])
def test_bad_config_is_refused_clearly(config, match):
    with pytest.raises(ValueError, match=match):
        CheckpointConfig(**config)


# ---------------------------------------------------------------------------- ranking


@pytest.mark.parametrize(("order", "kept", "ranked"), [
    ("max", [2, 4], [2, 4]),
    ("min", [1, 3, 4], [3, 1]),
])
def test_top_k_keeps_the_best_and_deletes_the_rest_at_the_uri(
    make_manager, storage_uri, order, kept, ranked
):
    manager = make_manager(num_to_keep=2, checkpoint_score_attribute="score",
                           checkpoint_score_order=order, storage_uri=storage_uri)
    _register(manager, [3.0, 1.0, 4.0, 2.0, 5.0])
    manager.wait()
    # The top 2, and the latest (index 4) even where it is the worst ("min").
    assert _kept(manager) == kept
    # The top 2 only, worst first (Ray's order): the latest is not among them in "min".
    assert [m["step"] for _, m in manager.best_checkpoints] == ranked
    assert _folders(storage_uri) == {f"checkpoint_{i:06d}" for i in kept}
    assert all(t.uri is not None for t in manager.tracked)
    assert manager.best_checkpoint.to_dict() == {"i": ranked[-1]}
    assert manager.latest_checkpoint.to_dict() == {"i": 4}


@pytest.mark.parametrize(("order", "ranked"), [("min", [(3, 5), (1, 3)]),
                                               ("max", [(3, 5), (2, 7)])])
def test_best_checkpoints_are_in_rays_order_worst_first(make_manager, order, ranked):
    """Ray 2.6's own trainer test (test_checkpoints_to_keep): NaN, 3, 7, 5 reported,
    num_to_keep=2 keeps, worst first, (idx 3, loss 5) then the best."""
    manager = make_manager(num_to_keep=2, checkpoint_score_attribute="loss",
                           checkpoint_score_order=order, persist_every=0)
    for i, loss in enumerate([float("nan"), 3, 7, 5]):
        manager.register(Checkpoint.from_dict({"idx": i}), {"loss": loss})
    assert [(c.to_dict()["idx"], m["loss"]) for c, m in manager.best_checkpoints] == ranked
    assert manager.best_checkpoint.to_dict() == {"idx": ranked[-1][0]}


def test_the_latest_is_kept_until_a_newer_one_comes(make_manager, memory_uri):
    manager = make_manager(num_to_keep=1, checkpoint_score_attribute="score",
                           storage_uri=memory_uri)
    _register(manager, [5.0, 1.0])
    assert _kept(manager) == [0, 1]  # 1 is the worst, but the latest
    manager.register(Checkpoint.from_dict({"i": 2}), {"score": 0.0})
    assert _kept(manager) == [0, 2]  # 1 goes now; 2 is the latest
    manager.register(Checkpoint.from_dict({"i": 3}), {"score": 9.0})
    assert _kept(manager) == [3]
    manager.wait()
    assert _folders(memory_uri) == {"checkpoint_000003"}


@pytest.mark.parametrize("order", ["max", "min"])
def test_nan_ranks_last_in_both_orders(make_manager, order):
    manager = make_manager(checkpoint_score_attribute="score", checkpoint_score_order=order,
                           persist_every=0)
    nan = float("nan")
    _register(manager, [nan, 1.0, 2.0, nan, 3.0])
    ranked = [m["step"] for _, m in manager.best_checkpoints]
    numbers = [1, 2, 4] if order == "max" else [4, 2, 1]
    assert ranked == [0, 3, *numbers]  # worst first: NaNs, the earlier NaN first


def test_nan_falls_out_of_the_top_k(make_manager):
    manager = make_manager(num_to_keep=2, checkpoint_score_attribute="loss",
                           checkpoint_score_order="min", persist_every=0)
    _register(manager, [float("nan"), 1.0, 2.0], key="loss")
    assert _kept(manager) == [1, 2]


def test_of_equal_scores_the_later_one_wins(make_manager):
    manager = make_manager(num_to_keep=1, checkpoint_score_attribute="score",
                           persist_every=0)
    _register(manager, [1.0, 1.0, 0.0])
    assert _kept(manager) == [1, 2]
    assert manager.best_checkpoint.to_dict() == {"i": 1}
    assert [m["step"] for _, m in manager.best_checkpoints] == [1]  # 2 is only the latest


def test_of_equal_scores_the_earlier_one_is_listed_first(make_manager):
    manager = make_manager(checkpoint_score_attribute="score", persist_every=0)
    _register(manager, [1.0, 2.0, 1.0])
    assert [m["step"] for _, m in manager.best_checkpoints] == [0, 2, 1]


def test_without_a_score_attribute_the_latest_is_the_best(make_manager):
    manager = make_manager(num_to_keep=2, persist_every=0)
    _register(manager, [9.0, 8.0, 7.0, 6.0])
    assert _kept(manager) == [2, 3]
    assert manager.best_checkpoint.to_dict() == {"i": 3}


def test_a_dotted_attribute_reaches_into_nested_metrics(make_manager):
    manager = make_manager(num_to_keep=1, checkpoint_score_attribute="val.loss",
                           checkpoint_score_order="min", persist_every=0)
    for i, loss in enumerate([0.5, 0.2, 0.9]):
        manager.register(Checkpoint.from_dict({"i": i}), {"val": {"loss": loss}})
    assert _kept(manager) == [1, 2] and manager.best_checkpoint.to_dict() == {"i": 1}


def test_a_missing_score_attribute_names_it_and_registers_nothing(make_manager):
    manager = make_manager(checkpoint_score_attribute="val.loss", persist_every=0)
    with pytest.raises(MetricNotFoundError, match=r"'val.loss'.*keys present: \['acc', 'step'\]"):
        manager.register(Checkpoint.from_dict({}), {"acc": 1.0, "step": 3})
    with pytest.raises(KeyError, match=r"metrics\['val'\] has no key 'loss'"):
        manager.register(Checkpoint.from_dict({}), {"val": {"acc": 1.0}})
    assert manager.tracked == []
    assert manager.register(Checkpoint.from_dict({}), {"val": {"loss": 1}}).index == 0


@pytest.mark.parametrize("value", ["0.5", None, True, [1.0]])
def test_a_score_that_is_no_number_is_refused(make_manager, value):
    manager = make_manager(checkpoint_score_attribute="score", persist_every=0)
    with pytest.raises(TypeError, match=r"'score' must be a number.*" + type(value).__name__):
        manager.register(Checkpoint.from_dict({}), {"score": value})


# ---------------------------------------------------------------------------- deleting


def test_a_local_directory_stays_and_its_persisted_copy_goes(make_manager, memory_uri, tmp_path):
    manager = make_manager(num_to_keep=1, checkpoint_score_attribute="score",
                           storage_uri=memory_uri)
    directories = []
    for i in range(3):
        directory = tmp_path / f"model-{i}"
        directory.mkdir()
        (directory / "weights").write_text(str(i))
        directories.append(directory)
        manager.register(Checkpoint.from_directory(directory), {"score": i})
    manager.wait()
    assert _folders(memory_uri) == {"checkpoint_000002"}
    assert all(d.is_dir() for d in directories)  # the caller's directories


def test_the_default_storage_is_a_local_directory_under_the_temporary_directory(tmp_path):
    import dask.config

    with dask.config.set({"dckpt.temporary-directory": str(tmp_path)}):
        manager = CheckpointManager(run_name="my-run")
    with manager:
        manager.register(Checkpoint.from_dict({"w": 1}), {})
    folder = tmp_path / "dckpt-train" / "my-run"
    assert manager.storage_uri == str(folder)
    assert sorted(os.listdir(folder)) == ["checkpoint_000000", STATE_FILE]
    assert Checkpoint.from_uri(manager.tracked[0].uri).to_dict() == {"w": 1}


def test_persist_every_zero_writes_nothing(tmp_path):
    import dask.config

    with dask.config.set({"dckpt.temporary-directory": str(tmp_path)}):
        manager = CheckpointManager(CheckpointConfig(persist_every=0))
    with manager:
        manager.register(Checkpoint.from_dict({"w": 1}), {})
    assert os.listdir(tmp_path) == [] and manager.tracked[0].uri is None


def test_persist_every_nth(make_manager, memory_uri):
    manager = make_manager(storage_uri=memory_uri, persist_every=2)
    _register(manager, [0, 0, 0, 0, 0])
    manager.wait()
    assert [t.uri is not None for t in manager.tracked] == [False, True, False, True, False]
    assert _folders(memory_uri) == {"checkpoint_000001", "checkpoint_000003"}


# ---------------------------------------------------------------------------- background


class HeldUploads:
    """Replaces dckpt._storage.upload_directory: each upload waits until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started: list[str] = []
        self.release = threading.Event()
        self.first_started = threading.Event()
        self._upload = dckpt._storage.upload_directory
        monkeypatch.setattr(dckpt._storage, "upload_directory", self)

    def __call__(self, local_dir: str, uri: str, **kwargs: Any) -> None:
        self.started.append(uri)
        self.first_started.set()
        assert self.release.wait(HOLD_TIMEOUT), "the test never released the upload"
        self._upload(local_dir, uri, **kwargs)


def test_register_does_not_wait_for_the_upload(make_manager, memory_uri, monkeypatch):
    held = HeldUploads(monkeypatch)
    manager = make_manager(storage_uri=memory_uri)
    tracked = manager.register(Checkpoint.from_dict({"w": 1}), {"loss": 1.0})
    # register returned while the upload is held in the background thread.
    assert held.first_started.wait(HOLD_TIMEOUT)
    assert tracked.uri is None and manager.tracked[0].uri is None
    with pytest.raises(TimeoutError):
        manager.wait(timeout=0.05)
    assert _folders(memory_uri) == set()
    held.release.set()
    manager.wait(timeout=HOLD_TIMEOUT)
    uri = manager.tracked[0].uri
    assert uri == f"{memory_uri}/checkpoint_000000"
    assert Checkpoint.from_uri(uri).to_dict() == {"w": 1}


def test_a_checkpoint_dropped_before_or_during_its_upload_leaves_nothing(
    make_manager, memory_uri, monkeypatch
):
    held = HeldUploads(monkeypatch)
    manager = make_manager(num_to_keep=1, checkpoint_score_attribute="score",
                           storage_uri=memory_uri)
    manager.register(Checkpoint.from_dict({"i": 0}), {"score": 1})
    assert held.first_started.wait(HOLD_TIMEOUT)  # 0 is uploading
    manager.register(Checkpoint.from_dict({"i": 1}), {"score": 2})  # drops 0; 1 queued
    manager.register(Checkpoint.from_dict({"i": 2}), {"score": 3})  # drops 1 before its turn
    held.release.set()
    manager.wait(timeout=HOLD_TIMEOUT)
    assert held.started == [f"{memory_uri}/checkpoint_000000", f"{memory_uri}/checkpoint_000002"]
    assert _folders(memory_uri) == {"checkpoint_000002"}
    assert _kept(manager) == [2]


def test_a_failed_upload_is_raised_by_wait_and_leaves_nothing(make_manager, memory_uri,
                                                              monkeypatch):
    def failing(local_dir: str, uri: str, **kwargs: Any) -> None:
        fsspec.filesystem("memory").pipe_file(f"{uri}/half-written", b"x")
        raise OSError("the network is down")

    monkeypatch.setattr(dckpt._storage, "upload_directory", failing)
    manager = make_manager(storage_uri=memory_uri)
    manager.register(Checkpoint.from_dict({}), {})
    with pytest.raises(OSError, match="the network is down"):
        manager.wait()
    manager.wait()  # reported once
    assert manager.tracked[0].uri is None
    assert _folders(memory_uri) == set()


# ---------------------------------------------------------------------------- state


def test_the_state_is_json_beside_the_checkpoints(make_manager, storage_uri):
    class Scalar:  # stands for a numpy scalar
        def item(self) -> float:
            return 0.25

    manager = make_manager(num_to_keep=1, storage_uri=storage_uri, persist_every=2)
    manager.register(Checkpoint.from_dict({}), {"loss": 1.0})
    manager.register(Checkpoint.from_dict({}), {"loss": 2.0})  # persisted, then dropped
    manager.register(Checkpoint.from_dict({}), {"loss": Scalar(), "when": object,
                                                 "shape": (2, 3), "bad": math.inf})
    manager.wait()
    fs, root = dckpt._storage.resolve_uri(storage_uri)
    fs.invalidate_cache()
    state = json.loads(fs.cat_file(f"{root}/{STATE_FILE}"))
    assert state["format_version"] == 1 and state["next_index"] == 3
    assert state["latest_index"] == 2
    assert state["config"]["num_to_keep"] == 1 and "storage_options" not in state["config"]
    assert state["checkpoints"] == [{
        "index": 2, "uri": None,
        # What JSON cannot hold as it is: converted, or its repr.
        "metrics": {"loss": 0.25, "when": repr(object), "shape": [2, 3], "bad": math.inf},
    }]
    # Nothing else is left: no partial state files, no dropped checkpoint.
    assert [os.path.basename(p) for p in fs.ls(root, detail=False)] == [STATE_FILE]


def test_restore_carries_on_where_the_old_driver_stopped(make_manager, storage_uri):
    config = {"num_to_keep": 2, "checkpoint_score_attribute": "loss",
              "checkpoint_score_order": "min", "storage_uri": storage_uri}
    old = make_manager(**config)
    for i, loss in enumerate([0.9, 0.5, 0.7, 0.8]):
        old.register(Checkpoint.from_dict({"i": i}), {"loss": loss, "nested": {"i": i}})
    old.close()
    kept = [(t.index, t.metrics, t.uri) for t in old.tracked]

    new = CheckpointManager.restore(storage_uri)
    try:
        assert [(t.index, t.metrics, t.uri) for t in new.tracked] == kept
        assert [m["loss"] for _, m in new.best_checkpoints] == [0.7, 0.5]  # the top 2
        assert new.latest_checkpoint.to_dict() == {"i": 3}
        assert new.best_checkpoint.to_dict() == {"i": 1}
        assert new.config.num_to_keep == 2 and new.config.checkpoint_score_order == "min"

        tracked = new.register(Checkpoint.from_dict({"i": 4}), {"loss": 0.1})
        assert isinstance(tracked, TrackedCheckpoint) and tracked.index == 4
        new.wait()
        assert _kept(new) == [1, 4]  # 2 and 3 (no longer the latest) fall out
        assert _folders(storage_uri) == {"checkpoint_000001", "checkpoint_000004"}
    finally:
        new.close()
    again = CheckpointManager.restore(storage_uri)
    again.close()
    assert [t.index for t in again.tracked] == [1, 4]


def test_restore_without_state_says_so(memory_uri):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint manager state"):
        CheckpointManager.restore(memory_uri)


_VALID_STATE = {"format": "dckpt-checkpoint-manager", "format_version": 1, "config": {},
                "next_index": 0, "latest_index": None, "checkpoints": []}


@pytest.mark.parametrize(("content", "match"), [
    (b"\x80\x04not json", "not valid JSON"),
    (b"[" * 100_000, "nested too deeply"),  # json raises RecursionError
    ({"format": "something else"}, "not a checkpoint manager state"),
    ({**_VALID_STATE, "format_version": 99}, "upgrade dckpt"),
    ({**_VALID_STATE, "next_index": "3"}, "next_index"),
    ({**_VALID_STATE, "checkpoints": [{"index": 0}]}, "checkpoints"),
    ({**_VALID_STATE, "config": {"checkpoint_score_order": "up"}}, "'max' or 'min'"),
    ({**_VALID_STATE, "config": {"checkpoint_score_attribute": "loss"},
      "checkpoints": [{"index": 0, "metrics": {}, "uri": None}]}, "'loss'"),
])
def test_restore_from_a_damaged_state_says_so(memory_uri, content, match):
    if isinstance(content, dict):
        content = json.dumps(content).encode()
    fsspec.filesystem("memory").pipe_file(f"{memory_uri}/{STATE_FILE}", content)
    with pytest.raises(CheckpointFormatError, match=match):
        CheckpointManager.restore(memory_uri)


# ---------------------------------------------------------------------------- node references


def _write_on_node(seed: int) -> Checkpoint:
    """On a worker: a directory checkpoint under this node's root (returned as a reference)."""
    from dckpt import _node

    path = os.path.join(_node.node_root(), f"train-model-{seed}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(bytes([seed]) * 4096)
    return Checkpoint.from_directory(path)


def _read(checkpoint: Checkpoint) -> bytes:
    """On a worker: the checkpoint's data, as a user reads it."""
    import dask.config

    with dask.config.set({"dckpt.transfer.connect-timeout": "2s"}), \
            checkpoint.as_directory() as directory, \
            open(os.path.join(directory, "weights.bin"), "rb") as f:
        return f.read()


def _on_this_node(checkpoint_id: str, path: str) -> dict[str, bool]:
    """On a worker: whether the path exists, is registered, or is cached here."""
    from dckpt.cluster._store import local_store

    store = local_store()
    return {"exists": os.path.exists(path),
            "registered": checkpoint_id in store._registry.ids(),
            "cached": any(e.checkpoint_id == checkpoint_id for e in store._cache.entries())}


@pytest.mark.slow
def test_a_dropped_node_reference_goes_from_its_node_every_cache_and_the_uri(
    node_client, nodes, tmp_path
):
    from dckpt.errors import CheckpointUnavailableError

    owner, other = nodes
    storage_uri = f"file://{tmp_path}/storage"  # every simulated node sees tmp_path
    first, second = (node_client.submit(_write_on_node, seed, workers=[owner], pure=False)
                     .result() for seed in (1, 2))
    ref = first.get_internal_representation()[1]
    assert node_client.submit(_read, first, workers=[other], pure=False).result() \
        == bytes([1]) * 4096  # now cached on the other node too

    manager = CheckpointManager(CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="acc",
                                                 storage_uri=storage_uri), client=node_client)
    try:
        manager.register(first, {"acc": 0.5})
        manager.wait()
        assert manager.tracked[0].checkpoint.get_internal_representation()[1].uris == (
            f"{storage_uri}/checkpoint_000000",)  # the reference now falls back to storage
        manager.register(second, {"acc": 0.9})
        manager.wait()
    finally:
        manager.close()

    assert _kept(manager) == [1] and _folders(storage_uri) == {"checkpoint_000001"}
    where = {address: node_client.submit(_on_this_node, ref.checkpoint_id, ref.path,
                                         workers=[address], pure=False).result()
             for address in (owner, other)}
    assert where[owner] == {"exists": False, "registered": False, "cached": False}
    assert where[other]["cached"] is False
    with pytest.raises(CheckpointUnavailableError, match="not registered"):
        node_client.submit(_read, first, workers=[other], pure=False).result()
    # The kept one is whole, on its node and at the URI, and reads back from either.
    kept = manager.tracked[0]
    assert node_client.submit(_read, kept.checkpoint, workers=[other], pure=False).result() \
        == bytes([2]) * 4096
    with open(f"{tmp_path}/storage/checkpoint_000001/weights.bin", "rb") as f:
        assert f.read() == bytes([2]) * 4096
