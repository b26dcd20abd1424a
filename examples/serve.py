"""Serve a model over HTTP from two replicas on a two-node Dask cluster.

Run it with ``python examples/serve.py`` (it needs the ``predict`` extra, ``pip install
-e '.[predict]'``, and root or user namespaces for the isolated nodes). It starts a
local cluster of two simulated nodes, fits a small linear model, deploys it as two
replicas (one per node) behind an HTTP JSON endpoint, sends a few requests with urllib,
from several threads at once, and shows what a bad request gets back.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

try:
    import numpy as np
except ModuleNotFoundError as e:  # the `predict` extra
    raise SystemExit(f"This example needs {e.name}: pip install -e '.[predict]'") from None

from dckpt.cluster import NodeCluster
from dckpt.predict import PredictorDeployment, SklearnLikePredictor, model_checkpoint

# Requests to a local address should not go through a proxy set in the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LeastSquares:
    """A linear model fitted with numpy, with the scikit-learn ``predict`` method."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> LeastSquares:
        X1 = np.column_stack([X, np.ones(len(X))])
        self.coef_ = np.linalg.lstsq(X1, y, rcond=None)[0]
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X, dtype=float) @ self.coef_[:-1] + self.coef_[-1]


def call(url: str, document: dict | bytes | None = None) -> tuple[int, dict]:
    """POST ``document`` as JSON (GET without one); the status and the JSON answer."""
    body = document if isinstance(document, bytes) or document is None else (
        json.dumps(document).encode())
    request = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    try:
        with OPENER.open(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.load(e)


def main() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2))
    y = X @ np.array([3.0, -2.0]) + 1.0 + rng.normal(scale=0.01, size=200)
    checkpoint = model_checkpoint(LeastSquares().fit(X, y))

    with NodeCluster(2, isolate=True) as cluster, cluster.client() as client:
        with PredictorDeployment(checkpoint, SklearnLikePredictor, num_replicas=2,
                                 client=client) as deployment:
            host, port = deployment.serve()
            url = f"http://{host}:{port}"
            print(f"serving at {url}")

            status, health = call(f"{url}/healthz")
            for replica in health["replicas"]:
                print(f"  replica {replica['slot']}: {replica['state']} on {replica['node']}")

            status, answer = call(f"{url}/predict", {"instances": [[1.0, 1.0], [0.0, 2.0]]})
            print(f"POST /predict instances -> {status} {answer}")

            # Eight clients at once: the requests are spread over both replicas.
            rows = [[[float(i), 0.0]] for i in range(8)]
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(
                    lambda r: call(f"{url}/predict", {"instances": r}), rows))
            print("8 concurrent requests ->",
                  [round(a["predictions"][0], 2) for _, a in answers])
            served = [r["served"] for r in deployment.health()["replicas"]]
            print(f"requests served by each replica: {served}")

            status, answer = call(f"{url}/predict", b'{"instances": [[1.0, 1.0]')
            print(f"POST /predict (malformed JSON) -> {status} {answer}")
            status, answer = call(f"{url}/predict", {"rows": [[1.0, 1.0]]})
            print(f"POST /predict (unknown form) -> {status} {answer}")
        print("deployment closed")


if __name__ == "__main__":
    main()
