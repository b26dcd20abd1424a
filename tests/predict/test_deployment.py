"""PredictorDeployment on the shared isolated cluster: real worker processes, one per node.

The ``deployment`` fixture has a replica on each of the two nodes; a test that kills a
node starts it again, as the session fixture asks.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle
import pytest
from distributed import Event

import dckpt._node
from dckpt import Checkpoint
from dckpt.cluster import isolation_available, stats
from dckpt.predict import (
    FunctionPredictor,
    PredictorDeployment,
    ReplicaUnavailableError,
    SklearnLikePredictor,
    model_checkpoint,
)
from dckpt.predict._replica_actor import RemoteTraceback
from tests._waiting import eventually

np = pytest.importorskip("numpy")

from tests.predict._models import Linear, Scale  # after importorskip: needs numpy

pytestmark = pytest.mark.slow

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
HOLD_TIMEOUT = 60  # seconds; only bounds a hang


def node_after(model, batch):
    """Each row's answer is the id of the node that scored it.

    A batch made by :func:`held` first sets the event ``<name>-started`` and then waits
    for the event ``<name>``, so that a test decides when each request finishes.
    """
    name = str(batch["hold"][0])
    if name:
        Event(f"{name}-started").set()
        if not Event(name).wait(timeout=HOLD_TIMEOUT):
            raise TimeoutError(f"the test never set the event {name!r}")
    return np.array([dckpt._node.node_id()] * len(batch["hold"]))


def held(name: str) -> dict:
    """A one-row batch that :func:`node_after` answers once the event ``name`` is set."""
    return {"hold": np.array([name])}


def free() -> dict:
    """A one-row batch that :func:`node_after` answers at once."""
    return {"hold": np.array([""])}


def new_hold(client) -> tuple[str, Event, Event]:
    """A fresh hold name, with its "started" event and the event that releases it."""
    name = f"dckpt-test-hold-{uuid.uuid4().hex[:8]}"
    return name, Event(f"{name}-started", client=client), Event(name, client=client)


def in_flight(deployment) -> int:
    return sum(r.get("in_flight", 0) for r in deployment.health()["replicas"])


CHECKPOINT = model_checkpoint(Linear([1.0, 10.0], b=0.5), preprocessor=Scale())
ECHO = model_checkpoint(None)  # for node_after, which needs no model


@pytest.fixture
def deployment(node_client, nodes):
    """Two replicas of CHECKPOINT, one on each node; one per test, since a test that
    kills a node would leave a shared one with a replacement on the other node."""
    with PredictorDeployment(CHECKPOINT, SklearnLikePredictor, num_replicas=2,
                             client=node_client) as deployment:
        yield deployment


@pytest.fixture
def url(deployment):
    host, port = deployment.serve()
    return f"http://{host}:{port}"


def post(url: str, document) -> tuple[int, dict]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    request = urllib.request.Request(f"{url}/predict", data=body, method="POST")
    return _open(request)


def _open(request) -> tuple[int, dict]:
    try:
        with DIRECT.open(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.load(e)


def local(batch, **kwargs):
    return SklearnLikePredictor.from_checkpoint(CHECKPOINT).predict(batch, **kwargs)


def test_replicas_sit_on_distinct_nodes_and_answer_like_a_local_predictor(deployment):
    health = deployment.health()
    assert health["status"] == "ok"
    assert sorted(r["node"] for r in health["replicas"]) == ["node-0", "node-1"]
    rows = np.arange(12.0).reshape(6, 2)
    assert deployment.predict(rows).tolist() == local(rows).tolist()
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "id": [7, 8]}, index=[5, 6])
    out = deployment.predict(frame, feature_columns=["a", "b"])
    pd.testing.assert_frame_equal(out, local(frame, feature_columns=["a", "b"]))


def test_a_predictor_error_reaches_the_caller_and_the_replica_stays(deployment):
    served = sum(r["served"] for r in deployment.health()["replicas"])
    with pytest.raises(ValueError, match="mismatch|shape|align") as info:
        deployment.predict(np.ones((2, 3)))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "_predict" in str(info.value.__cause__)  # the replica's own traceback
    health = deployment.health()
    assert health["status"] == "ok"
    assert sum(r["served"] for r in health["replicas"]) == served + 1


def test_requests_go_to_the_least_busy_replica(node_client):
    with PredictorDeployment(ECHO, FunctionPredictor, num_replicas=2,
                             client=node_client, fn=node_after) as deployment, \
            ThreadPoolExecutor(4) as pool:
        name, started, release = new_hold(node_client)
        try:
            long = pool.submit(deployment.predict, held(name))
            assert started.wait(timeout=HOLD_TIMEOUT)
            # One replica is busy until the test releases it: every short request goes
            # to the other one, in turn (round robin would put one behind the long one).
            short = [deployment.predict(free())["predictions"][0] for _ in range(3)]
        finally:
            release.set()
        busy = long.result()["predictions"][0]
        assert len(set(short)) == 1 and busy not in short

        # Concurrent requests spread over both replicas: none ends before all are sent.
        name, _, release = new_hold(node_client)
        try:
            calls = [pool.submit(deployment.predict, held(name)) for _ in range(4)]
            eventually(lambda: in_flight(deployment), lambda n: n == 4,
                       "4 requests in flight")
        finally:
            release.set()
        nodes = [call.result()["predictions"][0] for call in calls]
    assert sorted(nodes) == ["node-0", "node-0", "node-1", "node-1"]


def test_http_answers_concurrent_requests_in_each_form(url):
    rows = [np.random.default_rng(i).normal(size=(i + 1, 2)).round(3) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda r: post(url, {"instances": r.tolist()}), rows))
    for batch, (status, document) in zip(rows, answers):
        assert status == 200
        assert document["predictions"] == pytest.approx(local(batch).tolist())
    pd = pytest.importorskip("pandas")
    frame = {"dataframe": {"a": [1.0, 0.0], "b": [0.0, 1.0]}}
    assert post(url, frame) == (200, {"predictions": local(pd.DataFrame(
        frame["dataframe"]))["predictions"].tolist()})


def test_healthz_lists_the_replicas(url, deployment):
    status, document = _open(urllib.request.Request(f"{url}/healthz"))
    assert status == 200 and document["status"] == "ok"
    assert [r["state"] for r in document["replicas"]] == ["ready", "ready"]
    assert {r["worker"] for r in document["replicas"]} == {
        r["worker"] for r in deployment.health()["replicas"]}


@pytest.mark.parametrize(("body", "match"), [
    (b'{"instances": [[1, 2]', "not JSON"),
    (b'{"inputs": [[1, 2]]}', "exactly one of"),
    (b'{"instances": [[1, 2], [3]]}', "rectangular|ragged"),
    (b'{"instances": [[1, 2, 3]]}', "the predictor raised ValueError"),
])
def test_http_bad_requests_get_400_and_a_json_error(url, body, match):
    status, document = post(url, body)
    assert status == 400
    assert list(document) == ["error"]
    assert re.search(match, document["error"])


def test_close_stops_the_port_and_the_replicas(node_client):
    # Other tests' deployments may still be leaving: only this one's replica counts.
    before = _replica_actors(node_client)
    deployment = PredictorDeployment(CHECKPOINT, SklearnLikePredictor, client=node_client)
    host, port = deployment.serve()
    mine = _replica_actors(node_client) - before
    assert len(mine) == 1
    assert post(f"http://{host}:{port}", {"instances": [[1, 1]]})[0] == 200
    deployment.close()
    deployment.close()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect((host, port))
    with pytest.raises(ReplicaUnavailableError, match="closed"):
        deployment.predict(np.ones((1, 2)))
    with pytest.raises(RuntimeError, match="closed"):
        deployment.serve()
    assert deployment.health()["status"] == "unavailable"
    # Nothing is left on the workers: the actor is gone.
    eventually(lambda: _replica_actors(node_client) & mine, lambda left: not left,
               "the closed deployment's replica to leave its worker")


def _replica_actors(client) -> set[str]:
    actors = client.run(lambda dask_worker: list(dask_worker.state.actors))
    return {key for keys in actors.values() for key in keys if key.startswith("dckpt-replica")}


def _model_directory(persist_to: str | None = None) -> Checkpoint:
    """A directory checkpoint on the node that runs this (pickles as a node reference),
    also uploaded to ``persist_to`` when given (the reference then carries that URI)."""
    path = os.path.join(dckpt._node.node_root(), f"model-{uuid.uuid4().hex[:8]}")
    os.makedirs(path)
    with open(os.path.join(path, "model.pkl"), "wb") as f:
        cloudpickle.dump(Linear([1.0, 10.0], b=0.5), f)
    checkpoint = Checkpoint.from_directory(path)
    if persist_to is not None:
        checkpoint.to_uri(persist_to)
    return checkpoint


def test_a_replica_whose_worker_dies_is_replaced_and_its_requests_answered(
    node_cluster, node_client, nodes, tmp_path
):
    # Node 1 owns it; a copy at a URI that every node sees outlives node 1.
    checkpoint = node_client.submit(_model_directory, f"file://{tmp_path}/model",
                                    workers=[nodes[1]], pure=False).result()
    assert checkpoint.get_internal_representation()[0] == "node_ref"
    before = {a: stats(node_client)[a]["transfers"] for a in nodes}
    try:
        with PredictorDeployment(checkpoint, FunctionPredictor, client=node_client,
                                 fn=node_after) as deployment:
            # One replica, on the node that holds the checkpoint: nothing was copied.
            [replica] = deployment.health()["replicas"]
            assert replica["node"] == "node-1"
            assert {a: stats(node_client)[a]["transfers"] for a in nodes} == before
            name, started, release = new_hold(node_client)
            with ThreadPoolExecutor(3) as pool:
                try:
                    calls = [pool.submit(deployment.predict, held(name)) for _ in range(3)]
                    eventually(lambda: in_flight(deployment), lambda n: n == 3,
                               "3 requests in flight")
                    assert started.wait(timeout=HOLD_TIMEOUT)  # node 1 is computing
                    node_cluster.kill_node(1)
                finally:
                    release.set()  # the requests retried on the replacement go through
                answers = [call.result(timeout=60)["predictions"][0] for call in calls]
            # Answered by the replacement on node 0, which had the checkpoint from the URI.
            assert answers == ["node-0"] * 3
            [replica] = deployment.health()["replicas"]
            assert (replica["state"], replica["node"]) == ("ready", "node-0")
            assert deployment.predict(free())["predictions"].tolist() == ["node-0"]
            assert stats(node_client)[nodes[0]]["transfers"] == before[nodes[0]] + 1
    finally:
        node_cluster.restart_node(1)


def test_the_serve_example_runs():
    if not isolation_available():
        pytest.skip("the example isolates its nodes (mount namespaces)")
    example = Path(__file__).resolve().parents[2] / "examples" / "serve.py"
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "POST /predict (malformed JSON) -> 400" in result.stdout
    assert "8 concurrent requests -> [1.0, 4.0, 7.0" in result.stdout
