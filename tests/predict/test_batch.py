"""BatchPredictor: placement, at most one transfer per node, restricted scoring, and
predictions equal to a local predictor's.

Pure pieces (placement, batch surgery, argument checks) run without a cluster; the rest
runs on an isolated three-node NodeCluster of this module, with the checkpoint written
on node 0, so that a transfer counted by the stores is a real copy between nodes.
"""

from __future__ import annotations

import collections
import functools
import os
import uuid

import cloudpickle
import dask.config
import pytest
from distributed import Client, Event, LocalCluster

from dckpt import Checkpoint, put
from dckpt.cluster import stats, who_has
from dckpt.predict import (
    BatchFormatError,
    BatchPredictor,
    FunctionPredictor,
    ScoringWorkersError,
    SklearnLikePredictor,
)
from dckpt.predict._batch_format import concat, keep_columns, split
from dckpt.predict._batch_predictor import choose_scoring_workers
from tests._three_nodes import client, cluster, workers  # noqa: F401 (fixtures)
from tests._waiting import eventually

np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")
dd = pytest.importorskip("dask.dataframe")
da = pytest.importorskip("dask.array")
db = pytest.importorskip("dask.bag")

PAD = 2 << 20  # bytes of padding in the model: a transfer is plain in the counters
LOADS: collections.Counter[str] = collections.Counter()  # per worker process
HOLD_TIMEOUT = 60  # seconds; only bounds a hang


class Linear:
    """y = X @ w + b, scikit-learn style, carrying PAD bytes of ballast."""

    def __init__(self, w: list[float], b: float = 0.0) -> None:
        self.w, self.b = np.asarray(w), b
        self.ballast = np.random.default_rng(0).bytes(PAD)

    def predict(self, X):
        if isinstance(X, dict):  # a dict of columns
            X = np.column_stack(list(X.values()))
        return np.asarray(X, dtype=float) @ self.w + self.b


class CountingPredictor(SklearnLikePredictor):
    """Counts its loads in the process that loads it."""

    @classmethod
    def from_checkpoint(cls, checkpoint, **kwargs):
        LOADS[os.getpid()] += 1
        return super().from_checkpoint(checkpoint, **kwargs)


def _loads() -> int:
    return LOADS[os.getpid()]


def _write_model(name: str) -> Checkpoint:
    """On a worker: a directory checkpoint with a ``model.pkl`` under the node root."""
    from dckpt import _node

    path = os.path.join(_node.node_root(), name)
    os.makedirs(path)
    with open(os.path.join(path, "model.pkl"), "wb") as f:
        cloudpickle.dump(Linear([1.0, 10.0], b=0.5), f)
    # Ids are of content: without this, every test's model would be one checkpoint,
    # cached already by the tests before.
    with open(os.path.join(path, "written-by"), "w") as f:
        f.write(f"{name} {uuid.uuid4().hex}")
    return Checkpoint.from_directory(path)


def _where(model, batch):
    """FunctionPredictor fn: each row's node and worker process instead of a score."""
    from dckpt import _node

    return pd.DataFrame({"node": _node.node_id(), "pid": os.getpid()}, index=batch.index)


def _frame(rows: int = 1000) -> pd.DataFrame:
    return pd.DataFrame({"a": np.arange(rows, dtype=float), "b": np.linspace(0, 1, rows),
                         "id": np.arange(rows) * 7})


# ------------------------------------------------------------------ pure pieces


def test_placement_takes_holder_nodes_first_then_whole_nodes():
    workers = {"w-a": "node-2", "w-b": "node-0", "w-c": "node-1", "w-d": "node-2", "w-e": "node-1"}
    assert choose_scoring_workers(workers, ["node-2"]) == ["w-a", "w-d", "w-b", "w-c", "w-e"]
    assert choose_scoring_workers(workers, ["node-1", "node-2"], max_workers=3) == ["w-c", "w-e", "w-a"]
    assert choose_scoring_workers(workers, [], max_workers=2) == ["w-b", "w-c"]


def test_placement_refuses_too_few_workers_and_bad_bounds():
    with pytest.raises(ScoringWorkersError, match="3 scoring workers are needed and the cluster has 2"):
        choose_scoring_workers({"w-a": "n", "w-b": "n"}, [], min_workers=3)
    with pytest.raises(ValueError, match="is below min_scoring_workers"):
        choose_scoring_workers({"w-a": "n"}, [], min_workers=2, max_workers=1)
    with pytest.raises(ValueError, match="at least 1"):
        choose_scoring_workers({"w-a": "n"}, [], min_workers=0)


def test_batches_split_glue_and_keep_columns_row_for_row():
    frame = _frame(10)
    pieces = split(frame, 4)
    assert [len(p) for p in pieces] == [4, 4, 2]
    assert concat(pieces).equals(frame)
    assert [len(p["x"]) for p in split({"x": np.arange(5)}, 2)] == [2, 2, 1]
    predictions = pd.DataFrame({"predictions": np.zeros(10)})  # another index than frame's
    kept = keep_columns(frame.set_index(frame.index + 100), predictions, ["id"])
    assert kept["id"].tolist() == frame["id"].tolist()
    with pytest.raises(BatchFormatError, match="would overwrite prediction columns"):
        keep_columns(frame.rename(columns={"id": "predictions"}), predictions, ["predictions"])


def test_bad_arguments_fail_before_anything_runs():
    checkpoint = Checkpoint.from_dict({"model": Linear([1.0])})
    with pytest.raises(TypeError, match="predictor_cls must be a Predictor class"):
        BatchPredictor(checkpoint, Linear([1.0]))
    with pytest.raises(TypeError, match="must be a dckpt.Checkpoint"):
        BatchPredictor({"model": 1}, SklearnLikePredictor)
    predictor = BatchPredictor(checkpoint, SklearnLikePredictor)
    ddf = dd.from_pandas(_frame(10), npartitions=2)
    with pytest.raises(BatchFormatError, match=r"feature_columns: no column \['nope'\]"):
        predictor.predict(ddf, feature_columns=["a", "nope"])
    with pytest.raises(BatchFormatError, match=r"keep_columns: no column \['gone'\]"):
        predictor.predict(ddf, keep_columns=["gone"])
    with pytest.raises(BatchFormatError, match="given for an Array, which has no columns"):
        predictor.predict(da.ones((4, 2)), feature_columns=["a"])
    with pytest.raises(TypeError, match="takes a dask DataFrame, Array or Bag"):
        predictor.predict(_frame(3))  # a pandas DataFrame is a batch, not a collection
    with pytest.raises(TypeError, match="a batch is a numpy array"):
        predictor.predict(["not a batch"])
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        predictor.predict(ddf, batch_size=0)


@pytest.mark.slow
def test_an_empty_cluster_is_a_scoring_workers_error():
    with LocalCluster(n_workers=0, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client, \
            dask.config.set({"dckpt.predict.batch.worker-wait-timeout": "200ms"}):
        predictor = BatchPredictor(Checkpoint.from_dict({"model": Linear([1.0])}),
                                   SklearnLikePredictor)
        with pytest.raises(ScoringWorkersError, match="needed and the cluster has 0"):
            predictor.predict(da.ones((4, 1)), client=client)


# ------------------------------------------------------------ on three nodes


# cluster, client, workers: an isolated three-node NodeCluster of this module.


def assert_close(got, expected) -> None:
    """Predictions computed along another path (other row slices, another memory
    layout) may differ from a local predictor's in the last bits."""
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(expected, dtype=float),
                               rtol=1e-12, atol=1e-12)


def _transfers(client: Client) -> dict[str, tuple[int, int]]:
    return {a: (s["transfers"], s["bytes_received"]) for a, s in stats(client).items()}


def _moved(before: dict, after: dict) -> dict[str, tuple[int, int]]:
    return {a: (after[a][0] - before[a][0], after[a][1] - before[a][1]) for a in after}


@pytest.mark.slow
def test_200_partitions_on_3_nodes_move_the_checkpoint_once_per_other_node(client, workers):
    checkpoint = client.submit(_write_model, "model-200", workers=[workers[0]], pure=False).result()
    frame = _frame(2000)
    ddf = dd.from_pandas(frame, npartitions=200)
    before = _transfers(client)
    loads_before = client.run(_loads)

    with BatchPredictor(checkpoint, CountingPredictor) as predictor:
        out = predictor.predict(ddf, feature_columns=["a", "b"], keep_columns=["id"], client=client)
        assert list(out.columns) == ["predictions", "id"] and out.npartitions == 200
        result = client.compute(out).result()
        again = client.compute(predictor.predict(ddf, feature_columns=["a", "b"], client=client)).result()
        assert sorted(predictor.scoring_workers) == sorted(workers)

    moved = _moved(before, _transfers(client))
    assert moved[workers[0]] == (0, 0)  # the owner reads its own directory
    assert all(count <= 1 for count, _ in moved.values()), moved
    assert sum(count for count, _ in moved.values()) <= 2
    loads = {a: n - loads_before[a] for a, n in client.run(_loads).items()}
    assert all(n <= 1 for n in loads.values()), loads  # two predict() calls, one load

    # The same as one local predictor of the same checkpoint on the whole frame.
    with client.as_current():  # the driver fetches node 0's directory through this client
        local = SklearnLikePredictor.from_checkpoint(checkpoint).predict(frame[["a", "b"]])
    assert_close(result["predictions"], local["predictions"])
    assert result["id"].tolist() == frame["id"].tolist()
    assert result.index.tolist() == frame.index.tolist()
    assert_close(again["predictions"], local["predictions"])


@pytest.mark.slow
def test_one_scoring_worker_is_the_owner_and_scores_every_partition(client, workers):
    checkpoint = client.submit(_write_model, "model-one", workers=[workers[0]], pure=False).result()
    ddf = dd.from_pandas(_frame(300), npartitions=30)
    before = _transfers(client)
    with BatchPredictor(checkpoint, FunctionPredictor, fn=_where) as predictor:
        out = predictor.predict(ddf, max_scoring_workers=1, client=client, meta=pd.DataFrame(
            {"node": pd.Series(dtype=object), "pid": pd.Series(dtype=int)}))
        assert predictor.scoring_workers == [workers[0]]
        # Downstream operations fuse with the scoring: still only on node 0.
        where = client.compute(out[out["pid"] > 0]).result()
    assert set(where["node"]) == {"node-0"} and len(where) == 300
    assert len(set(where["pid"])) == 1
    assert _moved(before, _transfers(client)) == {a: (0, 0) for a in workers}


@pytest.mark.slow
def test_a_node_with_a_cached_copy_is_chosen_before_one_without(client, workers):
    checkpoint = client.submit(_write_model, "model-cached", workers=[workers[0]], pure=False).result()
    put(checkpoint, ["node-2"], client=client)
    checkpoint_id = checkpoint.get_internal_representation()[1].checkpoint_id
    # The registry lags the stores by about dckpt.registry.interval.
    eventually(lambda: who_has(client, [checkpoint_id])[checkpoint_id]["cached"],
               lambda cached: workers[2] in cached, "node 2's cached copy in the registry")
    before = _transfers(client)
    with BatchPredictor(checkpoint, SklearnLikePredictor) as predictor:
        out = predictor.predict(da.ones((40, 2), chunks=(10, 2)), max_scoring_workers=2,
                                client=client)
        assert sorted(predictor.scoring_workers) == sorted([workers[0], workers[2]])
        assert client.compute(out).result().tolist() == [11.5] * 40
    assert _moved(before, _transfers(client)) == {a: (0, 0) for a in workers}


@pytest.mark.slow
def test_arrays_bags_and_lists_of_batches_come_back_in_their_own_kind(client, workers):
    model = Linear([2.0, -1.0], b=1.0)
    checkpoint = Checkpoint.from_dict({"model": model})
    local = SklearnLikePredictor.from_checkpoint(checkpoint)
    x = np.arange(60, dtype=float).reshape(30, 2)
    with BatchPredictor(checkpoint, SklearnLikePredictor) as predictor:
        array = predictor.predict(da.from_array(x, chunks=(7, 1)), batch_size=3, client=client)
        assert array.shape == (30,) and array.chunks[0] == (7, 7, 7, 7, 2)
        assert_close(client.compute(array).result(), local.predict(x))

        records = [{"a": float(a), "b": float(b), "key": f"r{i}"} for i, (a, b) in enumerate(x)]
        bag = predictor.predict(db.from_sequence(records, npartitions=4),
                                feature_columns=["a", "b"], keep_columns=["key"], client=client)
        expected = local.predict(pd.DataFrame(records)[["a", "b"]])["predictions"].tolist()
        scored = client.compute(bag).result()
        assert [sorted(r) for r in scored] == [["key", "predictions"]] * len(records)
        assert [r["key"] for r in scored] == [r["key"] for r in records]
        assert_close([r["predictions"] for r in scored], expected)

        batches = [x[:5], {"a": x[5:9, 0], "b": x[5:9, 1]}, pd.DataFrame(x[9:], columns=["a", "b"])]
        futures = predictor.predict(batches, feature_columns=None, client=client)
        got = client.gather(futures)
    assert_close(got[0], local.predict(x[:5]))
    assert_close(got[1]["predictions"], x[5:9] @ [2.0, -1.0] + 1.0)
    assert_close(got[2]["predictions"], local.predict(x[9:]))


@pytest.mark.slow
def test_too_few_workers_and_failing_predictors_are_named_errors(client, workers):
    checkpoint = Checkpoint.from_dict({"model": Linear([1.0, 1.0])})
    predictor = BatchPredictor(checkpoint, SklearnLikePredictor)
    with dask.config.set({"dckpt.predict.batch.worker-wait-timeout": "100ms"}), \
            pytest.raises(ScoringWorkersError, match="4 scoring workers are needed and the cluster has 3"):
        predictor.predict(da.ones((4, 2)), min_scoring_workers=4, client=client)
    frame = dd.from_pandas(_frame(10).rename(columns={"id": "predictions"}), npartitions=2)
    with pytest.raises(BatchFormatError, match="would overwrite prediction columns"):
        predictor.predict(frame, feature_columns=["a", "b"], keep_columns=["predictions"],
                          client=client)
    predictor.close()


def _held_where(hold: str, model, batch):
    """FunctionPredictor fn (with ``hold`` bound): like _where, once the event ``hold``
    is set; sets ``<hold>-started`` first, so the test knows scoring has begun."""
    from distributed import Event

    Event(f"{hold}-started").set()
    if not Event(hold).wait(timeout=HOLD_TIMEOUT):
        raise TimeoutError(f"the test never set the event {hold!r}")
    return _where(model, batch)


@pytest.mark.slow
def test_a_scoring_worker_that_dies_fails_the_run_clearly_and_the_next_run_goes_on(
    cluster, client, workers
):
    """Kills node 2's worker while partitions are scored (its worker comes back at
    another address). Dask does not rebuild an actor that a client holds, so the run
    fails at once with Dask's "Worker holding Actor was lost" (not a hang); the next
    predict() drops that scorer and scores on the workers alive."""
    checkpoint = client.submit(_write_model, "model-dies", workers=[workers[0]], pure=False).result()
    ddf = dd.from_pandas(_frame(600), npartitions=60)
    meta = pd.DataFrame({"node": pd.Series(dtype=object), "pid": pd.Series(dtype=int)})
    hold = f"dckpt-test-hold-{uuid.uuid4().hex[:8]}"
    release = Event(hold, client=client)
    fn = functools.partial(_held_where, hold)
    with BatchPredictor(checkpoint, FunctionPredictor, fn=fn) as predictor:
        try:
            future = client.compute(predictor.predict(ddf, client=client, meta=meta))
            assert sorted(predictor.scoring_workers) == sorted(workers)
            # Scoring has begun and no partition can finish before the release.
            assert Event(f"{hold}-started", client=client).wait(timeout=HOLD_TIMEOUT)
            assert not future.done()
            cluster.kill_node(2)
        finally:
            release.set()
        with pytest.raises(RuntimeError, match="Worker holding Actor was lost"):
            future.result(timeout=60)
        cluster.restart_node(2)
        where = client.compute(predictor.predict(ddf, client=client, meta=meta)).result(
            timeout=60)
    assert len(where) == 600 and where.index.tolist() == list(range(600))
