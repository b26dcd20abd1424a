"""Shared filesystems found, not only configured (dckpt.cluster._shared).

Units: the fingerprint of a directory, on this machine's disk. Then two isolated nodes
that share one bind-mounted folder and no ``dckpt.shared-paths``: a checkpoint under it
is used in place (0 bytes move), and a same-named folder with other content on the
reader's own disk is not mistaken for the origin's.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest
from distributed import Client

from dckpt import Checkpoint
from dckpt.cluster import NodeCluster, install, isolation_available, stats
from dckpt.cluster._shared import (
    Fingerprint,
    _mount_of,
    fingerprint,
    remembered,
    same_files,
)

pytestmark = pytest.mark.slow  # the cluster tests below; the units take milliseconds

# -- the fingerprint, on this machine -------------------------------------------------


def _tree(root: Path) -> str:
    (root / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(b"w" * 1000)
    (root / "sub" / "config.json").write_text('{"a": 1}')
    (root / "link").symlink_to("weights.bin")
    return str(root)


def _fingerprint(path: str) -> Fingerprint:
    found = fingerprint(path)
    assert found is not None
    return found


@pytest.fixture
def tree(tmp_path: Path) -> str:
    return _tree(tmp_path / "ckpt")


def test_the_same_directory_matches_and_its_mount_is_remembered(tree):
    fp = _fingerprint(tree)
    assert fp.entries == 5  # itself, sub, sub/config.json, weights.bin, link
    assert same_files(tree, fp, "node-a") == (True, "")
    assert fingerprint(tree) == fp  # reading it changes nothing
    mount = _mount_of(os.path.realpath(tree))
    assert mount is not None
    assert remembered()[("node-a", mount.point)] == fp.device


@pytest.mark.parametrize("change", [
    pytest.param(lambda root: os.utime(root / "weights.bin", ns=(0, 10**18)), id="mtime"),
    pytest.param(lambda root: (root / "weights.bin").write_bytes(b"w" * 1001), id="size"),
    pytest.param(lambda root: (root / "sub" / "extra").write_bytes(b""), id="extra-file"),
    pytest.param(lambda root: (root / "sub" / "config.json").unlink(), id="missing-file"),
    pytest.param(lambda root: os.chmod(root / "weights.bin", 0o600), id="mode"),
    pytest.param(lambda root: ((root / "link").unlink(), (root / "link").symlink_to("sub")),
                 id="link-target"),
    pytest.param(lambda root: os.rename(root / "sub" / "config.json", root / "sub" / "c.json"),
                 id="renamed"),
])
def test_a_change_makes_it_differ(tree, change):
    fp = _fingerprint(tree)
    assert same_files(tree, fp, "node-a")[0]  # remembered as shared
    change(Path(tree))
    assert _fingerprint(tree) != fp
    # ... and a prefix remembered as shared is not used for a directory that differs
    same, why_not = same_files(tree, fp, "node-a")
    assert not same and why_not == f"{tree} here holds other files than on node node-a"


def test_a_copy_at_the_same_path_with_the_same_times_differs(tree, tmp_path):
    """What another node's own disk might hold at the same path: the same names, sizes,
    modes and mtimes — other inodes and ctimes, so other files."""
    fp = _fingerprint(tree)
    shutil.move(tree, tmp_path / "moved")
    shutil.copytree(tmp_path / "moved", tree, symlinks=True, copy_function=shutil.copy2)
    assert not same_files(tree, fp, "node-b")[0]


def test_another_filesystem_is_never_compared(tree):
    fp = dataclasses.replace(_fingerprint(tree), device="another-machine 8:1")
    same, why_not = same_files(tree, fp, "node-a")
    assert not same and "not on the filesystem of the origin" in why_not
    # Across machines only a listed network filesystem type with the same export counts.
    mount = _mount_of(os.path.realpath(tree))
    assert mount is not None
    with dask.config.set({"dckpt.shared-filesystem-types": [mount.fstype]}):
        assert same_files(tree, fp, "node-a") == (True, "")
        moved = dataclasses.replace(fp, export=fp.export + "-elsewhere")
        assert not same_files(tree, moved, "node-a")[0]


def test_a_missing_path_or_no_fingerprint_is_not_the_same(tree, tmp_path):
    fp = _fingerprint(tree)
    assert same_files(str(tmp_path / "nowhere"), fp, "node-a") == (
        False, f"{tmp_path / 'nowhere'} does not exist here")
    assert same_files(tree, None, "node-a") == (False, "the reference carries no fingerprint")
    (tmp_path / "file").write_bytes(b"")
    assert not same_files(str(tmp_path / "file"), fp, "node-a")[0]


def test_finding_can_be_turned_off(tree):
    fp = _fingerprint(tree)
    with dask.config.set({"dckpt.find-shared-paths": False}):
        assert fingerprint(tree) is None
        assert same_files(tree, fp, "node-a") == (
            False, "finding shared paths is off (dckpt.find-shared-paths)")


def test_the_fingerprint_stays_small_whatever_the_number_of_files(tmp_path):
    small = _fingerprint(_tree(tmp_path / "small"))
    many = tmp_path / "many"
    many.mkdir()
    for i in range(2000):
        (many / f"file-{i:05d}").write_bytes(b"x")
    large = _fingerprint(str(many))
    assert large.entries == 2001
    assert len(pickle.dumps(large)) == len(pickle.dumps(small)) < 512


def test_a_reader_with_more_entries_stops_walking_early(tree):
    fp = _fingerprint(tree)
    for i in range(100):
        Path(tree, "sub", f"extra-{i}").write_bytes(b"")
    from dckpt.cluster import _shared

    assert _shared._walk(tree, limit=fp.entries)[0] == fp.entries + 1


def test_mount_points_with_escaped_characters_are_read_back():
    from dckpt.cluster._shared import _unescape

    assert _unescape(r"/mnt/with\040space\011tab\134back") == "/mnt/with space\ttab\\back"
    assert _unescape("/mnt/caf\u00e9") == "/mnt/caf\u00e9"


# -- two isolated nodes that share one folder -----------------------------------------

SIZE = 1 << 20


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[NodeCluster]:
    """Two isolated nodes sharing the folder ``<node root>/shared``; no shared-paths."""
    if not isolation_available():
        pytest.skip("node isolation (mount namespaces) is not available here")
    with NodeCluster(2, isolate=True, shared_folders=["shared"]) as cluster:
        with cluster.client(set_as_default=False) as client:
            install(client)
        yield cluster


@pytest.fixture(scope="module")
def client(shared_cluster: NodeCluster) -> Client:
    return shared_cluster.client(set_as_default=False)


def _make(folder: str, name: str, seed: int) -> Checkpoint:
    """On a worker: a checkpoint of two files under ``<node root>/<folder>``."""
    from dckpt import _node

    path = os.path.join(_node.node_root(), folder, name)
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(random.Random(f"test_shared-{seed}").randbytes(SIZE))
    with open(os.path.join(path, "step"), "w") as f:
        f.write(str(seed))
    return Checkpoint.from_directory(path)


def _read(checkpoint: Checkpoint) -> tuple[str, bytes, str, dict[tuple[str, str], str]]:
    """On a worker: where the data is, and what it is."""
    from dckpt.cluster._shared import remembered

    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "weights.bin"), "rb") as f:
            weights = f.read()
        with open(os.path.join(directory, "step")) as f:
            step = f.read()
    return directory, weights, step, remembered()


def _times(path: str) -> dict[str, int]:
    """On a worker: the mtimes of the files of ``path``."""
    return {name: os.stat(os.path.join(path, name)).st_mtime_ns for name in os.listdir(path)}


def _impostor(path: str, times: dict[str, int]) -> None:
    """On a worker: a folder at ``path`` with the names, sizes and mtimes of another
    node's checkpoint there, and other bytes."""
    os.makedirs(path)
    with open(os.path.join(path, "weights.bin"), "wb") as f:
        f.write(b"\0" * SIZE)
    with open(os.path.join(path, "step"), "w") as f:
        f.write("0")
    for name, mtime in times.items():
        os.utime(os.path.join(path, name), ns=(mtime, mtime))


def _counters(client: Client) -> dict[str, tuple[int, int, int]]:
    return {a: (s["transfers"], s["bytes_received"], s["bytes_sent"])
            for a, s in stats(client).items()}


def _on(client: Client, cluster: NodeCluster, index: int, func, *args):
    return client.submit(func, *args, workers=[cluster.nodes[index].worker_address],
                         pure=False).result()


def _listing(path: str) -> list[str]:
    return sorted(os.listdir(path))


def test_the_shared_folder_is_one_folder_at_one_path_on_every_node(shared_cluster, client):
    host = Path(shared_cluster.shared_folder("shared"))
    (host / "from-the-driver").write_text("x")
    inside = os.path.join(shared_cluster.nodes[0].root, "shared")
    assert all(n.root == shared_cluster.nodes[0].root for n in shared_cluster.nodes)
    assert client.run(_listing, inside) == {
        n.worker_address: ["from-the-driver"] for n in shared_cluster.nodes}
    # The rest of a node's root stays its own.
    _on(client, shared_cluster, 0, _make, ".", "private", 0)
    assert "private" not in _on(client, shared_cluster, 1, _listing,
                                shared_cluster.nodes[1].root)
    (host / "from-the-driver").unlink()
    with pytest.raises(KeyError, match="no shared folder 'other'"):
        shared_cluster.shared_folder("other")


def test_a_checkpoint_under_the_shared_folder_is_used_in_place(shared_cluster, client):
    checkpoint = _on(client, shared_cluster, 0, _make, "shared", "ckpt-1", 1)
    ref = checkpoint.get_internal_representation()[1]
    assert ref.fingerprint is not None
    assert len(pickle.dumps(checkpoint)) < 2048
    before = _counters(client)

    where, weights, step, found = _on(client, shared_cluster, 1, _read, checkpoint)

    assert where == ref.path  # in place, not in node 1's cache
    assert weights == random.Random("test_shared-1").randbytes(SIZE) and step == "1"
    assert _counters(client) == before  # 0 bytes moved, no transfer anywhere
    shared = os.path.join(shared_cluster.nodes[1].root, "shared")
    assert found[("node-0", shared)].startswith(ref.fingerprint.device)


def test_a_same_named_folder_on_the_readers_own_disk_is_not_mistaken_for_it(
    shared_cluster, client
):
    checkpoint = _on(client, shared_cluster, 0, _make, ".", "ckpt-2", 2)  # node 0's own disk
    ref = checkpoint.get_internal_representation()[1]
    times = _on(client, shared_cluster, 0, _times, ref.path)
    _on(client, shared_cluster, 1, _impostor, ref.path, times)
    reader = shared_cluster.nodes[1].worker_address
    before = _counters(client)[reader]

    where, weights, step, _ = _on(client, shared_cluster, 1, _read, checkpoint)

    assert where != ref.path
    assert weights == random.Random("test_shared-2").randbytes(SIZE) and step == "2"
    after = _counters(client)[reader]
    assert after[0] - before[0] == 1 and after[1] - before[1] == SIZE + 1
    # node 1's own folder is left as it was
    assert _on(client, shared_cluster, 1, _read_file, os.path.join(ref.path, "step")) == "0"


def _read_file(path: str) -> str:
    with open(path) as f:
        return f.read()
