"""Fixtures shared by every test module: storage places (memory://, a real S3 server)
and an isolated two-node cluster (node_cluster, node_client, nodes).

S3 is moto's server mode in a process of its own, reached over real HTTP on loopback
by s3fs/botocore, not a mocked client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
from distributed import Client

from dckpt.cluster import (
    NodeCluster,
    install,
    isolation_available,
    network_isolation_available,
)
from tests._clean import assert_nodes_clean
from tests._nodes import N_NODES, alive, cluster_pids
from tests._waiting import eventually

S3_START_TIMEOUT = 60.0  # seconds; moto's server answers within ~2 s here, unloaded


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Loopback never goes through a proxy, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(endpoint: str) -> bool:
    try:
        with _DIRECT.open(endpoint, timeout=1) as response:
            response.read()
    except urllib.error.HTTPError as e:
        e.close()  # an HTTP error status is still an answer
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in its own process on a free loopback port; yields its URL."""
    if importlib.util.find_spec("moto") is None:  # not imported here: it runs apart
        pytest.skip("the S3 tests need moto[server]")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    # Fake credentials in the server's environment too, so nothing can reach AWS.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(
                f"the moto S3 server on {endpoint} exited with {process.returncode}; its "
                f"log ({log_path}) ends with:\n{log_path.read_text()[-2000:]}"
            )
        return _answers(endpoint)

    try:
        eventually(answers, what=f"the moto S3 server on {endpoint} to answer (log: {log_path})",
                   timeout=S3_START_TIMEOUT)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def s3_storage_options(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """fsspec storage options that reach :func:`s3_server`.

    AWS settings of the environment are hidden meanwhile: a profile, an endpoint or a
    proxy set there must neither break the tests nor send them to real AWS.
    """
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    for name in ("NO_PROXY", "no_proxy"):  # botocore honours proxy variables
        monkeypatch.setenv(name, ",".join(filter(None, [os.environ.get(name), "127.0.0.1"])))
    return {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
    }


@pytest.fixture
def s3_bucket(s3_storage_options: dict[str, Any]) -> Iterator[str]:
    """A fresh, empty bucket for one test: ``"s3://<name>"``; removed afterwards."""
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(**s3_storage_options, skip_instance_cache=True)
    name = f"dckpt-test-{uuid.uuid4().hex[:12]}"
    # Not fs.mkdir: s3fs sends region_name as a LocationConstraint, and S3 (and moto)
    # refuse "us-east-1" as one.
    fs.call_s3("create_bucket", Bucket=name)
    try:
        yield f"s3://{name}"
    finally:
        fs.invalidate_cache()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(name, recursive=True)


@pytest.fixture
def memory_uri() -> Iterator[str]:
    """A fresh ``memory://`` prefix for one test; whatever is below it is removed after.

    The memory filesystem is one store for the whole process, hence unique names.
    """
    name = f"dckpt-test-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}"
    # Straight at the store, so that keys no listing would return (``a/../../x``) go too.
    fs = fsspec.filesystem("memory")
    path = f"/{name}"
    for key in [k for k in fs.store if k == path or k.startswith(path + "/")]:
        del fs.store[key]
    fs.pseudo_dirs[:] = [d for d in fs.pseudo_dirs if d != path and not d.startswith(path + "/")]


@pytest.fixture(scope="session")
def node_cluster() -> Iterator[NodeCluster]:
    """An isolated NodeCluster of two nodes, shared by the whole session.

    Each node has its own disk (mount namespace) and, where the machine allows it (as
    root), its own network: what crosses between nodes crosses a link, not the
    loopback. Tests that kill or restart a node leave every node running again. Skips
    where mount namespaces cannot be had: what these tests prove needs isolation.
    """
    if not isolation_available():
        pytest.skip("node isolation (mount namespaces) is not available here")
    cluster = NodeCluster(N_NODES, isolate=True, network=network_isolation_available())
    try:
        yield cluster
    finally:
        pids = cluster_pids(cluster)
        root = cluster.root
        cluster.close()
    # Nothing left behind: no processes, no files.
    assert not any(alive(pid) for pid in pids)
    assert not os.path.exists(root)


@pytest.fixture(scope="session")
def node_client(node_cluster: NodeCluster) -> Client:
    """A client of :func:`node_cluster`; not the default client, so that tests
    elsewhere do not run their computations on it by accident."""
    return node_cluster.client(set_as_default=False)


@pytest.fixture(scope="session")
def node_stores(node_client: Client) -> None:
    """dckpt installed on :func:`node_cluster`: the registry on its scheduler and a
    store on every worker, present and future (a restarted node gets one too)."""
    install(node_client)


@pytest.fixture
def nodes(node_cluster: NodeCluster, node_client: Client,
          node_stores: None) -> Iterator[tuple[str, str]]:
    """The addresses of node 0's and node 1's workers, each with a store.

    Read for each test: a test that restarts a node gives it a new address. After the
    test every node must be clean (:func:`tests._clean.assert_nodes_clean`).
    """
    yield node_cluster.nodes[0].worker_address, node_cluster.nodes[1].worker_address
    assert_nodes_clean(node_client, [node.worker_address for node in node_cluster.nodes])
