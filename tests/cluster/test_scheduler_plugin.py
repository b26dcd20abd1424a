"""The scheduler plugin's handlers, in process: distributed's own ``gen_cluster`` tier.

A scheduler and three workers share the test's process and event loop (a second or
two, not the tens of a ``NodeCluster``); the plugin is installed for real, its worker
half too. Once each worker's store has sent its first snapshot (empty; no other is
due for an hour, ``dckpt.registry.refresh``), a test sends crafted snapshots for those
workers through the scheduler's comm, as worker plugins do, and reads the answers the
way stores and clients do. It proves nothing about locality: the workers share a disk.

``validate=False`` for the workers: a store is kept among a worker's actors without a
task (``dckpt._compat.set_actor_instance``), which the state validation that
``gen_cluster`` turns on rejects (``KeyError: 'dckpt-node-store'``).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dask.config
from distributed import Client, Scheduler, Worker
from distributed.utils_test import async_poll_for, gen_cluster

from dckpt.cluster import DckptSchedulerPlugin, checkpoints, who_has

X, Y, Z = "x" * 32, "y" * 32, "z" * 32

Test = Callable[[Client, Scheduler, list[Worker], DckptSchedulerPlugin], Awaitable[None]]


def with_registry(test: Test) -> Callable[..., Any]:
    """A ``gen_cluster`` test of three workers with the plugin set up:
    ``test(client, scheduler, workers, plugin)``."""

    @gen_cluster(client=True, nthreads=[("127.0.0.1", 1)] * 3,
                 worker_kwargs={"validate": False})
    async def run(c: Client, s: Scheduler, a: Worker, b: Worker, w: Worker,
                  tmp_path: Path) -> None:
        settings = {"dckpt.registry.refresh": "1h", "dckpt.registry.interval": "50ms",
                    "dckpt.dashboard.page": None, "dckpt.node-root": str(tmp_path)}
        with dask.config.set(settings):
            await c.register_plugin(DckptSchedulerPlugin())
            plugin = s.plugins["dckpt"]
            assert isinstance(plugin, DckptSchedulerPlugin)
            await async_poll_for(lambda: all(
                entry["node_id"] is not None for entry in plugin.dckpt_registry().values()
            ), timeout=30)
            await test(c, s, sorted([a, b, w], key=lambda x: x.address), plugin)

    return functools.wraps(test)(run)


async def report(c: Client, worker: Worker, node_id: str, **holdings: Any) -> str:
    """Send ``worker``'s snapshot to the scheduler as its plugin would; the status."""
    answer = await c.scheduler.dckpt_holdings(address=worker.address, node_id=node_id,
                                              holdings=holdings)
    return str(answer["status"])


async def holders(c: Client, checkpoint_id: str, **kwargs: Any) -> dict[str, Any]:
    """The registry's ``dckpt_holders`` answer, as a store reads it."""
    answer = await c.scheduler.dckpt_holders(checkpoint_id=checkpoint_id, **kwargs)
    return {"holders": [dict(h) for h in answer["holders"]],
            "node_addresses": list(answer["node_addresses"]),
            "address_alive": answer["address_alive"]}


@with_registry
async def test_the_handlers_answer_from_the_last_snapshots(c, s, workers, plugin):
    a, b, w = workers
    assert await report(c, a, "node-a", origin={X: 100, Y: 5}, uris={X: ["s3://b/x"]},
                        restored=[Y]) == "OK"
    assert await report(c, b, "node-b", cached={X: 100}, serving=2) == "OK"
    # A new snapshot replaces the old one: w held Z, then nothing.
    assert await report(c, w, "node-w", origin={Z: 1}) == "OK"
    assert await report(c, w, "node-w") == "OK"

    assert await who_has(c, [X, Y, Z]) == {
        X: {"origin": [a.address], "cached": [b.address]},
        Y: {"origin": [a.address], "cached": []},
        Z: {"origin": [], "cached": []},
    }
    assert await holders(c, X, node_id="node-a", address=a.address) == {
        "holders": [
            {"address": a.address, "node_id": "node-a", "kind": "origin", "serving": 0},
            {"address": b.address, "node_id": "node-b", "kind": "cached", "serving": 2},
        ],
        "node_addresses": [a.address],
        "address_alive": True,
    }
    assert await checkpoints(c) == {
        X: {"size": 100, "uris": ["s3://b/x"], "holders": [
            {"node_id": "node-a", "address": a.address, "kind": "origin"},
            {"node_id": "node-b", "address": b.address, "kind": "cached"}]},
        Y: {"size": 5, "uris": [], "holders": [
            {"node_id": "node-a", "address": a.address, "kind": "restarted"}]},
    }


@with_registry
async def test_a_snapshot_from_a_worker_the_scheduler_does_not_know_is_ignored(
        c, s, workers, plugin):
    answer = await c.scheduler.dckpt_holdings(address="tcp://127.0.0.1:1", node_id="ghost",
                                              holdings={"origin": {X: 1}})
    assert answer["status"] == "unknown-worker"
    assert await who_has(c, X) == {X: {"origin": [], "cached": []}}
    assert "tcp://127.0.0.1:1" not in plugin.dckpt_registry()


@with_registry
async def test_a_removed_worker_is_dropped_from_the_registry(c, s, workers, plugin):
    a, b, w = workers
    await report(c, a, "node-a", origin={X: 100})
    await report(c, b, "node-b", cached={X: 100})
    gone = a.address
    await a.close()
    await async_poll_for(lambda: gone not in s.workers, timeout=30)
    assert await who_has(c, X) == {X: {"origin": [], "cached": [b.address]}}
    answer = await holders(c, X, node_id="node-a", address=gone)
    assert [h["address"] for h in answer["holders"]] == [b.address]
    assert answer["node_addresses"] == [] and answer["address_alive"] is False
    # A snapshot that arrives late does not bring it back.
    assert await c.scheduler.dckpt_holdings(address=gone, node_id="node-a",
                                            holdings={"origin": {X: 100}}) == {
        "status": "unknown-worker"}
    assert gone not in plugin.dckpt_registry()


@with_registry
async def test_downscaling_keeps_the_last_holder_of_a_registered_checkpoint(
        c, s, workers, plugin):
    a, b, w = workers
    await report(c, a, "node-a", origin={X: 100})
    await report(c, b, "node-b", cached={X: 100, Y: 7})  # Y: no one registered it
    candidates = [s.workers[x.address] for x in workers]
    # a may go (b keeps X), then b may not (it is X's last), w holds nothing.
    assert plugin.valid_workers_downscaling(s, candidates) == [candidates[0], candidates[2]]
    # In the other order b goes first, and a is kept.
    assert plugin.valid_workers_downscaling(s, candidates[::-1]) == [
        candidates[2], candidates[1]]
    # distributed asks the plugin when it picks whom to retire.
    assert b.address not in s.workers_to_close(n=3)
    with dask.config.set({"dckpt.registry.keep-sole-holders": False}):
        assert plugin.valid_workers_downscaling(s, candidates) == candidates
    # Once a's copy is gone too, nothing is registered and anyone may go.
    await report(c, a, "node-a")
    assert plugin.valid_workers_downscaling(s, candidates) == candidates


@with_registry
async def test_simultaneous_readers_form_a_chain_that_is_pruned(c, s, workers, plugin):
    a, b, w = workers
    await report(c, a, "node-a", origin={X: 100, Y: 50})

    async def ask(checkpoint_id: str, asker: str, node: str) -> list[tuple[str, str]]:
        answer = await holders(c, checkpoint_id, asker=asker, asker_node=node)
        return [(h["address"], h["kind"]) for h in answer["holders"]]

    # The first reader pulls from the origin; each later one from the reader before it.
    assert await ask(X, b.address, "node-b") == [(a.address, "origin")]
    assert await ask(X, w.address, "node-w") == [(b.address, "fetching"), (a.address, "origin")]
    assert await ask(X, "tcp://127.0.0.1:3", "node-3") == [(w.address, "fetching"),
                                                            (a.address, "origin")]
    # A reader is never sent to its own node's fetcher (nor to one that has a reader).
    assert await ask(X, "tcp://127.0.0.1:4", "node-3") == [(a.address, "origin")]

    # A fetcher whose snapshot holds the checkpoint is a cached holder, no fetcher.
    assert await ask(Y, b.address, "node-b") == [(a.address, "origin")]
    await report(c, b, "node-b", cached={Y: 50})
    assert await ask(Y, w.address, "node-w") == [(a.address, "origin"), (b.address, "cached")]
    # A fetcher that left the cluster is named no more.
    await w.close()
    await async_poll_for(lambda: w.address not in s.workers, timeout=30)
    assert await ask(Y, "tcp://127.0.0.1:5", "node-5") == [(a.address, "origin"),
                                                            (b.address, "cached")]
