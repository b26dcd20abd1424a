"""Incremental checkpoints on the isolated two-node cluster: a node that holds step N
fetches only the files of step N+1 whose content it lacks, links the rest from its
cache, and its cache counts the shared bytes once.

The nodes share no disk, so the bytes that are not fetched must come from the
receiving node's own cache.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid

import pytest
from distributed import Client

from dckpt import Checkpoint
from dckpt.cluster import stats

pytestmark = pytest.mark.slow

MiB = 1 << 20
WEIGHTS = 3 * MiB
TOKENS = 64 << 10
FROZEN = WEIGHTS + TOKENS
HEAD = MiB


def _write_step(seed: int, base: str | None = None) -> tuple[Checkpoint, str]:
    """On a worker: a checkpoint of frozen weights (the same every step, a copy of
    ``base``'s when given, mtimes kept) and a head of its own, under this node's root.
    Bytes no other test writes: the cache of the session's cluster may hold anything
    else."""
    from dckpt import node_root

    path = _write_step_here(node_root(), base, seed)
    return Checkpoint.from_directory(path), path


def _change_in_place_keeping_size_and_mtime(path: str) -> None:
    """On a worker: other bytes in the frozen weights, their size and mtime as before."""
    name = os.path.join(path, "frozen", "base.bin")
    st = os.stat(name)
    with open(name, "r+b") as f:
        f.seek(WEIGHTS // 2)
        f.write(os.urandom(64))
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(name).st_size, os.stat(name).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return Checkpoint.from_directory(path)


def _read(checkpoint: Checkpoint) -> dict[str, bytes]:
    """On a worker: every file of the checkpoint as this node sees it."""
    with checkpoint.as_directory() as directory:
        out = {}
        for dirpath, _, filenames in os.walk(directory):
            for name in filenames:
                with open(os.path.join(dirpath, name), "rb") as f:
                    out[os.path.relpath(os.path.join(dirpath, name), directory)] = f.read()
        return out


def _inodes(*checkpoints: Checkpoint) -> list[int]:
    """On a worker: the inode of the frozen file in this node's copy of each."""
    inodes = []
    for checkpoint in checkpoints:
        with checkpoint.as_directory() as directory:
            inodes.append(os.stat(os.path.join(directory, "frozen", "base.bin")).st_ino)
    return inodes


def _figures(client: Client, owner: str, receiver: str) -> dict[str, int]:
    s = stats(client)
    return {"sent": s[owner]["bytes_sent"], "received": s[receiver]["bytes_received"],
            "reused": s[receiver]["bytes_reused"], "transfers": s[receiver]["transfers"],
            "cached": s[receiver]["cache"]["bytes_cached"]}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in before}


def _on(client: Client, address: str, fn, *args):
    return client.submit(fn, *args, workers=[address], pure=False).result()


def test_step_n_plus_1_moves_only_its_changed_file(node_client: Client, nodes):
    owner, receiver = nodes
    first, first_path = _on(node_client, owner, _write_step, 1)
    second, _ = _on(node_client, owner, _write_step, 2, first_path)

    before = _figures(node_client, owner, receiver)
    expected_first = _on(node_client, owner, _read, first)
    assert _on(node_client, receiver, _read, first) == expected_first
    middle = _figures(node_client, owner, receiver)
    assert _delta(before, middle) == {"sent": FROZEN + HEAD, "received": FROZEN + HEAD,
                                      "reused": 0, "transfers": 1, "cached": FROZEN + HEAD}

    expected_second = _on(node_client, owner, _read, second)
    assert _on(node_client, receiver, _read, second) == expected_second
    after = _figures(node_client, owner, receiver)
    # Only the head crossed; the frozen file was linked from step 1's copy, and the
    # cache holds its bytes once.
    assert _delta(middle, after) == {"sent": HEAD, "received": HEAD, "reused": FROZEN,
                                     "transfers": 1, "cached": HEAD}
    inode_first, inode_second = _on(node_client, receiver, _inodes, first, second)
    assert inode_first == inode_second


def test_a_file_changed_with_its_size_and_mtime_kept_is_still_fetched(node_client: Client,
                                                                      nodes):
    owner, receiver = nodes
    first, first_path = _on(node_client, owner, _write_step, 3)
    # copytree keeps the mtimes of step 1's frozen files
    _, second_path = _on(node_client, owner, _write_step, 4, first_path)
    second = _on(node_client, owner, _change_in_place_keeping_size_and_mtime, second_path)
    _on(node_client, receiver, _read, first)

    before = _figures(node_client, owner, receiver)
    expected = _on(node_client, owner, _read, second)
    assert _on(node_client, receiver, _read, second) == expected
    after = _figures(node_client, owner, receiver)
    # base.bin has step 1's size and mtime, not its content: fetched, like the new
    # head; tokens.txt is step 1's: linked.
    assert _delta(before, after) == {"sent": WEIGHTS + HEAD, "received": WEIGHTS + HEAD,
                                     "reused": TOKENS, "transfers": 1,
                                     "cached": WEIGHTS + HEAD}


def _write_step_here(root: str, base: str | None = None, seed: int = 0) -> str:
    """The directory of a step under ``root`` (see :func:`_write_step`)."""
    path = os.path.join(root, f"step-{uuid.uuid4().hex[:8]}")
    if base is None:
        os.makedirs(os.path.join(path, "frozen"))
        rng = random.Random(f"frozen-{uuid.uuid4()}")  # a run of its own: nothing cached
        with open(os.path.join(path, "frozen", "base.bin"), "wb") as f:
            f.write(rng.randbytes(WEIGHTS))
        with open(os.path.join(path, "frozen", "tokens.txt"), "wb") as f:
            f.write(rng.randbytes(TOKENS))
    else:
        shutil.copytree(os.path.join(base, "frozen"), os.path.join(path, "frozen"))
    with open(os.path.join(path, "head.bin"), "wb") as f:
        f.write(random.Random(f"head-{seed}-{uuid.uuid4()}").randbytes(HEAD))
    return path


def test_a_push_from_the_driver_sends_only_what_the_node_lacks(tmp_path, node_cluster,
                                                              node_client: Client, nodes):
    import dckpt

    _, receiver = nodes
    node_id = node_cluster.nodes[1].node_id
    first = _write_step_here(str(tmp_path))
    second = _write_step_here(str(tmp_path), first)
    def received() -> int:
        return stats(node_client)[receiver]["bytes_received"]

    before = received()
    dckpt.put(Checkpoint.from_directory(first), [node_id], client=node_client)
    middle = received()
    assert middle - before == FROZEN + HEAD
    staged = dckpt.put(Checkpoint.from_directory(second), [node_id], client=node_client)
    assert received() - middle == HEAD
    assert _on(node_client, receiver, _read, staged) == _read(Checkpoint.from_directory(second))
    assert received() - middle == HEAD  # reading the staged copy moved nothing
