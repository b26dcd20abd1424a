"""dckpt.train.torch: TorchCheckpoint, TorchPredictor, TorchTrainer with real PyTorch.

torch==2.13.0 is a test dependency, so these run in CI. The cluster tests run on the
isolated three-node cluster of tests/train/conftest.py, with two threads per worker:
a rank of a failed attempt may still be leaving its process group when the new
attempt's rank starts on the same worker.

Ray's documented examples (``RAY_*``) are the docstring examples of Ray 2.6's
``python/ray/train/torch/torch_checkpoint.py`` (``from_state_dict``, ``from_model``)
and ``torch_predictor.py`` (``predict``, ``call_model``), with their imports changed
(``ray.train.torch`` to ``dckpt.train.torch``) and nothing else.
"""

from __future__ import annotations

import os
import threading
import uuid
import warnings

import distributed
import pytest

from dckpt import Checkpoint
from dckpt.air import RunConfig, ScalingConfig, session
from dckpt.errors import CheckpointFormatError
from dckpt.predict import BatchPredictor, PredictorDeployment
from tests.train.conftest import FakeManager, node_1_killed_at

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")
pd = pytest.importorskip("pandas")
dd = pytest.importorskip("dask.dataframe")

from torch import nn  # noqa: E402

from dckpt.train.torch import (  # noqa: E402
    TorchCheckpoint,
    TorchPredictor,
    TorchTrainer,
    get_device,
    prepare_model,
)

pytestmark = pytest.mark.slow

THREADS_PER_WORKER = 2  # read by the train_cluster fixture


def _ported(source: str) -> str:
    return source.replace("from ray.train.torch import", "from dckpt.train.torch import")


RAY_FROM_STATE_DICT = '''
import torch
import torch.nn as nn
from ray.train.torch import TorchCheckpoint

# Set manual seed
torch.manual_seed(42)

# Function to create a NN model
def create_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 10),
            nn.ReLU(),
            nn.Linear(10,1))
    return model

# Create a TorchCheckpoint from our model's state_dict
model = create_model()
checkpoint = TorchCheckpoint.from_state_dict(model.state_dict())

# Now load the model from the TorchCheckpoint by providing the
# model architecture
model_from_chkpt = checkpoint.get_model(create_model())

# Assert they have the same state dict
assert str(model.state_dict()) == str(model_from_chkpt.state_dict())
print("worked")
'''

RAY_FROM_MODEL = '''
from ray.train.torch import TorchCheckpoint
from ray.train.torch import TorchPredictor
import torch

# Set manual seed
torch.manual_seed(42)

# Create model identity and send a random tensor to it
model = torch.nn.Identity()
input = torch.randn(2, 2)
output = model(input)

# Create a checkpoint
checkpoint = TorchCheckpoint.from_model(model)

# You can use a class TorchCheckpoint to create an
# a class ray.train.torch.TorchPredictor and perform inference.
predictor = TorchPredictor.from_checkpoint(checkpoint)
pred = predictor.predict(input.numpy())

# Convert prediction dictionary value into a tensor
pred = torch.tensor(pred['predictions'])

# Assert the output from the original and checkoint model are the same
assert torch.equal(output, pred)
print("worked")
'''

RAY_PREDICT = '''
import numpy as np
import pandas as pd
import torch
from ray.train.torch import TorchPredictor

# Define a custom PyTorch module
class CustomModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = torch.nn.Linear(1, 1)
        self.linear2 = torch.nn.Linear(1, 1)

    def forward(self, input_dict: dict):
        out1 = self.linear1(input_dict["A"].unsqueeze(1))
        out2 = self.linear2(input_dict["B"].unsqueeze(1))
        return out1 + out2

# Set manul seed so we get consistent output
torch.manual_seed(42)

# Use Standard PyTorch model
model = torch.nn.Linear(2, 1)
predictor = TorchPredictor(model=model)
# Define our data
data = np.array([[1, 2], [3, 4]])
predictions = predictor.predict(data, dtype=torch.float)
print(f"Standard model predictions: {predictions}")
print("---")

# Use Custom PyTorch model with TorchPredictor
predictor = TorchPredictor(model=CustomModule())
# Define our data and predict Customer model with TorchPredictor
data = pd.DataFrame([[1, 2], [3, 4]], columns=["A", "B"])
predictions = predictor.predict(data, dtype=torch.float)
print(f"Custom model predictions: {predictions}")
'''

RAY_CALL_MODEL = '''
import numpy as np
import torch
from ray.train.torch import TorchPredictor

# List outputs are not supported by default TorchPredictor.
# So let's define a custom TorchPredictor and override call_model
class MyModel(torch.nn.Module):
    def forward(self, input_tensor):
        return [input_tensor, input_tensor]

# Use a custom predictor to format model output as a dict.
class CustomPredictor(TorchPredictor):
    def call_model(self, tensor):
        model_output = super().call_model(tensor)
        return {
            str(i): model_output[i] for i in range(len(model_output))
        }

# create our data batch
data_batch = np.array([1, 2])
# create custom predictor and predict
predictor = CustomPredictor(model=MyModel())
predictions = predictor.predict(data_batch)
print(f"Predictions: {predictions.get('0')}, {predictions.get('1')}")
'''


def _run(source: str, capsys) -> tuple[dict, str]:
    namespace: dict = {"__name__": "ray_example"}
    exec(compile(_ported(source), "<ray example>", "exec"), namespace)  # noqa: S102
    return namespace, capsys.readouterr().out


@pytest.mark.parametrize("source", [RAY_FROM_STATE_DICT, RAY_FROM_MODEL])
def test_rays_torch_checkpoint_examples_run_ported(source, capsys):
    _, out = _run(source, capsys)
    assert out == "worked\n"


def test_rays_torch_predictor_examples_run_ported(capsys):
    namespace, out = _run(RAY_PREDICT, capsys)
    assert "Standard model predictions: {'predictions': array([[" in out
    frame = namespace["predictions"]
    assert list(frame.index) == [0, 1] and frame.shape == (2, 1)
    _, out = _run(RAY_CALL_MODEL, capsys)
    assert out == "Predictions: [1 2], [1 2]\n"


# ------------------------------------------------------------------ TorchCheckpoint


def _linear(weight: float, bias: float) -> nn.Linear:
    model = nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.fill_(bias)
    return model


def test_a_torch_checkpoint_keeps_its_class_and_weights_through_every_representation(
    tmp_path,
):
    import pickle

    checkpoint = TorchCheckpoint.from_state_dict(_linear(2.0, -1.0).state_dict(),
                                                 preprocessor={"scale": 2})
    assert set(checkpoint.to_dict()) >= {"model", "_preprocessor"}  # Ray 2.6's layout
    copies = [
        checkpoint,
        Checkpoint.from_directory(checkpoint.to_directory(str(tmp_path / "dir"))),
        Checkpoint.from_bytes(checkpoint.to_bytes()),
        pickle.loads(pickle.dumps(checkpoint)),
        Checkpoint.from_uri(checkpoint.to_uri(f"file://{tmp_path}/uri")),
    ]
    for copy in copies:
        assert type(copy) is TorchCheckpoint
        model = copy.get_model(nn.Linear(1, 1))
        assert model.weight.item() == 2.0 and model.bias.item() == -1.0
        assert copy.get_preprocessor() == {"scale": 2}


def test_ddp_prefixes_and_wrappers_are_removed_as_ray_does():
    class Wrapper(nn.Module):  # stands in for DistributedDataParallel: .module inside
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = Wrapper(_linear(3.0, 1.0))
    state = wrapped.state_dict()
    assert list(state) == ["module.weight", "module.bias"]
    checkpoint = TorchCheckpoint.from_dict({"epoch": 4, "model": state})
    assert list(state) == ["module.weight", "module.bias"]  # the caller's dict as it was
    assert list(checkpoint.to_dict()["model"]) == ["weight", "bias"]
    assert checkpoint.get_model(nn.Linear(1, 1)).weight.item() == 3.0
    whole = TorchCheckpoint.from_model(wrapped)
    assert type(whole.get_model()) is nn.Linear


def test_a_directory_with_a_model_pt_is_read(tmp_path):
    torch.save(_linear(5.0, 0.5).state_dict(), tmp_path / "model.pt")
    model = TorchCheckpoint.from_directory(tmp_path).get_model(nn.Linear(1, 1))
    assert model.weight.item() == 5.0
    torch.save(_linear(6.0, 0.5), tmp_path / "model.pt")
    assert TorchCheckpoint.from_directory(tmp_path).get_model().weight.item() == 6.0


def test_get_model_errors_say_what_to_do():
    state = TorchCheckpoint.from_state_dict(_linear(1.0, 0.0).state_dict())
    with pytest.raises(ValueError, match=r"holds a state dict.*get_model\(MyModel\(\)\)"):
        state.get_model()
    with pytest.raises(CheckpointFormatError, match="holds no model"):
        TorchCheckpoint.from_dict({"weights": [1, 2]}).get_model()
    with pytest.raises(CheckpointFormatError, match="holds a list under 'model'"):
        TorchCheckpoint.from_dict({"model": [1, 2]}).get_model()
    with pytest.raises(TypeError, match="takes a torch.nn.Module"):
        TorchCheckpoint.from_model({"not": "a model"})
    whole = TorchCheckpoint.from_model(_linear(1.0, 0.0))
    with pytest.warns(UserWarning, match="holds a whole model"):
        whole.get_model(nn.Linear(1, 1))
    with pytest.raises(TypeError, match="torch_config"):
        TorchTrainer(lambda: None, torch_config=object())
    with pytest.raises(TypeError, match="setup_torch_distributed"):
        TorchTrainer(lambda: None, setup_torch_distributed=True)


def test_get_device_and_prepare_model_outside_a_run():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_device().type == expected
    model = prepare_model(nn.Linear(1, 1), parallel_strategy=None)
    assert next(model.parameters()).device.type == expected
    with pytest.raises(ValueError, match="FSDP is not supported"):
        prepare_model(nn.Linear(1, 1), parallel_strategy="fsdp")


def test_use_gpu_without_a_gpu_predicts_on_the_cpu(caplog, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import dckpt.train.torch

    monkeypatch.setattr(dckpt.train.torch, "_warned_no_gpu", threading.Event())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predictor = TorchPredictor(_linear(2.0, 0.0), use_gpu=True)
        TorchPredictor(_linear(2.0, 0.0), use_gpu=True)
    assert predictor.device.type == "cpu"
    assert caplog.text.count("found no GPU") == 1  # once per process
    out = predictor.predict(np.array([[1.0], [2.0]], dtype=np.float32))
    np.testing.assert_allclose(out["predictions"], [[2.0], [4.0]])


# ------------------------------------------------------------------ on the cluster


class TwoColumns(nn.Module):
    """A model of a DataFrame's two columns, which TorchPredictor hands it as a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, columns: dict) -> torch.Tensor:
        return self.linear(torch.stack([columns["a"], columns["b"]], dim=1)).squeeze(1)


def test_a_torch_predictor_in_batch_predictor_gives_the_local_models_predictions(client):
    torch.manual_seed(0)
    model = TwoColumns()
    checkpoint = TorchCheckpoint.from_state_dict(model.state_dict())
    frame = pd.DataFrame({"a": np.linspace(-1, 1, 300), "b": np.arange(300) / 7.0,
                          "id": np.arange(300)})
    ddf = dd.from_pandas(frame, npartitions=6)
    with BatchPredictor(checkpoint, TorchPredictor, model=TwoColumns()) as predictor:
        lazy = predictor.predict(ddf, feature_columns=["a", "b"], keep_columns=["id"],
                                 dtype=torch.float32, client=client)
        out = client.compute(lazy).result()
    with torch.no_grad():
        expected = model(
            {name: torch.tensor(frame[name].to_numpy(), dtype=torch.float32)
             for name in ("a", "b")}
        ).numpy()
    assert list(out.columns) == ["predictions", "id"]
    assert out.index.equals(frame.index) and out["id"].tolist() == frame["id"].tolist()
    np.testing.assert_allclose(out["predictions"].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_a_torch_predictor_serves_in_a_predictor_deployment(client):
    import json
    import urllib.request

    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()  # float64 as JSON's numbers come, no dtype needed
    rows = np.arange(12.0).reshape(6, 2)
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).numpy()
    with PredictorDeployment(TorchCheckpoint.from_model(model), TorchPredictor,
                             num_replicas=2, client=client) as deployment:
        out = deployment.predict(rows)
        host, port = deployment.serve()
        request = urllib.request.Request(
            f"http://{host}:{port}/predict", method="POST",
            data=json.dumps({"instances": rows.tolist()}).encode())
        # Loopback never goes through a proxy, whatever http_proxy says.
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(request, timeout=30) as response:
            status, body = response.status, json.load(response)
    np.testing.assert_allclose(out["predictions"], expected, rtol=1e-12)
    assert status == 200
    np.testing.assert_allclose(body["predictions"], expected, rtol=1e-12)


def _frame() -> pd.DataFrame:
    """y = 3x - 1 plus noise, 256 rows."""
    torch.manual_seed(0)
    x = torch.randn(256, 1)
    y = 3 * x - 1 + 0.1 * torch.randn(256, 1)
    return pd.DataFrame({"x": x[:, 0].numpy(), "y": y[:, 0].numpy()})


def _tensors(frame: pd.DataFrame) -> tuple:
    return (torch.tensor(frame[["x"]].to_numpy()), torch.tensor(frame[["y"]].to_numpy()))


def _train_linear(config):
    """DDP with Ray's API: prepare_model, TorchCheckpoint, session, a dataset shard.

    On a fresh start, every rank waits before epoch ``pause_at`` until the test has
    killed a node and set ``config["event"]``.
    """
    torch.set_num_threads(1)
    x, y = _tensors(session.get_dataset_shard("train").to_pandas())  # this rank's half
    torch.manual_seed(0)  # the same initial weights on every rank
    model = nn.Linear(1, 1)
    start, resumed_from = 0, None
    checkpoint = session.get_checkpoint()
    if checkpoint is not None:
        model = checkpoint.get_model(model)
        start = resumed_from = checkpoint.to_dict()["epoch"] + 1
    model = prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for epoch in range(start, config["epochs"]):
        if resumed_from is None and epoch == config["pause_at"]:
            distributed.Event(config["event"]).wait(60)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # DDP averages the gradients over the ranks here
        optimizer.step()
        inner = model.module if hasattr(model, "module") else model
        session.report(
            {"epoch": epoch, "loss": loss.item(), "resumed_from": resumed_from,
             "weight": inner.weight.item(), "bias": inner.bias.item(),
             "ddp": type(model).__name__, "device": str(get_device()), "rows": len(x)},
            # The DDP model's own state dict: TorchCheckpoint drops its "module." prefix.
            checkpoint=TorchCheckpoint.from_dict({"epoch": epoch, "model": model.state_dict()}),
        )


@pytest.mark.timeout(300)  # 4 processes import torch: slow on a loaded 2-core machine
def test_torch_trainer_resumes_after_a_node_dies_and_the_loss_keeps_falling(
    client, train_cluster
):
    epochs, pause_at = 10, 4
    with node_1_killed_at(train_cluster, client, pause_at - 1) as (event, manager):
        result = TorchTrainer(
            _train_linear,
            train_loop_config={"epochs": epochs, "pause_at": pause_at, "event": event,
                               "lr": 0.1},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name=f"torch-{uuid.uuid4().hex[:6]}"),
            # Each rank trains on its half; a half lost with node 1 is computed again.
            datasets={"train": dd.from_pandas(_frame(), npartitions=2)},
            checkpoint_manager=manager, max_failures=1, client=client,
        ).fit()

    assert result.failures == 1
    rank0 = [m for m in result.metrics_history if m["world_rank"] == 0]
    assert {m["ddp"] for m in rank0} == {"DistributedDataParallel"}
    assert {m["device"] for m in rank0} == {"cpu"}  # use_gpu=False
    assert {m["rows"] for m in result.metrics_history} == {128}
    resumed = [m for m in rank0 if m["attempt"] == 1]
    # The new attempt went on from the latest checkpoint (epoch pause_at - 1), not from 0.
    assert resumed[0]["resumed_from"] == pause_at
    assert [m["epoch"] for m in resumed] == list(range(pause_at, epochs))
    # One loss per epoch, the resumed attempt's after the failure: it keeps falling,
    # with no jump back up at the resume (full-batch gradient descent on a quadratic).
    curve = [m["loss"] for m in rank0 if m["attempt"] == 0 and m["epoch"] < pause_at]
    curve += [m["loss"] for m in resumed]
    assert len(curve) == epochs
    assert all(later < earlier for earlier, later in zip(curve, curve[1:])), curve
    # Only rank 0's checkpoints were kept, and the result's is a TorchCheckpoint of the
    # trained weights: those rank 0 reported after its last step.
    assert {m["world_rank"] for _, m in manager.registered} == {0}
    checkpoint = result.checkpoint
    assert isinstance(checkpoint, TorchCheckpoint)
    trained = checkpoint.get_model(nn.Linear(1, 1))
    last = result.metrics
    assert trained.weight.item() == pytest.approx(last["weight"], rel=1e-6)
    assert trained.bias.item() == pytest.approx(last["bias"], rel=1e-6)
    x, y = _tensors(_frame().iloc[:128])  # rank 0's half
    with torch.no_grad():
        final_loss = nn.functional.mse_loss(trained(x), y).item()
    assert final_loss < curve[-1]  # one step further than the last loss reported


def test_torch_trainer_on_one_rank_needs_no_ddp(client):
    def one_rank():
        model = prepare_model(nn.Linear(1, 1))
        session.report({"kind": type(model).__name__, "cpu": os.cpu_count() is not None})

    result = TorchTrainer(one_rank, scaling_config=ScalingConfig(num_workers=1),
                          checkpoint_manager=FakeManager(), client=client).fit()
    assert result.metrics["kind"] == "Linear"
