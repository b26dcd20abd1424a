"""A chunk's buffer is not read into again before its write is done, in whatever order
the writes end (dckpt.cluster._stream's ring of buffers, written by receive_directory's
writer threads)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import dask.config
from distributed.comm import Comm, connect, listen

from dckpt._transfer import ChunkSource, build_manifest
from dckpt._transfer import _receive as receive_module
from dckpt.cluster._stream import serve_chunks, stream_over

CHUNK = 64 * 1024
IN_FLIGHT = 3


def test_a_slow_first_write_keeps_its_buffer(tmp_path: Path, monkeypatch: Any):
    """The first chunk's write waits while the later ones finish: with FIRST_COMPLETED
    the receiver read chunk 5 into chunk 1's buffer (a ring of IN_FLIGHT + 1) before
    chunk 1 was written, and wrote chunk 5's bytes at chunk 1's place (seen once in a
    full run: a file whose bytes did not hash to its manifest's hash)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    # A file a chunk: writes of one file wait for each other (its hash is taken in
    # order), those of different files do not.
    for i in range(8):
        (src / f"shard-{i}.bin").write_bytes(bytes([i]) * CHUNK)
    manifest = build_manifest(src)
    first, fifth = (manifest.files.index(next(e for e in manifest.files
                                               if e.path == f"shard-{i}.bin")) for i in (0, 4))
    fifth_written = threading.Event()
    real = receive_module._write_chunk

    def write(frame: Any, spec: Any, *args: Any) -> None:
        if spec.file_index == first:
            # Until chunk 5 is written, or long enough for it to be had if the receiver
            # would read it now: the pass of a correct receiver costs this wait.
            fifth_written.wait(timeout=2)
        real(frame, spec, *args)
        if spec.file_index == fifth:
            fifth_written.set()

    monkeypatch.setattr(receive_module, "_write_chunk", write)

    async def main() -> None:
        async def serve(comm: Comm) -> None:
            with ChunkSource(str(src), manifest, CHUNK) as source:
                await serve_chunks(comm, source)
            await comm.close()

        listener = await listen("tcp://127.0.0.1", serve)
        try:
            comm = await connect(listener.contact_address)
            await stream_over(comm, "the test sender", manifest, str(dst), chunk_bytes=CHUNK)
            await comm.close()
        finally:
            listener.stop()

    with dask.config.set({"dckpt.transfer.max-in-flight": IN_FLIGHT,
                          "dckpt.transfer.retries": 0}):
        asyncio.run(main())
    for i in range(8):
        assert (dst / f"shard-{i}.bin").read_bytes() == bytes([i]) * CHUNK
