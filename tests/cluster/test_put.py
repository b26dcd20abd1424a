"""dckpt.put and the driver's push on an isolated NodeCluster: a checkpoint staged on a
node is used there without moving a byte, and a large driver-side checkpoint travels as
a reference to a copy in a worker's store."""

from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path

import dask.config
import pytest
from distributed import Client

import dckpt
from dckpt import Checkpoint
from dckpt._checkpoint import LargeInlineCheckpointWarning
from dckpt.cluster import NodeCluster, stats

pytestmark = pytest.mark.slow

SIZE = 1 << 20


def _driver_checkpoint(tmp_path: Path, seed: int) -> tuple[Checkpoint, bytes]:
    data = random.Random(f"test_put-{seed}").randbytes(SIZE)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(data)
    checkpoint = Checkpoint.from_directory(str(tmp_path / "model"))
    checkpoint.set_metadata({"seed": seed})
    return checkpoint, data


def _read(checkpoint: Checkpoint) -> tuple[bytes, dict, str]:
    """On a worker: the weights, the metadata and the node that read them."""
    from dckpt import _node

    with checkpoint.as_directory() as directory, \
            open(os.path.join(directory, "weights.bin"), "rb") as f:
        return f.read(), checkpoint.get_metadata(), _node.node_id()


def _make_on_worker(seed: int) -> Checkpoint:
    from dckpt import _node

    path = os.path.join(_node.node_root(), f"put-{seed}")
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(random.Random(f"test_put-{seed}").randbytes(SIZE))
    return Checkpoint.from_directory(path)


def _received(client: Client) -> dict[str, tuple[int, int]]:
    return {a: (s["transfers"], s["bytes_received"]) for a, s in stats(client).items()}


def _node_ids(cluster: NodeCluster) -> list[str]:
    return [n.node_id for n in cluster.nodes]


def test_put_stages_a_driver_checkpoint_so_that_use_moves_nothing(
    tmp_path: Path, node_cluster: NodeCluster, node_client: Client, nodes: tuple[str, str]
):
    checkpoint, data = _driver_checkpoint(tmp_path, seed=11)
    before = _received(node_client)
    staged = dckpt.put(checkpoint, client=node_client)  # every node
    kind, ref = staged.get_internal_representation()
    assert kind == "node_ref" and ref.size == SIZE
    assert len(pickle.dumps(staged)) < 2048
    after_put = _received(node_client)
    # Pushed to one node, fetched by the other: each received the bytes once.
    for address in nodes:
        assert after_put[address][1] - before[address][1] == SIZE

    results = [node_client.submit(_read, staged, workers=[a], pure=False).result() for a in nodes]
    for (weights, metadata, node_id), expected_node in zip(results, _node_ids(node_cluster)):
        assert weights == data and metadata == {"seed": 11} and node_id == expected_node
    assert _received(node_client) == after_put  # using it moved no byte


def test_put_of_a_worker_checkpoint_fetches_it_on_the_chosen_node(
    node_cluster: NodeCluster, node_client: Client, nodes: tuple[str, str]
):
    owner, other = nodes
    made = node_client.submit(_make_on_worker, 12, workers=[owner], pure=False).result()
    before = _received(node_client)
    staged = dckpt.put(made, [node_cluster.nodes[1].node_id], client=node_client)
    assert staged.get_internal_representation() == made.get_internal_representation()
    after_put = _received(node_client)
    assert after_put[other][0] - before[other][0] == 1
    assert after_put[owner] == before[owner]
    weights, _, _ = node_client.submit(_read, staged, workers=[other], pure=False).result()
    assert weights == random.Random("test_put-12").randbytes(SIZE)
    assert _received(node_client) == after_put


def test_put_of_a_worker_checkpoint_read_on_the_driver_does_not_push_it(
    tmp_path: Path, node_cluster: NodeCluster, node_client: Client, nodes: tuple[str, str]
):
    owner, other = nodes
    made = node_client.submit(_make_on_worker, 16, workers=[owner], pure=False).result()
    with dask.config.set({"dckpt.temporary-directory": str(tmp_path)}), \
            node_client.as_current(), made.as_directory() as directory:
        assert (Path(directory) / "weights.bin").stat().st_size == SIZE  # a driver copy
    before = _received(node_client)
    staged = dckpt.put(made, [node_cluster.nodes[1].node_id], client=node_client)
    after = _received(node_client)
    assert after[owner] == before[owner]  # nothing pushed to the owner's node
    assert after[other][0] - before[other][0] == 1  # fetched from the owner
    assert staged.get_internal_representation()[1].node_id == node_cluster.nodes[0].node_id


def test_put_refuses_unknown_nodes(tmp_path: Path, node_client: Client, nodes: tuple[str, str]):
    checkpoint, _ = _driver_checkpoint(tmp_path, seed=13)
    with pytest.raises(ValueError, match="'no-such-node' is neither a node id nor a worker"):
        dckpt.put(checkpoint, ["no-such-node"], client=node_client)
    with pytest.raises(ValueError, match="at least one node"):
        dckpt.put(checkpoint, [], client=node_client)


def test_a_large_driver_checkpoint_is_pushed_when_pickled(
    tmp_path: Path, node_client: Client, nodes: tuple[str, str]
):
    checkpoint, data = _driver_checkpoint(tmp_path, seed=14)
    with dask.config.set({"dckpt.inline-max-bytes": "64KiB"}), node_client.as_current(), \
            warnings.catch_warnings():
        warnings.simplefilter("error", LargeInlineCheckpointWarning)
        pickled = pickle.dumps(checkpoint)
        again = pickle.dumps(checkpoint)
    assert len(pickled) < 2048
    assert pickle.loads(again).get_internal_representation() == \
        pickle.loads(pickled).get_internal_representation()
    for address in nodes:
        weights, metadata, _ = node_client.submit(
            _read, pickle.loads(pickled), workers=[address], pure=False
        ).result()
        assert weights == data and metadata == {"seed": 14}


def test_without_a_client_a_large_checkpoint_still_travels_inline(tmp_path: Path):
    checkpoint, _ = _driver_checkpoint(tmp_path, seed=15)
    with dask.config.set({"dckpt.inline-max-bytes": "64KiB"}), \
            pytest.warns(LargeInlineCheckpointWarning):
        copy = pickle.loads(pickle.dumps(checkpoint))
    assert copy.get_internal_representation()[0] == "data_dict"
