"""The parts of PredictorDeployment that need no cluster: routing, placement, the JSON
of the endpoint, and the HTTP server with a stand-in predict function."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

from dckpt.predict import ReplicaUnavailableError
from dckpt.predict._http import PredictionServer, answer
from dckpt.predict._json import BadRequestError, dump_predictions, load_request
from dckpt.predict._replica_actor import PredictorFailure, RemoteTraceback
from dckpt.predict._routing import choose_workers, least_busy

np = pytest.importorskip("numpy")

# Loopback never goes through a proxy, whatever http_proxy says.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Fake:
    name: str
    in_flight: int
    last_used: float


# -- routing and placement -------------------------------------------------------------


def test_least_busy_takes_the_fewest_in_flight_then_the_longest_idle():
    a, b, c = Fake("a", 2, 1.0), Fake("b", 1, 5.0), Fake("c", 1, 3.0)
    assert least_busy([a, b, c]) is c
    c.in_flight = 3
    assert least_busy([a, b, c]) is b
    assert least_busy([]) is None


def test_workers_are_chosen_one_per_node_first_and_never_twice():
    workers = {"w1": "n0", "w2": "n0", "w3": "n1", "w4": "n2"}
    assert choose_workers(3, workers, taken=[]) == [("w1", "n0"), ("w3", "n1"), ("w4", "n2")]
    # n0 already holds a replica on w1: the next ones go to the other nodes first.
    assert choose_workers(2, workers, taken=["w1"]) == [("w3", "n1"), ("w4", "n2")]
    assert choose_workers(5, workers, taken=["w1", "w3"]) == [("w4", "n2"), ("w2", "n0")]
    assert choose_workers(1, workers, taken=list(workers)) == []


def test_nodes_that_hold_the_checkpoint_come_first_among_equals():
    workers = {"w1": "n0", "w2": "n0", "w3": "n1", "w4": "n2"}
    assert choose_workers(1, workers, taken=[], preferred=["n2"]) == [("w4", "n2")]
    assert choose_workers(3, workers, taken=[], preferred=["n2", "n1"]) == [
        ("w4", "n2"), ("w3", "n1"), ("w1", "n0")]
    # Spreading still wins: n2 has a replica already, so the next goes elsewhere.
    assert choose_workers(1, workers, taken=["w4"], preferred=["n2", "n1"]) == [("w3", "n1")]


# -- the JSON of the endpoint ------------------------------------------------------------


def test_the_three_request_forms_give_an_array_a_dict_and_a_dataframe():
    pd = pytest.importorskip("pandas")
    rows = load_request(b'{"instances": [[1, 2], [3, 4]]}')
    assert isinstance(rows, np.ndarray) and rows.tolist() == [[1, 2], [3, 4]]
    columns = load_request(b'{"columns": {"a": [1.5, 2.5], "b": ["x", "y"]}}')
    assert set(columns) == {"a", "b"} and columns["a"].tolist() == [1.5, 2.5]
    frame = load_request(b'{"dataframe": {"a": [1, 2], "b": [3, 4]}}')
    assert isinstance(frame, pd.DataFrame) and frame["b"].tolist() == [3, 4]


@pytest.mark.parametrize(("body", "match"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[[1, 2]]", "JSON list"),
    (b"{}", "exactly one of"),
    (b'{"rows": [[1]]}', "exactly one of"),
    (b'{"instances": [[1]], "columns": {"a": [1]}}', "exactly one of"),
    (b'{"instances": [[1]], "extra": 1}', "exactly one of"),
    (b'{"instances": []}', "non-empty list"),
    (b'{"instances": [[1, 2], [3]]}', "rectangular|ragged"),
    (b'{"instances": [[1, "a", null]]}', "mixed kinds"),
    (b'{"columns": [1, 2]}', "object of columns"),
    (b'{"columns": {"a": [1], "b": [1, 2]}}', "equal length"),
    (b'{"columns": {"a": 1}}', "equal length"),
])
def test_bad_requests_are_refused_with_a_reason(body, match):
    with pytest.raises(BadRequestError, match=match):
        load_request(body)


def test_predictions_are_written_as_lists_and_a_lone_predictions_column_unwrapped():
    pd = pytest.importorskip("pandas")
    assert json.loads(dump_predictions(np.array([1.0, 2.0]))) == {"predictions": [1.0, 2.0]}
    assert json.loads(dump_predictions({"predictions": np.array([[1, 2]])})) == {
        "predictions": [[1, 2]]}
    two = pd.DataFrame({"p0": [1.0], "p1": [np.int64(2)]}, index=[7])
    assert json.loads(dump_predictions(two)) == {"predictions": {"p0": [1.0], "p1": [2]}}
    one = pd.DataFrame({"predictions": [3.0]}, index=[9])
    assert json.loads(dump_predictions(one)) == {"predictions": [3.0]}
    with pytest.raises(TypeError, match="object"):
        dump_predictions([object()])


def _failure() -> PredictorFailure:
    try:
        raise ValueError("3 features, expected 2")
    except ValueError as e:
        return PredictorFailure.of(e)


@pytest.mark.parametrize(("predict", "status", "error"), [
    (lambda batch: batch * 2, 200, None),
    (lambda batch: _failure(), 400, "the predictor raised ValueError: 3 features"),
    (lambda batch: [object()], 500, "cannot be written as JSON"),
    (lambda batch: (_ for _ in ()).throw(ReplicaUnavailableError("none ready")), 503,
     "none ready"),
    (lambda batch: 1 / 0, 500, "ZeroDivisionError"),
])
def test_each_outcome_gets_its_status_and_a_json_body(predict, status, error, caplog):
    code, body = answer(predict, b'{"instances": [1, 2]}')
    document = json.loads(body)
    assert code == status
    if error is None:
        assert document == {"predictions": [2, 4]}
    else:
        assert set(document) == {"error"} and error in document["error"]


def test_a_predictor_failure_reraises_its_error_with_the_remote_traceback():
    with pytest.raises(ValueError, match="3 features") as info:
        _failure().reraise()
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "in _failure" in str(info.value.__cause__)


def test_an_unpicklable_predictor_error_still_travels():
    class Local(Exception):  # a local class: pickle cannot find it by name
        def __reduce__(self):
            raise TypeError("no pickling")

    failure = PredictorFailure.of(Local("bad batch"))
    assert type(failure.error) is RuntimeError
    assert "Local: bad batch" in str(failure.error)


# -- the HTTP server ----------------------------------------------------------------------


@pytest.fixture
def server():
    health = {"status": "ok", "replicas": []}
    server = PredictionServer(lambda batch: batch + 1, lambda: health, "127.0.0.1", 0)
    yield server
    server.close()


def _request(server, path, body=None, method=None):
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=body,
                                     method=method)
    try:
        with DIRECT.open(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], json.load(response)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["Content-Type"], json.load(e)


def test_the_server_answers_predict_and_healthz(server):
    assert _request(server, "/predict", b'{"instances": [1, 2]}') == (
        200, "application/json", {"predictions": [2, 3]})
    assert _request(server, "/healthz")[::2] == (200, {"status": "ok", "replicas": []})


@pytest.mark.parametrize(("path", "method", "status"), [
    ("/nowhere", "GET", 404), ("/predict", "GET", 405), ("/healthz", "POST", 405),
])
def test_unknown_paths_and_methods_get_json_errors(server, path, method, status):
    body = b"{}" if method == "POST" else None
    code, content_type, document = _request(server, path, body, method)
    assert (code, content_type) == (status, "application/json")
    assert set(document) == {"error"} and document["error"]


def test_close_stops_the_port_listening_and_is_idempotent(server):
    port = server.port
    server.close()
    server.close()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))
