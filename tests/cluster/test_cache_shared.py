"""NodeCache shared by several processes of one node, as ``dask worker --nworkers N`` runs.

Real processes (``spawn``), each with its own ``NodeCache`` on one folder, driven over a
pipe by the test: no threads stand in for processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from dckpt.cluster._cache import BOOKKEEPING_NAMES, INDEX_NAME, CheckpointId, NodeCache
from dckpt.errors import CacheFullError
from tests._waiting import eventually

CTX = multiprocessing.get_context("spawn")
DIGEST = "d" * 40
TIMEOUT = 60  # seconds; a spawned process imports dask, slow on a busy machine

# -- what runs in the peer processes --------------------------------------------------


def _stage(cache: NodeCache, checkpoint_id: str) -> str:
    staging = cache.staging_directory(CheckpointId(checkpoint_id))
    Path(staging, "data.bin").write_bytes(checkpoint_id.encode())
    return staging


def _put(cache: NodeCache, conn: Connection, checkpoint_id: str, size: int) -> str:
    return cache.add(CheckpointId(checkpoint_id), DIGEST, _stage(cache, checkpoint_id), size)


def _single_flight(
    cache: NodeCache, conn: Connection, checkpoint_id: str, size: int, hold: bool
) -> dict[str, Any]:
    """The store's intended use of transfer_lock; ``hold`` waits for "go" inside it."""
    cid = CheckpointId(checkpoint_id)
    with cache.pinned(cid):
        with cache.transfer_lock(cid):
            acquired = time.monotonic()  # CLOCK_MONOTONIC: one clock for all processes
            path = cache.lookup(cid, DIGEST)
            fetched = path is None
            if fetched:
                staging = _stage(cache, checkpoint_id)
                if hold:
                    conn.send(("event", "inside"))
                    assert conn.recv() == "go"
                path = cache.add(cid, DIGEST, staging, size)
            released = time.monotonic()
        return {"path": path, "fetched": fetched, "acquired": acquired, "released": released}


def _call(cache: NodeCache, conn: Connection, method: str, *args: Any) -> Any:
    return getattr(cache, method)(*args)


def _churn(cache: NodeCache, conn: Connection, seed: int) -> None:
    for i in range(40):
        name = CheckpointId(f"c{(i * seed) % 12}")
        with cache.pinned(name):
            if cache.lookup(name, DIGEST) is None:
                # Never full: 3 processes pin at most 300 of the 500 bytes.
                cache.add(name, DIGEST, _stage(cache, name), 100)


_COMMANDS: dict[str, Callable[..., Any]] = {
    "call": _call, "put": _put, "stage": lambda cache, conn, cid: _stage(cache, cid),
    "single_flight": _single_flight, "churn": _churn,
}


def _peer_main(conn: Connection) -> None:
    """Serve commands from the test: ``("open", (root, max_bytes))`` first, then others."""
    cache: NodeCache | None = None
    conn.send(("ok", os.getpid()))
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, ConnectionError):  # the test closed its end
            return
        try:
            if name == "ping":
                value = "pong"
            elif name == "open":
                cache = None  # the previous test's cache lets go of its pins first
                root, max_bytes = args
                cache = NodeCache(root, max_bytes=max_bytes)
                value = None
            else:
                value = _COMMANDS[name](cache, conn, *args)
        except Exception as e:  # noqa: BLE001  (re-raised by the test, by name)
            conn.send(("error", (type(e).__name__, str(e))))
        else:
            conn.send(("ok", value))


# -- the test's side ------------------------------------------------------------------


class PeerError(Exception):
    """An exception raised in a peer; ``name`` is its type's name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class Peer:
    """A process of the node with a NodeCache, doing what it is told.

    Answers with its pid once it runs (:meth:`receive` it before anything else).
    """

    def __init__(self) -> None:
        self.conn, child = CTX.Pipe()
        self.process = CTX.Process(target=_peer_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.pid: int = self.process.pid  # type: ignore[assignment]

    def send(self, name: str, *args: Any) -> None:
        self.conn.send((name, args))

    def receive(self) -> Any:
        assert self.conn.poll(TIMEOUT), f"peer {self.pid} did not answer"
        kind, value = self.conn.recv()
        if kind == "error":
            raise PeerError(*value)
        return value

    def call(self, name: str, *args: Any) -> Any:
        self.send(name, *args)
        return self.receive()

    def settle(self) -> None:
        """Make sure the peer idles, answers pending, for the next test; else kill it."""
        if not self.process.is_alive():
            return
        self.send("ping")
        while self.conn.poll(5):
            if self.conn.recv() == ("ok", "pong"):
                return
        self.kill()  # stuck in what a failed test left it doing; replaced when needed

    def kill(self) -> None:
        self.process.kill()
        self.process.join(TIMEOUT)

    def close(self) -> None:
        self.conn.close()  # the peer's recv() sees EOF and returns
        self.process.join(TIMEOUT)
        if self.process.is_alive():
            self.kill()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "node" / "cache"


def start_peers(n: int) -> list[Peer]:
    new = [Peer() for _ in range(n)]  # all start, then all are waited for
    for peer in new:
        assert peer.receive() == peer.pid
    return new


@pytest.fixture(scope="module")
def pool() -> Iterator[list[Peer]]:
    """Peer processes for the module's tests: starting one (it imports dask) is slow."""
    peers = start_peers(3)
    yield peers
    for peer in peers:
        peer.close()
    assert not any(peer.process.is_alive() for peer in peers)


@pytest.fixture
def peers(pool: list[Peer]) -> Iterator[Callable[..., list[Peer]]]:
    """``peers(root, n, max_bytes)``: ``n`` processes, each with a new NodeCache on ``root``.

    Peers that an earlier test killed are replaced first.
    """

    taken: list[Peer] = []

    def take(root: Path, n: int, max_bytes: int = 10_000) -> list[Peer]:
        dead = [i for i, peer in enumerate(pool[:n]) if not peer.process.is_alive()]
        for i, peer in zip(dead, start_peers(len(dead))):
            pool[i] = peer
        chosen = pool[:n]
        for peer in chosen:
            peer.send("open", str(root), max_bytes)
        for peer in chosen:
            peer.receive()
        taken.extend(chosen)
        return chosen

    yield take
    for peer in taken:
        peer.settle()


def listing(root: Path) -> set[str]:
    return set(os.listdir(root)) - BOOKKEEPING_NAMES


def index_ids(root: Path) -> list[str]:
    return [e["checkpoint_id"] for e in json.loads((root / INDEX_NAME).read_text())["entries"]]


def blocked_on_flock(pid: int) -> bool:
    """Whether process ``pid`` waits for an flock (a ``->`` line of /proc/locks)."""
    with open("/proc/locks") as f:
        return any(
            "->" in line and line.split()[line.split().index("->") + 4] == str(pid)
            for line in f
        )


# -- the tests ------------------------------------------------------------------------


def test_what_one_process_adds_every_process_sees(root, peers):
    a, b = peers(root, 2)
    path_a = a.call("put", "from-a", 100)
    path_b = b.call("put", "from-b", 100)

    assert a.call("call", "lookup", "from-b", DIGEST) == path_b
    assert b.call("call", "lookup", "from-a", DIGEST) == path_a
    assert sorted(index_ids(root)) == ["from-a", "from-b"]
    assert listing(root) == {os.path.basename(path_a), os.path.basename(path_b), INDEX_NAME}
    # The folder's figures are shared.
    assert a.call("call", "stats")["entries"] == b.call("call", "stats")["entries"] == 2


def test_a_live_process_s_pin_blocks_eviction_until_the_process_is_killed(root, peers):
    a, b = peers(root, 2, max_bytes=200)
    path_old = a.call("put", "old", 100)
    a.call("put", "newer", 100)
    b.call("call", "pin", "old")  # the least recently used, but in use by b

    a.call("put", "third", 100)  # needs room: "newer" goes, "old" is b's
    assert [e.checkpoint_id for e in a.call("call", "entries")] == ["old", "third"]
    assert os.path.isdir(path_old)
    with pytest.raises(PeerError, match="pinned") as info:
        a.call("call", "reserve", 200)
    assert info.value.name == "CacheFullError"

    b.kill()  # it never unpins
    a.call("put", "fourth", 100)
    assert [e.checkpoint_id for e in a.call("call", "entries")] == ["third", "fourth"]
    assert not os.path.exists(path_old)
    assert os.listdir(root / ".pins") == []  # the dead process's pin is forgotten


def test_starting_keeps_a_live_process_s_staging_and_removes_a_dead_one_s(root, peers):
    live, doomed = peers(root, 2)
    kept = live.call("put", "kept", 100)
    live_staging = live.call("stage", "in-progress")
    dead_staging = doomed.call("stage", "abandoned")
    doomed.kill()
    assert os.path.isdir(dead_staging)

    NodeCache(root, max_bytes=10_000)  # a third process starts on the folder

    assert os.path.isdir(live_staging)
    assert not os.path.exists(dead_staging)
    assert listing(root) == {
        os.path.basename(kept), os.path.basename(live_staging), INDEX_NAME
    }
    # The live process finishes its transfer as if nothing happened.
    path = live.call("call", "add", "in-progress", DIGEST, live_staging, 100)
    assert os.path.isdir(path)
    assert sorted(index_ids(root)) == ["in-progress", "kept"]


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs /proc/locks (Linux)")
def test_transfer_lock_makes_the_second_process_wait_then_find_the_first_s_copy(root, peers):
    first, second = peers(root, 2)
    first.send("single_flight", "wanted", 100, True)
    assert first.receive() == "inside"  # holds the lock, has not added yet

    second.send("single_flight", "wanted", 100, False)

    def blocked() -> bool:
        assert not second.conn.poll(0), "the second process did not wait for the lock"
        return blocked_on_flock(second.pid)

    eventually(blocked, what="the second process to block on the transfer lock")
    first.conn.send("go")
    one, two = first.receive(), second.receive()

    assert one["fetched"] and not two["fetched"]
    assert two["path"] == one["path"] and os.path.isdir(one["path"])
    assert two["acquired"] >= one["released"]
    assert index_ids(root) == ["wanted"]
    assert os.listdir(root / ".transfers") == []  # lock files do not pile up


def test_the_budget_and_the_lru_order_span_processes(root, peers):
    a, b = peers(root, 2, max_bytes=250)
    path_a = a.call("put", "a", 100)
    path_b = b.call("put", "b", 100)
    assert a.call("call", "lookup", "a", DIGEST) == path_a  # "a" is now used last
    b.call("put", "c", 100)  # 300 > 250: b evicts its own "b", not a's older "a"
    assert not os.path.exists(path_b) and os.path.isdir(path_a)
    assert index_ids(root) == ["a", "c"]
    assert a.call("call", "stats")["bytes_cached"] == b.call("call", "stats")["bytes_cached"] == 200
    with pytest.raises(CacheFullError):  # and this process is held to it too
        NodeCache(root, max_bytes=250).reserve(251)


def test_concurrent_processes_keep_the_index_and_the_folder_in_step(root, peers):
    three = peers(root, 3, max_bytes=500)
    for seed, peer in enumerate(three, start=1):
        peer.send("churn", seed)  # overlapping ids: c0..c11, the even ones, every third
    for peer in three:
        peer.receive()

    entries = json.loads((root / INDEX_NAME).read_text())["entries"]
    assert sum(e["size"] for e in entries) <= 500
    assert listing(root) == {e["dirname"] for e in entries} | {INDEX_NAME}  # no strays
    assert len({e["checkpoint_id"] for e in entries}) == len(entries) == 5
    assert os.listdir(root / ".pins") == []
