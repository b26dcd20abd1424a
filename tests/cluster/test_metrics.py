"""dckpt's Prometheus metrics, scraped over HTTP from the workers' and the scheduler's
``/metrics``, as Prometheus would, on an isolated two-node cluster with HTTP servers."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from distributed import Client
from prometheus_client.parser import text_string_to_metric_families

from dckpt.cluster import (
    DckptSchedulerPlugin,
    NodeCluster,
    stats,
)
from dckpt.cluster._store import store_of
from tests._waiting import eventually
from tests._web_nodes import client, cluster  # noqa: F401 (fixtures)
from tests.cluster.test_registry import write

pytestmark = pytest.mark.slow

#: Prometheus sample name -> where dckpt.cluster.stats() has the value.
COUNTERS = {
    "dckpt_bytes_sent_total": ("bytes_sent",),
    "dckpt_bytes_received_total": ("bytes_received",),
    "dckpt_bytes_reused_total": ("bytes_reused",),
    "dckpt_transfers_total": ("transfers",),
    "dckpt_chunks_sent_total": ("chunks_sent",),
    "dckpt_cache_hits_total": ("cache_hits",),
    "dckpt_cache_misses_total": ("cache_misses",),
    "dckpt_cache_evictions_total": ("cache", "evictions"),
}
GAUGES = {
    "dckpt_cache_bytes": ("cache", "bytes_cached"),
    "dckpt_cache_max_bytes": ("cache", "max_bytes"),
    "dckpt_cache_entries": ("cache", "entries"),
    "dckpt_cache_pinned": ("cache", "pinned"),
    "dckpt_registered_checkpoints": ("registered",),
}




def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` at ``port``: ``{(sample name, sorted labels): value}`` of dckpt's."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("dckpt_"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_each_workers_metrics_equal_its_stores_counters(cluster: NodeCluster, client: Client):
    owner, receiver = (n.worker_address for n in cluster.nodes)
    checkpoint_id, digest = write(client, owner, seed=31)
    store_of(receiver, client).fetch(owner, checkpoint_id, digest).result()  # node-1 reads it
    # The fetch has returned: nothing moves any more, so the counters hold still.
    counters = stats(client)
    assert counters[owner]["bytes_sent"] > 0 and counters[receiver]["bytes_received"] > 0

    workers = client.scheduler_info(n_workers=-1)["workers"]
    for address, expected in counters.items():
        samples = scrape(workers[address]["services"]["dashboard"])
        labels = (("node", expected["node_id"]), ("worker", address))
        for name, where in {**COUNTERS, **GAUGES}.items():
            value = expected
            for key in where:
                value = value[key]
            assert samples[(name, labels)] == value, (address, name)
        # One worker per process: no other store's series.
        assert {dict(lab)["worker"] for _, lab in samples} == {address}


def test_the_schedulers_metrics_count_checkpoints_and_holders(cluster: NodeCluster,
                                                              client: Client):
    owner, receiver = (n.worker_address for n in cluster.nodes)
    checkpoint_id, digest = write(client, owner, seed=32)
    store_of(receiver, client).fetch(owner, checkpoint_id, digest).result()
    held = {owner: "origin", receiver: "cached"}
    registry = eventually(
        lambda: client.run_on_scheduler(_held_by_each),
        lambda r: all(checkpoint_id in r.get(a, {}).get(kind, ()) for a, kind in held.items()),
        "the registry holding the checkpoint on both nodes",
    )
    # Nothing moves any more: the registry holds still between its read and the scrape.
    samples = scrape(client.scheduler_info()["services"]["dashboard"])
    everything = set().union(*(set(k["origin"]) | set(k["cached"]) for k in registry.values()))
    assert samples[("dckpt_checkpoints", ())] == len(everything) >= 1
    for address, node in zip((owner, receiver), ("node-0", "node-1")):
        for kind in ("origin", "cached"):
            labels = (("kind", kind), ("node", node), ("worker", address))
            assert samples[("dckpt_checkpoint_holdings", labels)] == len(registry[address][kind])
        assert samples[("dckpt_transfers_in_progress", (("node", node), ("worker", address)))] == 0


def _held_by_each(dask_scheduler: Any) -> dict[str, dict[str, list[str]]]:
    return {n["address"]: {"origin": list(n["origin"]), "cached": list(n["cached"])}
            for n in dask_scheduler.plugins["dckpt"].nodes()}


def test_without_prometheus_client_nothing_is_registered(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    from dckpt.cluster import _metrics
    from dckpt.cluster._store import NodeStore

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    monkeypatch.setattr(_metrics, "_worker_collector", None)
    monkeypatch.setattr(_metrics, "_scheduler_collector", None)
    store = NodeStore(None, cache_root=str(tmp_path / "cache"),
                      served_root=str(tmp_path / "served"))
    _metrics.register_worker_metrics(store)  # quietly: warnings are errors here
    _metrics.register_scheduler_metrics(DckptSchedulerPlugin())
    assert _metrics._worker_collector is None and _metrics._scheduler_collector is None
