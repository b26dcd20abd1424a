"""What the worker plugin reports beside the holdings: the store's counters and the
receives into its cache in progress (take_snapshot), in one process."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from dckpt._transfer import ChunkSource, ChunkSpec, build_manifest, receive_directory
from dckpt.cluster._store import NodeStore
from dckpt.cluster._worker_plugin import take_snapshot

MiB = 1 << 20


def test_a_receive_into_the_cache_is_reported_with_how_far_it_is(tmp_path: Path):
    store = NodeStore(None, cache_root=str(tmp_path / "cache"),
                      served_root=str(tmp_path / "served"))
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    (source_dir / "weights.bin").write_bytes(os.urandom(4 * MiB))
    manifest = build_manifest(source_dir)
    elsewhere = tmp_path / "not-the-cache"

    async def run() -> tuple[list[dict[str, object]], list[dict[str, object]]]:
        half_way = asyncio.Event()
        go_on = asyncio.Event()
        with ChunkSource(str(source_dir), manifest, MiB) as source:
            async def stream(specs: Sequence[ChunkSpec]) -> AsyncIterator[tuple[ChunkSpec, bytes]]:
                for i, spec in enumerate(specs):
                    if i == 2:
                        half_way.set()
                        await go_on.wait()
                    yield spec, source.read_chunk(spec)

            staging = os.path.join(store.stats()["cache"]["root"], ".staging-test")
            # One frame written at a time: the third is asked for once the first is
            # written and while the second is (receiving overlaps writing), so the
            # second is done soon after, and nothing more until the stream goes on.
            into_cache = asyncio.ensure_future(receive_directory(
                manifest, stream, staging, chunk_bytes=MiB, max_in_flight=1,
                source="the store of node-0"))
            await half_way.wait()
            for _ in range(2000):  # bounded: the second write needs nothing from us
                during = take_snapshot(store)["fetching"]
                if during and during[0]["done"] == 2 * MiB:
                    break
                await asyncio.sleep(0.005)
            go_on.set()
            await into_cache
            # A receive elsewhere (not into this store's cache) is not this store's.
            await receive_directory(manifest, _all(source), elsewhere, chunk_bytes=MiB)
        return during, take_snapshot(store)["fetching"]

    during, after = asyncio.run(run())
    assert during == [{"checkpoint_id": manifest.content_id, "source": "the store of node-0",
                       "done": 2 * MiB, "total": 4 * MiB}]
    assert after == []
    snapshot = take_snapshot(store)
    assert snapshot["stats"]["cache"]["max_bytes"] > 0 and snapshot["pinned"] == []


def _all(source: ChunkSource):  # type: ignore[no-untyped-def]
    async def stream(specs: Sequence[ChunkSpec]) -> AsyncIterator[tuple[ChunkSpec, bytes]]:
        for spec in specs:
            yield spec, source.read_chunk(spec)
    return stream
