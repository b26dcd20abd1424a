"""dckpt.air: Ray AIR 2.6's names, the configs, and the trainer taking them beside its
flat keywords.

Ray's documented examples run with their imports changed and nothing else: they
come from Ray's ``doc/source/train/doc_code/key_concepts.py`` of the ``ray.air`` era
(the ``# __..._start__`` sections, as the search corpus holds it at
``MarkoShiva/ray@8c36300a``), each imported through :data:`RAY_TO_DCKPT`. Left out:
``__sync_config__`` (``ray.tune.SyncConfig``); ``__session_data_info__`` needs Ray
Data, so :data:`DATA_INFO` is that example with a dask Bag in place of
``ray.data.from_items`` (the one line changed beyond the imports).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dckpt import Checkpoint
from dckpt.air import (
    CheckpointConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
    session,
)
from dckpt.train import DataParallelTrainer, fit, get_dataset_shard
from dckpt.train._run_config import resolve
from tests.train.conftest import FakeManager

# What a port changes: these imports, nothing else.
RAY_TO_DCKPT = {
    "from ray.air import": "from dckpt.air import",
    "from ray.train.data_parallel_trainer import DataParallelTrainer":
        "from dckpt.train import DataParallelTrainer",
}


def _ported(source: str) -> str:
    source = textwrap.dedent(source)
    for ray, ours in RAY_TO_DCKPT.items():
        source = source.replace(ray, ours)
    assert "ray." not in source and "from ray" not in source, source
    return source


# Ray's key_concepts.py, sections as they are (imports in Ray's spelling).
RAY_SESSION_REPORT = '''
from ray.air import session, ScalingConfig
from ray.train.data_parallel_trainer import DataParallelTrainer


def train_fn(config):
    for i in range(10):
        session.report({"step": i})


trainer = DataParallelTrainer(
    train_loop_per_worker=train_fn, scaling_config=ScalingConfig(num_workers=1)
)
trainer.fit()
'''

RAY_SESSION_CHECKPOINT = '''
from ray.air import session, ScalingConfig, Checkpoint
from ray.train.data_parallel_trainer import DataParallelTrainer


def train_fn(config):
    checkpoint = session.get_checkpoint()

    state = checkpoint.to_dict() if checkpoint else {"step": 0}
    for _ in range(state["step"], 10):
        state["step"] += 1
        session.report(
            metrics={"step": state["step"]}, checkpoint=Checkpoint.from_dict(state)
        )


trainer = DataParallelTrainer(
    train_loop_per_worker=train_fn,
    scaling_config=ScalingConfig(num_workers=1),
    resume_from_checkpoint=Checkpoint.from_dict({"step": 4}),
)
trainer.fit()
'''

RAY_CONFIGS = '''
from ray.air import ScalingConfig

scaling_config = ScalingConfig(
    # Number of distributed workers.
    num_workers=2,
    # Turn on/off GPU.
    use_gpu=True,
    # Specify resources used for trainer.
    trainer_resources={"CPU": 1},
    # Try to schedule workers on different nodes.
    placement_strategy="SPREAD",
)

from ray.air import RunConfig

run_config = RunConfig(
    # Name of the training run (directory name).
    name="my_train_run",
    # Directory to store results in (will be local_dir/name).
    local_dir="~/ray_results",
    # Low training verbosity.
    verbose=1,
)

from ray.air import RunConfig, FailureConfig

run_config = RunConfig(
    failure_config=FailureConfig(
        # Tries to recover a run up to this many times.
        max_failures=2
    )
)

from ray.air import RunConfig, CheckpointConfig

run_config = RunConfig(
    checkpoint_config=CheckpointConfig(
        # Only keep this many checkpoints.
        num_to_keep=2
    )
)
'''

# __session_data_info__, with dask.bag for ray.data (the two marked lines).
DATA_INFO = '''
import dask.bag  # changed: the import of Ray Data
from ray.air import session, ScalingConfig
from ray.train.data_parallel_trainer import DataParallelTrainer


def train_fn(config):
    dataset_shard = session.get_dataset_shard("train")

    session.report(
        {
            # Global world size
            "world_size": session.get_world_size(),
            # Global worker rank on the cluster
            "world_rank": session.get_world_rank(),
            # Local worker rank on the current machine
            "local_rank": session.get_local_rank(),
            # Data
            "data_shard": dataset_shard.to_pandas().to_numpy().tolist(),
        }
    )


trainer = DataParallelTrainer(
    train_loop_per_worker=train_fn,
    scaling_config=ScalingConfig(num_workers=2),
    datasets={"train": dask.bag.from_sequence([1, 2, 3, 4])},  # changed: Ray Data's from_items
)
trainer.fit()
'''

RAY_RESULTS = '''
result = trainer.fit()

# Print metrics
print("Observed metrics:", result.metrics)

checkpoint_data = result.checkpoint.to_dict()
print("Checkpoint data:", checkpoint_data["step"])
'''


# ------------------------------------------------------------------ names


def test_dckpt_air_has_rays_names_from_their_one_home():
    import dckpt.train

    assert dckpt.air.Checkpoint is Checkpoint
    # Ray's other path to it: from ray.air.checkpoint import Checkpoint
    from dckpt.air.checkpoint import Checkpoint as from_the_module

    assert from_the_module is Checkpoint
    for name in ("CheckpointConfig", "FailureConfig", "Result", "RunConfig", "ScalingConfig"):
        assert getattr(dckpt.air, name) is getattr(dckpt.train, name)
    assert sorted(dckpt.air.__all__) == sorted(
        ["Checkpoint", "CheckpointConfig", "FailureConfig", "Result", "RunConfig",
         "ScalingConfig", "session"])
    for name in ("report", "get_checkpoint", "get_world_rank", "get_world_size",
                 "get_local_rank", "get_trial_name", "get_dataset_shard"):
        assert callable(getattr(session, name))


def test_importing_dckpt_dckpt_train_and_dckpt_air_imports_no_torch():
    code = ("import sys, dckpt, dckpt.train, dckpt.air, dckpt.predict; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_the_session_outside_a_run_is_a_clear_error():
    for call in (session.get_world_rank, session.get_world_size, session.get_local_rank,
                 session.get_trial_name, session.get_checkpoint):
        with pytest.raises(RuntimeError, match="only inside a training function"):
            call()
    with pytest.raises(RuntimeError, match="only inside a training function"):
        session.report({"loss": 1.0})
    with pytest.raises(RuntimeError, match="only inside a training function"):
        session.get_dataset_shard("train")


# ------------------------------------------------------------------ configs


def test_rays_config_examples_run_ported():
    namespace: dict = {}
    exec(_ported(RAY_CONFIGS), namespace)  # noqa: S102 - Ray's documented example
    assert namespace["scaling_config"].dask_resources == {"GPU": 1.0}
    assert namespace["run_config"].checkpoint_config == CheckpointConfig(num_to_keep=2)


def test_resources_per_worker_map_to_threads_and_dask_resources():
    plain = ScalingConfig(num_workers=2)
    assert plain.dask_resources == {} and plain.num_cpus_per_worker == 1
    scaled = ScalingConfig(num_workers=2, resources_per_worker={"CPU": 2, "GPU": 0.5,
                                                                "TPU": 1})
    assert scaled.num_cpus_per_worker == 2
    assert scaled.dask_resources == {"GPU": 0.5, "TPU": 1.0}
    # use_gpu asks for one GPU unless resources_per_worker says how many.
    assert ScalingConfig(use_gpu=True).dask_resources == {"GPU": 1.0}
    assert ScalingConfig(use_gpu=True, resources_per_worker={"GPU": 2}).dask_resources == {
        "GPU": 2.0}


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: ScalingConfig(num_workers=0), ValueError, "num_workers must be an integer >= 1"),
    (lambda: ScalingConfig(use_gpu="yes"), TypeError, "use_gpu must be True or False"),
    (lambda: ScalingConfig(resources_per_worker={"GPU": -1}), ValueError, "amounts >= 0"),
    (lambda: ScalingConfig(resources_per_worker=["GPU"]), TypeError, "must be a mapping"),
    (lambda: ScalingConfig(placement_strategy="RANDOM"), ValueError, "placement_strategy"),
    (lambda: FailureConfig(max_failures=-2), ValueError, "max_failures must be -1"),
    (lambda: FailureConfig(fail_fast=True), ValueError, "fail_fast"),
    (lambda: RunConfig(name="a/b"), ValueError, "without '/'"),
    (lambda: RunConfig(storage_path="/x", local_dir="/y"), ValueError, "old name"),
    (lambda: RunConfig(failure_config=3), TypeError, "FailureConfig"),
    (lambda: RunConfig(verbose=7), ValueError, "verbose must be"),
])
def test_bad_configs_are_named_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_run_config_storage_path_is_where_the_checkpoints_go():
    settings = resolve(None, RunConfig(name="run-1", storage_path="s3://bucket/runs/"),
                       num_workers=None, max_failures=None, checkpoint_config=None,
                       run_name=None)
    assert settings.checkpoint_config == CheckpointConfig(storage_uri="s3://bucket/runs/run-1")
    assert (settings.num_workers, settings.max_failures, settings.run_name) == (2, 0, "run-1")
    kept = resolve(None, RunConfig(storage_path="/data", checkpoint_config=CheckpointConfig(
        num_to_keep=2)), num_workers=None, max_failures=None, checkpoint_config=None,
        run_name="r")
    assert kept.checkpoint_config == CheckpointConfig(num_to_keep=2, storage_uri="/data/r")


def _train_noop():
    pass


def test_the_flat_keywords_and_rays_configs_say_the_same_things():
    air = DataParallelTrainer(
        _train_noop, scaling_config=ScalingConfig(num_workers=3),
        run_config=RunConfig(name="n", failure_config=FailureConfig(max_failures=2),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    flat = DataParallelTrainer(_train_noop, num_workers=3, max_failures=2, run_name="n",
                               checkpoint_config=CheckpointConfig(num_to_keep=1))
    for trainer in (air, flat):
        assert (trainer.num_workers, trainer.max_failures, trainer.run_name,
                trainer.checkpoint_config) == (3, 2, "n", CheckpointConfig(num_to_keep=1))
    # Both forms at once are fine when they agree.
    both = DataParallelTrainer(_train_noop, num_workers=3,
                               scaling_config=ScalingConfig(num_workers=3))
    assert both.num_workers == 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"num_workers": 2, "scaling_config": ScalingConfig(num_workers=3)},
     r"num_workers=2 and scaling_config.num_workers=3 disagree"),
    ({"max_failures": 1, "run_config": RunConfig(failure_config=FailureConfig(3))},
     r"max_failures=1 and run_config.failure_config.max_failures=3 disagree"),
    ({"checkpoint_config": CheckpointConfig(num_to_keep=1),
      "run_config": RunConfig(checkpoint_config=CheckpointConfig(num_to_keep=2))},
     "checkpoint_config=.* and run_config.checkpoint_config=.* disagree"),
    ({"run_name": "a", "run_config": RunConfig(name="b")}, "run_name='a' and run_config.name"),
    ({"checkpoint_config": CheckpointConfig(storage_uri="/one/a"),
      "run_config": RunConfig(name="a", storage_path="/two")},
     "storage_path puts the checkpoints at '/two/a'.*'/one/a'"),
    ({"checkpoint_manager": FakeManager(), "run_config": RunConfig(storage_path="/x")},
     "checkpoint_manager, not both"),
])
def test_the_two_forms_disagreeing_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataParallelTrainer(_train_noop, **kwargs)


def test_configs_of_the_wrong_type_and_datasets_are_refused():
    with pytest.raises(TypeError, match="scaling_config must be a dckpt.air.ScalingConfig"):
        DataParallelTrainer(_train_noop, scaling_config={"num_workers": 2})
    with pytest.raises(TypeError, match="run_config must be a dckpt.air.RunConfig"):
        DataParallelTrainer(_train_noop, run_config={"name": "x"})
    with pytest.raises(TypeError, match="datasets takes dask DataFrames and Bags, not list"):
        DataParallelTrainer(_train_noop, datasets={"train": [1, 2]})
    with pytest.raises(TypeError, match="datasets must be a mapping"):
        DataParallelTrainer(_train_noop, datasets=[1, 2])


# ------------------------------------------------------------------ on a cluster


def test_rays_session_examples_run_ported(client, tmp_path):
    import dask.config

    namespace: dict = {}
    # The trainer finds the cluster as Ray finds its runtime; the runs' default
    # storage (the driver's disk) is this test's directory.
    with client.as_current(), dask.config.set({"dckpt.temporary-directory": str(tmp_path)}):
        exec(_ported(RAY_SESSION_REPORT), namespace)  # noqa: S102 - Ray's documented example
        exec(_ported(RAY_SESSION_CHECKPOINT), namespace)  # noqa: S102
        exec(_ported(RAY_RESULTS), namespace)  # noqa: S102
    result = namespace["result"]
    assert isinstance(result, Result)
    # Resumed at step 4, as resume_from_checkpoint says; ten steps in the end.
    assert [m["step"] for m in result.metrics_history] == list(range(5, 11))
    assert namespace["checkpoint_data"]["step"] == 10


def _ranks_and_names():
    session.report({"rank": session.get_world_rank(), "size": session.get_world_size(),
                    "local": session.get_local_rank(), "name": session.get_trial_name()})


def test_the_session_reports_ranks_and_the_run_name(client):
    result = fit(_ranks_and_names, client=client, checkpoint_manager=FakeManager(),
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(name="air-names"))
    assert sorted((m["rank"], m["size"], m["local"], m["name"])
                  for m in result.metrics_history) == [(0, 2, 0, "air-names"),
                                                        (1, 2, 0, "air-names")]


def test_a_resource_no_worker_has_fails_after_the_wait(client):
    import dask.config

    from dckpt.train import TrainingFailedError

    with dask.config.set({"dckpt.train.worker-wait-timeout": "200ms"}), \
            pytest.raises(TrainingFailedError, match="2 workers with GPU=1"):
        fit(_ranks_and_names, client=client, checkpoint_manager=FakeManager(),
            scaling_config=ScalingConfig(num_workers=2, use_gpu=True))


def test_rays_dataset_shard_example_runs_with_a_dask_bag(client, tmp_path):
    import dask.config

    namespace: dict = {}
    with client.as_current(), dask.config.set({"dckpt.temporary-directory": str(tmp_path)}):
        exec(_ported(DATA_INFO), namespace)  # noqa: S102 - Ray's documented example
        result = namespace["trainer"].fit()
    shards = sorted((m["world_rank"], m["world_size"], m["data_shard"])
                    for m in result.metrics_history)
    # Split as Ray splits: contiguous and equal, rank 0 first.
    assert shards == [(0, 2, [[1], [2]]), (1, 2, [[3], [4]])]


def _read_frame_shard():
    shard = get_dataset_shard()  # the only dataset needs no name
    batches = list(shard.iter_batches(batch_size=4))
    session.report({"rank": session.get_world_rank(), "parts": len(shard),
                    "ids": shard.to_pandas()["id"].tolist(),
                    "batch_rows": [len(b) for b in batches],
                    "numpy_keys": sorted(next(shard.iter_batches(batch_format="numpy")))})


def test_dataframe_partitions_are_dealt_in_contiguous_runs(client):
    pd = pytest.importorskip("pandas")
    dd = pytest.importorskip("dask.dataframe")
    frame = pd.DataFrame({"id": range(10), "x": [float(i) for i in range(10)]})
    result = fit(_read_frame_shard, client=client, checkpoint_manager=FakeManager(),
                 scaling_config=ScalingConfig(num_workers=2),
                 datasets={"frame": dd.from_pandas(frame, npartitions=5)})
    by_rank = {m["rank"]: m for m in result.metrics_history}
    assert by_rank[0]["parts"] == 3 and by_rank[1]["parts"] == 2  # [0, 1, 2], [3, 4]
    assert by_rank[0]["ids"] + by_rank[1]["ids"] == list(range(10))
    assert sum(by_rank[0]["batch_rows"]) == len(by_rank[0]["ids"])
    assert max(by_rank[0]["batch_rows"]) <= 4
    assert by_rank[0]["numpy_keys"] == ["id", "x"]


def test_runs_cover_every_partition_once():
    from dckpt.train._datasets import runs

    assert runs(5, 2) == [(0, 3), (3, 5)]
    assert runs(1, 3) == [(0, 1), (1, 1), (1, 1)]  # a rank may get no partition
    assert runs(6, 3) == [(0, 2), (2, 4), (4, 6)]


def test_get_dataset_shard_without_datasets_or_by_a_wrong_name():
    from dckpt.train._session import TrainContext
    from dckpt.train._session import session as rank_session

    class Sender:
        def send(self, report):
            pass

        def stop_requested(self):
            return False

    context = TrainContext(world_rank=0, world_size=1, local_rank=0, local_world_size=1,
                           node_rank=0, node_id="node-0", run_name="run", attempt=0)
    with rank_session(context, None, Sender()):
        with pytest.warns(UserWarning, match="given no datasets; returning None"):
            assert session.get_dataset_shard("train") is None
    with rank_session(context, None, Sender(), {"a": "shard-a", "b": "shard-b"}):
        assert session.get_dataset_shard("b") == "shard-b"
        with pytest.raises(RuntimeError, match="several datasets"):
            session.get_dataset_shard()
        with pytest.raises(KeyError, match="no dataset 'c'"):
            session.get_dataset_shard("c")
