"""The packed byte format: round trips, integrity checks and hostile archives."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import struct
import threading
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.config
import lz4.frame
import pytest
import xxhash
from fsspec.callbacks import Callback

from dckpt._formats import (
    CHUNK_HEADER,
    FORMAT_VERSION,
    MAGIC,
    ArchiveEntry,
    ArchiveReader,
    ArchiveWriter,
    is_packed,
    pack_directory,
    pack_directory_to_bytes,
    pack_directory_to_file,
    unpack_directory,
    unpack_to_directory,
)
from dckpt._formats._tree import copy_tree
from dckpt.errors import (
    CheckpointError,
    CheckpointFormatError,
    CorruptChunkError,
    UnsafePathError,
)
from tests._trees import make_tree
from tests.data.make_packed_v1 import build_v1_tree

MiB = 1 << 20
V1_FIXTURE = Path(__file__).parent / "data" / "packed-v1.bin"


# --- helpers ---------------------------------------------------------------------------


def snapshot(root: str | os.PathLike[str]) -> dict[str, tuple]:
    """``relpath -> ("dir", mode) | ("file", bytes, mode) | ("link", target)``, no following."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", Path(path).read_bytes(), stat.S_IMODE(st.st_mode))
    return out


def unpack_fresh(data: bytes, base: Path, name: str = "out") -> Path:
    target = base / name
    target.mkdir()
    unpack_to_directory(data, target)
    return target


@dataclass(frozen=True)
class Record:
    """One record as fields, encoded by :func:`craft` in either version's layout."""

    kind: bytes
    path: bytes
    payload: bytes
    mode: int
    size: int
    path_len: int


def record(kind: bytes, path: str | bytes, payload: bytes = b"", *, mode: int = 0o644,
           size: int | None = None, path_len: int | None = None) -> Record:
    raw = path.encode() if isinstance(path, str) else path
    size = len(payload) if size is None else size
    path_len = len(raw) if path_len is None else path_len
    return Record(kind, raw, payload, mode, size, path_len)


def _v1_record(rec: Record) -> bytes:
    return struct.pack(">cIQI", rec.kind, rec.mode, rec.size, rec.path_len) + rec.path + rec.payload


def _v2_record(rec: Record, chain: xxhash.xxh3_64) -> bytes:
    """Version 2: header + path + extra + xxh3_64, then a file's payload as one raw piece."""
    extra = {b"L": rec.payload, b"Z": chain.digest()}.get(rec.kind, b"")
    body = struct.pack(">cIQI", rec.kind, rec.mode, rec.size, rec.path_len) + rec.path + extra
    checksum = struct.pack(">Q", xxhash.xxh3_64_intdigest(body))
    chain.update(checksum)
    out = body + checksum
    if rec.kind == b"F" and rec.payload:
        prefix = struct.pack(">I", len(rec.payload)) + CHUNK_HEADER.pack(
            0, len(rec.payload), xxhash.xxh3_64_intdigest(rec.payload))
        chain.update(prefix)
        out += prefix + rec.payload
    return out


def craft(*records: Record, count: int | None = None, end: bool = True,
          after_end: bytes = b"", version: int = FORMAT_VERSION, flags: int = 0,
          layout: int | None = None) -> bytes:
    """An archive written by hand, byte by byte: the writer refuses to make hostile ones.

    ``layout`` is the version whose body is written (``version`` when ``None``), so that
    a header can claim another version than its body has.
    """
    layout = version if layout is None else layout
    if end:
        records += (record(b"Z", "", size=len(records) if count is None else count, mode=0),)
    if layout == 1:
        body = b"".join(_v1_record(rec) for rec in records) + after_end
        payload = lz4.frame.compress(body, content_checksum=True, block_checksum=True)
    else:
        chain = xxhash.xxh3_64()
        payload = b"".join(_v2_record(rec, chain) for rec in records) + after_end
    return struct.pack(">8sHH", MAGIC, version, flags) + payload


class RecordingCallback(Callback):
    """Remembers every size and update it is given, and the children it hands out."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []
        self.updates: list[int] = []
        self.children: list[tuple[str, str, RecordingCallback]] = []

    def set_size(self, size: int) -> None:
        self.sizes.append(size)
        super().set_size(size)

    def relative_update(self, inc: int = 1) -> None:
        self.updates.append(inc)
        super().relative_update(inc)

    def branched(self, path_1: str, path_2: str, **kwargs: object) -> RecordingCallback:
        child = RecordingCallback()
        self.children.append((path_1, path_2, child))
        return child


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tree with every shape the format must carry, plus links leading outside it."""
    outside = tmp_path / "outside"
    (outside / "dir" / "deeper").mkdir(parents=True)
    (outside / "data.bin").write_bytes(b"outside file")
    (outside / "dir" / "deeper" / "x.txt").write_text("outside dir")
    root = Path(make_tree(tmp_path / "src"))
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep")
    (root / "big.bin").write_bytes(os.urandom(5 * MiB))
    (root / "private.txt").write_text("secret")
    (root / "private.txt").chmod(0o600)
    (root / "restricted").mkdir()
    (root / "restricted").chmod(0o750)
    (root / "link_to_file").symlink_to("notes.txt")
    (root / "link_to_dir").symlink_to("model")
    (root / "a" / "b" / "up_link").symlink_to("../../notes.txt")
    (root / "outside_file").symlink_to("../outside/data.bin")
    (root / "outside_abs_dir").symlink_to(outside / "dir")
    return root


# --- round trips -----------------------------------------------------------------------


def test_round_trip_preserves_contents_modes_and_inside_links(tree: Path, tmp_path: Path):
    data = pack_directory_to_bytes(tree)
    assert is_packed(data) and is_packed(memoryview(data)) and not is_packed(b"PK\x03\x04")
    out = unpack_fresh(data, tmp_path)

    expected = snapshot(tree)
    # Links leading outside the tree are stored as what they point to.
    outside = tmp_path / "outside"
    expected["outside_file"] = ("file", b"outside file", _mode(outside / "data.bin"))
    expected["outside_abs_dir"] = ("dir", _mode(outside / "dir"))
    expected.update({f"outside_abs_dir/{k}": v for k, v in snapshot(outside / "dir").items()})
    assert snapshot(out) == expected

    assert os.readlink(out / "link_to_dir") == "model"
    assert os.readlink(out / "a" / "b" / "up_link") == "../../notes.txt"
    assert (out / "empty_dir").is_dir() and not any((out / "empty_dir").iterdir())
    assert (out / "empty_file").read_bytes() == b""
    assert os.stat(out / "run.sh").st_mode & 0o111 == 0o111
    assert stat.S_IMODE(os.stat(out / "private.txt").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / "restricted").st_mode) == 0o750
    assert (out / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_packing_is_deterministic(tree: Path, tmp_path: Path):
    first = pack_directory_to_bytes(tree)
    second = io.BytesIO()
    pack_directory(tree, second)
    assert first == second.getvalue()

    # Same files created in opposite orders (listdir order may differ): same bytes.
    names = [f"f{i:02d}" for i in range(30)]
    for order, root in ((names, tmp_path / "one"), (names[::-1], tmp_path / "two")):
        (root / "sub").mkdir(parents=True)
        for name in order:
            (root / "sub" / name).write_text(name)
            (root / name).write_text(name)
    assert pack_directory_to_bytes(tmp_path / "one") == pack_directory_to_bytes(tmp_path / "two")
    paths = [entry.path for entry in ArchiveReader(io.BytesIO(first))]
    top = [path for path in paths if "/" not in path]
    assert top == sorted(top) and paths.index("model") < paths.index("model/weights.bin")


def test_exclude_drops_files_and_whole_directories(tree: Path, tmp_path: Path):
    seen: list[str] = []

    def exclude(relpath: str) -> bool:
        seen.append(relpath)
        return relpath in {"notes.txt", "a/b", "big.bin"}

    out = unpack_fresh(pack_directory_to_bytes(tree, exclude=exclude), tmp_path)
    names = set(snapshot(out))
    assert "notes.txt" not in names and "big.bin" not in names
    assert "a" in names and not any(name.startswith("a/b") for name in names)
    assert "model/weights.bin" in names
    # Called with paths relative to the root, never for what lies below an excluded dir.
    assert "a/b" in seen and "a/b/c" not in seen


def test_add_tree_with_prefix_and_an_empty_root(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_bytes(b"x")
    out = io.BytesIO()
    with ArchiveWriter(out) as writer:
        writer.add_tree(tmp_path / "empty", prefix="e")
        writer.add_tree(tmp_path / "full", prefix="deep/er")
    target = unpack_fresh(out.getvalue(), tmp_path)
    assert (target / "e").is_dir() and not any((target / "e").iterdir())
    assert (target / "deep" / "er" / "f").read_bytes() == b"x"


def test_writer_api_entries_and_reader_payloads(tmp_path: Path):
    (tmp_path / "src.bin").write_bytes(b"from disk")
    (tmp_path / "src.bin").chmod(0o640)
    out = io.BytesIO()
    with ArchiveWriter(out, compression_level=9) as writer:
        writer.add_directory("d", mode=0o700)
        writer.add_bytes("d/inline.txt", b"inline", mode=0o4755)  # setuid is dropped
        writer.add_file("d/file.bin", tmp_path / "src.bin")
        writer.add_symlink("d/link", "inline.txt")
        writer.add_bytes("skipped.txt", b"never read")
    reader = ArchiveReader(io.BytesIO(out.getvalue()))
    entries = []
    for entry in reader:
        entries.append(entry)
        if entry.path == "d/inline.txt":
            assert reader.read_payload() == b"inline"
            with pytest.raises(RuntimeError, match="already read"):
                reader.read_payload()
        elif entry.path == "d/file.bin":
            sink, callback = io.BytesIO(), RecordingCallback()
            reader.copy_payload(sink, callback=callback)
            assert sink.getvalue() == b"from disk"
            assert callback.sizes == [9] and sum(callback.updates) == 9
        elif entry.kind != "file":
            with pytest.raises(RuntimeError, match="no file payload"):
                reader.read_payload()
    assert entries == [
        ArchiveEntry("directory", "d", 0o700, 0),
        ArchiveEntry("file", "d/inline.txt", 0o755, 6),
        ArchiveEntry("file", "d/file.bin", 0o640, 9),
        ArchiveEntry("symlink", "d/link", 0o777, 10, "inline.txt"),
        ArchiveEntry("file", "skipped.txt", 0o644, 10),
    ]
    with pytest.raises(RuntimeError, match="only once"):
        next(iter(reader))


def test_unpack_drops_setuid_and_keeps_directories_writable(tmp_path: Path):
    data = craft(record(b"D", "ro", mode=0o500), record(b"F", "ro/tool", b"#!", mode=0o6755),
                 record(b"F", "sticky", b"", mode=0o1777))
    out = unpack_fresh(data, tmp_path)
    assert stat.S_IMODE(os.stat(out / "ro").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(out / "ro" / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(out / "sticky").st_mode) == 0o777


def test_unpack_creates_missing_parents_and_accepts_a_directory_after_its_files(tmp_path: Path):
    data = craft(record(b"F", "x/y/z.txt", b"z"), record(b"D", "x", mode=0o750))
    out = unpack_fresh(data, tmp_path)
    assert (out / "x" / "y" / "z.txt").read_bytes() == b"z"
    assert stat.S_IMODE(os.stat(out / "x").st_mode) == 0o750


def test_unpack_refuses_a_target_that_is_not_empty(tmp_path: Path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "old").write_bytes(b"")
    with pytest.raises(ValueError, match="not empty"):
        unpack_to_directory(craft(record(b"F", "f", b"1")), tmp_path / "t")


def test_files_pack_and_unpack_as_streams_atomically_at_the_target(tree: Path, tmp_path: Path):
    packed = tmp_path / "out" / "tree.dckpt"
    packed.parent.mkdir()
    pack_directory_to_file(tree, packed)
    assert packed.read_bytes() == pack_directory_to_bytes(tree)
    (tmp_path / "expected").mkdir()
    unpack_to_directory(packed.read_bytes(), tmp_path / "expected")
    expected = snapshot(tmp_path / "expected")
    target = tmp_path / "unpacked"
    target.mkdir()
    (target / "old").write_bytes(b"replaced as a whole")
    with open(packed, "rb") as f:
        unpack_directory(f, target)
    assert snapshot(target) == expected
    assert os.listdir(packed.parent) == ["tree.dckpt"]  # no staging left beside it

    data = packed.read_bytes()
    flipped = bytearray(data)
    flipped[data.index((tree / "big.bin").read_bytes()[: 1 << 10]) + 3 * MiB] ^= 0x04
    for damaged, match in [(data[: len(data) // 2], "truncated"),
                           (bytes(flipped), "corrupted"),  # in big.bin's first raw piece
                           (craft(record(b"F", "../escape", b"x")), r"\.\."),
                           (craft(record(b"F", "/abs", b"x")), "absolute")]:
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(CheckpointFormatError, match=match):
            unpack_directory(io.BytesIO(damaged), target)
        assert snapshot(target) == expected  # untouched
        assert sorted(os.listdir(tmp_path)) == before  # nothing half-written beside it
    assert not (tmp_path / "escape").exists()


# --- versions, pieces and checksums ---------------------------------------------------


def test_data_packed_by_version_1_still_unpacks_to_the_same_tree(tmp_path: Path):
    data = V1_FIXTURE.read_bytes()  # written by the version 1 writer, never regenerated
    assert struct.unpack(">8sHH", data[:12]) == (MAGIC, 1, 0)
    assert ArchiveReader(io.BytesIO(data)).version == 1
    expected = snapshot(build_v1_tree(tmp_path / "expected"))
    out = unpack_fresh(data, tmp_path)
    assert snapshot(out) == expected
    # Read as a stream from a named file too, and packed again: now version 2.
    target = tmp_path / "streamed"
    with open(V1_FIXTURE, "rb") as f:
        unpack_directory(f, target)
    assert snapshot(target) == expected
    again = pack_directory_to_bytes(out)
    assert ArchiveReader(io.BytesIO(again)).version == FORMAT_VERSION == 2
    assert snapshot(unpack_fresh(again, tmp_path, "again")) == expected


def _pieces(data: bytes) -> list[tuple[int, int, int, int]]:
    """``(offset of the payload, flags, raw length, stored length)`` of every piece of an
    archive of one file, parsed by hand from the documented layout."""
    fixed = struct.Struct(">cIQI")
    kind, _, size, path_len = fixed.unpack_from(data, 12)
    assert kind == b"F"
    pos = 12 + fixed.size + path_len + 8
    pieces, done = [], 0
    while done < size:
        (stored,) = struct.unpack_from(">I", data, pos)
        flags, raw_len, _ = CHUNK_HEADER.unpack_from(data, pos + 4)
        pieces.append((pos + 4 + CHUNK_HEADER.size, flags, raw_len, stored))
        pos += 4 + CHUNK_HEADER.size + stored
        done += raw_len
    return pieces


def test_incompressible_pieces_are_stored_raw_and_still_checked(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    noise = os.urandom(9 * MiB)
    (src / "weights.bin").write_bytes(noise)
    data = pack_directory_to_bytes(src)  # write-chunk-bytes: 4 MiB
    assert len(noise) < len(data) < len(noise) + 200  # header, two records, three pieces
    pieces = _pieces(data)
    assert [(flags, raw, stored) for _, flags, raw, stored in pieces] == [
        (0, 4 * MiB, 4 * MiB), (0, 4 * MiB, 4 * MiB), (0, MiB, MiB)]
    assert data[pieces[1][0] : pieces[1][0] + 4 * MiB] == noise[4 * MiB : 8 * MiB]
    assert (unpack_fresh(data, tmp_path) / "weights.bin").read_bytes() == noise

    damaged = bytearray(data)
    damaged[pieces[1][0] + 12345] ^= 0x01  # one bit of the second piece's raw bytes
    with pytest.raises(CorruptChunkError, match="piece at offset 4194304 of 'weights.bin'.*"
                                                 "checksum") as info:
        unpack_fresh(bytes(damaged), tmp_path, "damaged")
    assert isinstance(info.value, CheckpointFormatError)


def test_compressible_pieces_are_compressed(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    noise = os.urandom(4 * MiB)
    text = b"".join(b"step %d loss 0.%04d\n" % (i, i % 9973) for i in range(400_000))[: 4 * MiB]
    mixed = bytes(4 * MiB) + noise + text  # zeros, noise and text: one piece each
    (src / "mixed.bin").write_bytes(mixed)
    for level in (None, 9):
        out = io.BytesIO()
        with ArchiveWriter(out, compression_level=level) as writer:
            writer.add_file("mixed.bin", src / "mixed.bin")
        data = out.getvalue()
        pieces = _pieces(data)
        assert [(f, raw) for _, f, raw, _ in pieces] == [(1, 4 * MiB), (0, 4 * MiB), (1, 4 * MiB)]
        zeros_stored, noise_stored, text_stored = (stored for *_, stored in pieces)
        assert zeros_stored < 64 * 1024 and noise_stored == 4 * MiB
        assert text_stored < 0.6 * 4 * MiB
        assert len(data) < noise_stored + zeros_stored + text_stored + 200
        out_dir = unpack_fresh(data, tmp_path, f"out-{level}")
        assert (out_dir / "mixed.bin").read_bytes() == mixed


def _mixed_file(path: Path, pieces: int) -> bytes:
    """``pieces`` MiB of noise, text and zeros in turn: raw and compressed pieces."""
    text = b"".join(b"step %d loss 0.%04d\n" % (i, i % 9973) for i in range(100_000))[:MiB]
    kinds = [lambda: os.urandom(MiB), lambda: text, lambda: bytes(MiB)]
    data = b"".join(kinds[i % 3]() for i in range(pieces))
    path.write_bytes(data)
    return data


def test_threads_encode_pieces_at_once_and_write_what_one_thread_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    src = tmp_path / "src"
    src.mkdir()
    mixed = _mixed_file(src / "mixed.bin", 10)
    (src / "small.bin").write_bytes(b"tiny")
    settings = {"dckpt.formats.write-chunk-bytes": "1MiB"}
    with dask.config.set({**settings, "dckpt.formats.pack-threads": 1}):
        one_thread = pack_directory_to_bytes(src)

    import dckpt._formats._archive_writer as archive_writer

    # Pieces 1 (noise) and 2 (text, the first to compress) are encoded in the packing
    # thread; each of the other 8 waits until another one is encoded beside it: with
    # pieces encoded one at a time, the barrier breaks (after 30 s) and packing raises.
    together = threading.Barrier(2, timeout=30)
    threads: set[str] = set()
    encode = archive_writer.encode_frame

    def encode_beside_another(raw: memoryview, **kwargs: Any) -> tuple[bytes, object]:
        name = threading.current_thread().name
        threads.add(name)
        if name.startswith("dckpt-pack"):
            together.wait()
        return encode(raw, **kwargs)

    monkeypatch.setattr(archive_writer, "encode_frame", encode_beside_another)
    with dask.config.set({**settings, "dckpt.formats.pack-threads": 2}):
        threaded = pack_directory_to_bytes(src)
    assert len(threads) == 3  # two pack threads, and the packing one
    assert threaded == one_thread
    out = unpack_fresh(threaded, tmp_path)
    assert (out / "mixed.bin").read_bytes() == mixed
    assert (out / "small.bin").read_bytes() == b"tiny"


def test_packing_leaves_the_transfers_lz4_speed_alone():
    # The transfer decides from compress_speed() whether lz4 pays on a link; what a
    # process packs (zeros compress at many GB/s) must not sway that.
    from dckpt._formats import compress_speed

    before = compress_speed()
    out = io.BytesIO()
    with ArchiveWriter(out) as writer:
        writer.add_bytes("zeros", bytes(8 * MiB))
    assert len(out.getvalue()) < MiB and compress_speed() == before


@pytest.mark.parametrize("what", ["path", "link target", "mode"])
def test_a_damaged_record_header_is_refused(tmp_path: Path, what: str):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("hello")
    (src / "link").symlink_to("notes.txt")
    data = pack_directory_to_bytes(src)
    # Sorted: the link's record (its target inside), then the file's.
    link_target = data.index(b"notes.txt")
    file_record = data.index(b"notes.txt", link_target + 1) - struct.calcsize(">cIQI")
    assert data[file_record : file_record + 1] == b"F"
    at = {"path": file_record + struct.calcsize(">cIQI"), "link target": link_target,
          "mode": file_record + 4}[what]  # mode: the low byte of the uint32
    damaged = bytearray(data)
    damaged[at] ^= 0x02
    with pytest.raises(CheckpointFormatError, match="record header fails its checksum"):
        unpack_fresh(bytes(damaged), tmp_path)


def test_pieces_moved_between_files_are_refused(tmp_path: Path):
    # Each piece passes its own checksum where it lands; the end record's digest of all
    # record and piece checksums catches that they are out of order.
    out = io.BytesIO()
    a, b = os.urandom(1000), os.urandom(1000)
    with ArchiveWriter(out) as writer:
        writer.add_bytes("a", a)
        writer.add_bytes("b", b)
    data = out.getvalue()
    piece = struct.calcsize(">I") + CHUNK_HEADER.size + 1000
    start_a, start_b = data.index(a) - piece + 1000, data.index(b) - piece + 1000
    swapped = bytearray(data)
    swapped[start_a : start_a + piece] = data[start_b : start_b + piece]
    swapped[start_b : start_b + piece] = data[start_a : start_a + piece]
    with pytest.raises(CheckpointFormatError, match="out of order"):
        unpack_fresh(bytes(swapped), tmp_path)


# --- progress --------------------------------------------------------------------------


def test_callbacks_count_files_and_bytes(tree: Path, tmp_path: Path):
    files = {rel: v[1] for rel, v in snapshot(tree).items() if v[0] == "file"}
    files["outside_file"] = b"outside file"
    files["outside_abs_dir/deeper/x.txt"] = b"outside dir"

    packing = RecordingCallback()
    buffer = io.BytesIO()
    pack_directory(tree, buffer, callback=packing)
    assert packing.sizes == [len(files)]
    assert packing.updates == [1] * len(files)
    assert sorted(dest for _, dest, _ in packing.children) == sorted(files)
    for src, dest, child in packing.children:
        assert child.sizes == [len(files[dest])]
        assert sum(child.updates) == len(files[dest])
        assert os.path.exists(src)
    by_dest = {dest: child for _, dest, child in packing.children}
    assert by_dest["big.bin"].updates == [4 * MiB, 1 * MiB]  # write-chunk-bytes: 4 MiB

    unpacking = RecordingCallback()
    (tmp_path / "out").mkdir()
    unpack_to_directory(buffer.getvalue(), tmp_path / "out", callback=unpacking)
    assert unpacking.updates == [1] * len(files)
    assert sorted(src for src, _, _ in unpacking.children) == sorted(files)
    for src, _, child in unpacking.children:
        assert child.sizes == [len(files[src])] and sum(child.updates) == len(files[src])


# --- what add_tree skips, and files that change under it -------------------------------


def test_dangling_outside_links_fifos_and_cycles_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "parent" / "src"
    root.mkdir(parents=True)
    (tmp_path / "parent" / "sibling.txt").write_text("beside src")
    (root / "kept.txt").write_text("kept")
    (root / "dangling").symlink_to("../nowhere")
    (root / "dangling_inside").symlink_to("nowhere")  # stays inside: kept as a link
    (root / "up").symlink_to("..")  # contains src itself: a cycle below it
    os.mkfifo(root / "fifo")
    with caplog.at_level(logging.WARNING, logger="dckpt._formats._packing"):
        out = unpack_fresh(pack_directory_to_bytes(root), tmp_path)
    assert snapshot(out) == {
        "dangling_inside": ("link", "nowhere"),
        "kept.txt": ("file", b"kept", _mode(root / "kept.txt")),
        "up": ("dir", _mode(tmp_path / "parent")),
        "up/sibling.txt": ("file", b"beside src", _mode(tmp_path / "parent" / "sibling.txt")),
    }
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "dangling symlink" in messages
    assert "not a regular file" in messages
    assert "back to a directory above it" in messages


def test_copy_tree_gives_what_packing_and_unpacking_give(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Checkpoint.to_directory copies with copy_tree, to_bytes packs: one symlink policy,
    # whatever the working directory (here not the source, where relative links resolve).
    (tree / "dangling_outside").symlink_to("../nowhere")
    (tree / "dangling_inside").symlink_to("nowhere")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    copied = tmp_path / "copied"
    copied.mkdir()
    copy_tree(str(tree), str(copied), exclude={"private.txt"}.__contains__)
    unpacked = unpack_fresh(pack_directory_to_bytes(tree, exclude={"private.txt"}.__contains__),
                            tmp_path, "unpacked")
    assert snapshot(copied) == snapshot(unpacked)
    assert snapshot(copied)["link_to_file"] == ("link", "notes.txt")
    assert snapshot(copied)["a/b/up_link"] == ("link", "../../notes.txt")
    assert snapshot(copied)["outside_file"][0] == "file"
    assert "dangling_outside" not in snapshot(copied)


class _ResizingCallback(Callback):
    """Changes the file being packed after the first chunk was read: a real race."""

    def __init__(self, path: Path, grow: bool) -> None:
        super().__init__()
        self.path, self.grow = path, grow

    def relative_update(self, inc: int = 1) -> None:
        if self.value == 0:
            if self.grow:
                with open(self.path, "ab") as f:
                    f.write(b"more")
            else:
                os.truncate(self.path, 10)
        super().relative_update(inc)


@pytest.mark.parametrize("piece, size", [("1kiB", 5000), ("1MiB", 5 * MiB)],
                         ids=["inline", "threaded"])
@pytest.mark.parametrize("grow", [True, False], ids=["grows", "shrinks"])
def test_a_file_changing_size_while_packed_raises_and_leaves_no_valid_archive(
    tmp_path: Path, grow: bool, piece: str, size: int
):
    path = tmp_path / "changing.bin"
    path.write_bytes(b"x" * size)
    out = io.BytesIO()
    with dask.config.set({"dckpt.formats.write-chunk-bytes": piece}):
        writer = ArchiveWriter(out)
        with pytest.raises(CheckpointError, match="grew" if grow else "shrank"):
            writer.add_file("f", path, callback=_ResizingCallback(path, grow))
    with pytest.raises(CheckpointError, match="unusable"):
        writer.add_bytes("g", b"")
    writer.close()
    with pytest.raises(CheckpointFormatError, match="truncated"):
        unpack_fresh(out.getvalue(), tmp_path)


def test_an_error_inside_the_with_block_leaves_a_truncated_archive(tmp_path: Path):
    out = io.BytesIO()
    with pytest.raises(KeyError), ArchiveWriter(out) as writer:
        writer.add_bytes("f", b"data")
        raise KeyError("boom")
    with pytest.raises(CheckpointFormatError, match="truncated"):
        unpack_fresh(out.getvalue(), tmp_path)


def test_writer_refuses_unsafe_entries_and_stays_usable(tmp_path: Path):
    out = io.BytesIO()
    with ArchiveWriter(out) as writer:
        for bad in ("../x", "/abs", "a\\b", ""):
            with pytest.raises(UnsafePathError):
                writer.add_bytes(bad, b"")
        with pytest.raises(UnsafePathError, match="leads outside"):
            writer.add_symlink("l", "../x")
        writer.add_symlink("l", "d")
        with pytest.raises(UnsafePathError, match="below the symlink"):
            writer.add_bytes("l/f", b"")
        writer.add_bytes("a", b"1")
        with pytest.raises(CheckpointFormatError, match="duplicate"):
            writer.add_bytes("./a", b"2")
        with pytest.raises(FileNotFoundError):
            writer.add_file("missing", tmp_path / "missing")
        writer.add_bytes("missing", b"added after all")
    with pytest.raises(ValueError, match="closed"):
        writer.add_bytes("late", b"")
    out_dir = unpack_fresh(out.getvalue(), tmp_path)
    assert snapshot(out_dir) == {
        "a": ("file", b"1", 0o644),
        "missing": ("file", b"added after all", 0o644),
        "l": ("link", "d"),
    }


# --- damaged data ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "is empty"),
        (b"not a checkpoint at all", r"no dckpt header \(starts with b'not a ch'\)"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", r"starts with b'PK\\x03\\x04"),
        (b"\x80\x04\x95\x10\x00", r"no dckpt header.*Checkpoint.to_bytes\(\)"),
        (MAGIC[:5], "truncated"),
        (MAGIC + b"\x00", "truncated"),
        (struct.pack(">8sHH", MAGIC, 3, 0), "version 3, but this dckpt reads versions 1 and 2"),
        (struct.pack(">8sHH", MAGIC, 0, 0), "version 0"),
        (struct.pack(">8sHH", MAGIC, 1, 0x0004), "unknown format flags 0x0004"),
        (struct.pack(">8sHH", MAGIC, 1, 0), "truncated"),
        (struct.pack(">8sHH", MAGIC, 2, 0), "truncated"),
    ],
    ids=["empty", "garbage", "zip", "pickle", "short-magic", "short-header", "future",
         "version-0", "flags", "no-body-v1", "no-body-v2"],
)
def test_header_checks(data: bytes, match: str, tmp_path: Path):
    with pytest.raises(CheckpointFormatError, match=match):
        unpack_fresh(data, tmp_path)


@pytest.mark.parametrize("version", [1, 2])
def test_unknown_flags_and_versions_are_refused_even_with_a_valid_body(tmp_path: Path,
                                                                       version: int):
    body = [record(b"F", "f", b"1")]
    with pytest.raises(CheckpointFormatError, match="flags"):
        ArchiveReader(io.BytesIO(craft(*body, flags=1, version=version)))
    with pytest.raises(CheckpointFormatError, match="version 7"):
        ArchiveReader(io.BytesIO(craft(*body, version=7, layout=version)))
    assert ArchiveReader(io.BytesIO(craft(*body, version=version))).version == version
    assert (unpack_fresh(craft(*body, version=version), tmp_path) / "f").read_bytes() == b"1"


def test_a_body_of_the_other_version_is_refused(tmp_path: Path):
    body = [record(b"F", "f", b"1")]
    for version, layout in [(1, 2), (2, 1)]:
        with pytest.raises(CheckpointFormatError):
            unpack_fresh(craft(*body, version=version, layout=layout), tmp_path, f"v{version}")


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict]:
    root = Path(make_tree(tmp_path_factory.mktemp("small") / "src"))
    (root / "link").symlink_to("notes.txt")
    return pack_directory_to_bytes(root), snapshot(root)


def test_truncation_anywhere_is_detected(small_archive: tuple[bytes, dict], tmp_path: Path):
    data, _ = small_archive
    offsets = sorted({len(data) * i // 20 for i in range(20)} | {len(data) - 1})
    for i, offset in enumerate(offsets):
        with pytest.raises(CheckpointFormatError, match="truncated|empty"):
            unpack_fresh(data[:offset], tmp_path, f"cut{i}")


def test_bit_flips_are_detected(small_archive: tuple[bytes, dict], tmp_path: Path):
    data, original = small_archive
    header = struct.calcsize(">8sHH")
    offsets = range(header, len(data), max(1, (len(data) - header) // 60))
    detected = 0
    for i, offset in enumerate([*offsets, len(data) - 1]):
        damaged = bytearray(data)
        damaged[offset] ^= 1 << (i % 8)
        try:
            out = unpack_fresh(bytes(damaged), tmp_path, f"flip{i}")
        except CheckpointFormatError:
            detected += 1
        else:  # lz4 missed it: then the data must at least be exactly the original
            assert snapshot(out) == original, f"flip at {offset} unpacked different data"
    assert detected == len(offsets) + 1


def test_bit_flip_error_says_corrupted(small_archive: tuple[bytes, dict], tmp_path: Path):
    data, _ = small_archive
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x10  # inside model/weights.bin, 300 kB of noise
    with pytest.raises(CorruptChunkError, match="corrupted.*'model/weights.bin'.*checksum"):
        unpack_fresh(bytes(damaged), tmp_path)
    # Version 1: lz4's checksums find it.
    v1 = bytearray(V1_FIXTURE.read_bytes())
    v1[len(v1) // 2] ^= 0x10
    with pytest.raises(CheckpointFormatError, match="corrupted") as info:
        unpack_fresh(bytes(v1), tmp_path, "v1")
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("extra", [b"x", b"\x00" * 100, "another archive"])
def test_trailing_bytes_are_refused(small_archive: tuple[bytes, dict], tmp_path: Path,
                                    extra: bytes | str):
    data, _ = small_archive
    tail = data if extra == "another archive" else extra
    assert isinstance(tail, bytes)
    with pytest.raises(CheckpointFormatError, match="trailing bytes"):
        unpack_fresh(data + tail, tmp_path)


# --- hostile archives ------------------------------------------------------------------

HOSTILE = {
    "dotdot": ([record(b"F", "../evil", b"pwned")], UnsafePathError, "'..'"),
    "dotdot-nested": ([record(b"F", "a/../../evil", b"pwned")], UnsafePathError, "'..'"),
    "absolute": ([record(b"F", "/tmp/evil", b"pwned")], UnsafePathError, "absolute"),
    "backslash": ([record(b"F", "..\\evil", b"pwned")], UnsafePathError, "plain relative"),
    "empty-name": ([record(b"F", "", b"pwned")], UnsafePathError, "plain relative"),
    "dot-only": ([record(b"D", "./.")], UnsafePathError, "names no file"),
    "nul": ([record(b"F", "a\x00b", b"x")], UnsafePathError, "plain relative"),
    "link-out": ([record(b"L", "l", b"../../evil")], UnsafePathError, "leads outside"),
    "link-nested-out": ([record(b"D", "d"), record(b"L", "d/l", b"../..")],
                        UnsafePathError, "leads outside"),
    "link-absolute": ([record(b"L", "l", b"/etc/passwd")], UnsafePathError, "leads outside"),
    "link-empty": ([record(b"L", "l", b"")], UnsafePathError, "leads outside"),
    "link-dot-then-dotdot-below": (
        [record(b"L", "p", b"."), record(b"L", "p/q", b"..")],
        UnsafePathError, "below the symlink 'p'"),
    "link-dot-then-climb-through-it": (
        [record(b"L", "b", b"."), record(b"L", "a", b"b/../evil")],
        UnsafePathError, "leads outside"),
    "file-through-link": (
        [record(b"D", "sub"), record(b"L", "l", b"sub"), record(b"F", "l/f", b"x")],
        UnsafePathError, "below the symlink 'l'"),
    "link-after-file-below-it": (
        [record(b"F", "l/f", b"x"), record(b"L", "l", b"sub")],
        UnsafePathError, "other entries lie below it"),
    "duplicate-file": ([record(b"F", "f", b"1"), record(b"F", "f", b"2")],
                       CheckpointFormatError, "duplicate entry 'f'"),
    "duplicate-normalized": ([record(b"F", "a/f", b"1"), record(b"F", "a//./f", b"2")],
                             CheckpointFormatError, "duplicate entry 'a/f'"),
    "duplicate-dir": ([record(b"D", "d"), record(b"D", "d")],
                      CheckpointFormatError, "duplicate"),
    "file-and-link": ([record(b"F", "x", b"1"), record(b"L", "x", b"y")],
                      CheckpointFormatError, "duplicate"),
    "below-a-file": ([record(b"F", "f", b"1"), record(b"F", "f/g", b"2")],
                     CheckpointFormatError, "below the file 'f'"),
    "unknown-kind": ([record(b"X", "f", b"1")], CheckpointFormatError, "unknown kind b'X'"),
    "non-utf8": ([record(b"F", b"\xff\xfe", b"1")], CheckpointFormatError, "not UTF-8"),
    "dir-payload": ([record(b"D", "d", b"xx")], CheckpointFormatError, "directory with a payload"),
    "overlong-name": ([record(b"F", "f", path_len=1 << 30)], CheckpointFormatError, "overlong"),
    # Version 2 reads the end record as the next piece of the file, and refuses it.
    "huge-size": ([record(b"F", "f", b"1", size=1 << 62)], CheckpointFormatError,
                  "truncated|holds a piece of"),
}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_archives_are_refused_and_nothing_lands_outside(tmp_path: Path, case: str,
                                                                version: int):
    records, error, match = HOSTILE[case]
    work = tmp_path / "work" / "deeper"
    target = work / "target"
    target.mkdir(parents=True)
    with pytest.raises(error, match=match):
        unpack_to_directory(craft(*records, version=version), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["deeper"]
    assert sorted(p.name for p in work.iterdir()) == ["target"]
    # Links are made only once the whole archive checked out, so none exist here.
    assert not [v for v in snapshot(target).values() if v[0] == "link"]


@pytest.mark.parametrize(
    ("records", "kwargs", "match"),
    [
        ([record(b"F", "f", b"1")], {"count": 2}, "counting 2 entries, but 1 were read"),
        ([record(b"F", "f", b"1")], {"count": 0}, "counting 0 entries"),
        ([record(b"F", "f", b"1")], {"end": False}, "truncated"),
        ([record(b"F", "f", b"1")], {"after_end": b"junk"},
         "data after its end record|trailing bytes"),
        ([record(b"F", "f", b"123", size=10)], {"end": False}, "truncated"),
    ],
    ids=["count-high", "count-low", "no-end", "after-end", "short-payload"],
)
@pytest.mark.parametrize("version", [1, 2])
def test_damaged_record_streams(tmp_path: Path, records: list[Record], kwargs: dict, match: str,
                                version: int):
    with pytest.raises(CheckpointFormatError, match=match):
        unpack_fresh(craft(*records, **kwargs, version=version), tmp_path)


def test_a_nested_inside_link_and_a_climbing_inside_link_are_accepted(tmp_path: Path):
    data = craft(record(b"D", "a"), record(b"D", "a/b"), record(b"F", "a/b/f", b"x"),
                 record(b"L", "a/b/up", b"../../a/b/f"), record(b"L", "self", b"."))
    out = unpack_fresh(data, tmp_path)
    assert (out / "a" / "b" / "up").read_bytes() == b"x"
    assert os.readlink(out / "self") == "."


# --- memory ----------------------------------------------------------------------------


def test_bounded_memory_for_a_64_mib_file(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    digest = hashlib.sha256()
    with open(src / "big.bin", "wb") as f:
        for _ in range(16):  # random data: lz4 cannot shrink it, the worst case
            block = os.urandom(4 * MiB)
            digest.update(block)
            f.write(block)
    del block
    archive, out = tmp_path / "archive.dckpt", tmp_path / "out"
    out.mkdir()
    tracemalloc.start()
    try:
        with open(archive, "wb") as f:
            pack_directory(src, f)
        with open(archive, "rb") as f:
            unpack_to_directory(f, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.path.getsize(archive) > 64 * MiB
    assert peak < 16 * MiB, f"peak traced memory {peak / MiB:.1f} MiB"
    check = hashlib.sha256()
    with open(out / "big.bin", "rb") as f:
        while chunk := f.read(4 * MiB):
            check.update(chunk)
    assert check.digest() == digest.digest()


def test_reading_from_a_named_file_names_it_in_errors(tmp_path: Path):
    path = tmp_path / "thing.zip"
    path.write_bytes(b"PK\x03\x04rest")
    with open(path, "rb") as f, pytest.raises(CheckpointFormatError, match="thing.zip"):
        ArchiveReader(f)
