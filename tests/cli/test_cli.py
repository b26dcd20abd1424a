"""The ``dckpt`` command line, run as a subprocess (``python -m dckpt``) on real data.

Usage errors and ``--help`` run in-process (:func:`dckpt.cli.main`): argparse exits the
same way there, in a fraction of the time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from dckpt import Checkpoint
from dckpt.cli import main
from dckpt.cli._main import SUBCOMMANDS
from tests._nodes import child_pids, lines_until_ready
from tests._trees import make_tree, read_tree

ROOT = Path(__file__).resolve().parents[2]
METADATA = {"epoch": 3, "loss": 0.42}
KINDS = ("directory", "file_uri", "bytes")


def dckpt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dckpt ARGS`` from the repository root; stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, "-m", "dckpt", *args], capture_output=True, text=True,
        cwd=ROOT, env={**os.environ, **(env or {})}, timeout=60, check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], command: str) -> str:
    """The one-line message of a failure, checked: exit 1, no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dckpt {command}: error: "), lines
    return lines[0]


@pytest.fixture
def directory(tmp_path: Path) -> str:
    """A directory checkpoint with a dict, a preprocessor, metadata and files."""
    checkpoint = Checkpoint.from_dict({"step": 1200, "weights": [0.5, 1.5]})
    checkpoint.set_preprocessor({"mean": 0.25})
    checkpoint.set_metadata(METADATA)
    path = checkpoint.to_directory(str(tmp_path / "ckpt"))
    return make_tree(path)


def place(kind: str, directory: str, tmp_path: Path) -> str:
    """``directory``'s checkpoint as ``kind``, written under ``tmp_path``."""
    if kind == "directory":
        return directory
    if kind == "file_uri":
        return Checkpoint.from_directory(directory).to_uri(f"file://{tmp_path}/as-uri")
    path = tmp_path / "as-bytes.dckpt"
    path.write_bytes(Checkpoint.from_directory(directory).to_bytes())
    return str(path)


def contents(checkpoint: Checkpoint, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every file of the checkpoint written as a directory, and its metadata."""
    out = tmp_path / f"compare-{uuid.uuid4().hex[:8]}"
    return read_tree(checkpoint.to_directory(str(out))), checkpoint.get_metadata()


def s3_options(storage_options: dict[str, Any]) -> list[str]:
    """``--storage-option`` arguments for the moto server's options."""
    args = [f"key={storage_options['key']}", f"secret={storage_options['secret']}"]
    args += [f"client_kwargs.{k}={v}" for k, v in storage_options["client_kwargs"].items()]
    return [word for arg in args for word in ("-o", arg)]


# ---------------------------------------------------------------------------- inspect


def check_report(report: dict[str, Any], kind: str) -> None:
    assert report["kind"] == kind
    assert report["layout"] == "dckpt" and report["format_version"] == 1
    assert report["class"] == "dckpt:Checkpoint"
    assert report["metadata"] == METADATA
    assert report["dict_data"] and report["preprocessor"]
    assert report["files"]["model/weights.bin"] == 300_000
    assert {".dckpt.json", "dict_checkpoint.pkl", "_preprocessor", "run.sh",
            "model/layers/config.json"} <= report["files"].keys()
    assert report["size"] == sum(report["files"].values())
    assert "dict_keys" not in report  # nothing was unpickled


def test_inspect_names_the_packed_version_the_file_holds():
    # Written by packed format version 1, which this dckpt still reads.
    report = json.loads(ok(dckpt("inspect", "tests/data/packed-v1.bin", "--json")))
    assert report["kind"] == "bytes" and report["packed_format_version"] == 1
    assert report["files"]["model/weights.bin"] == 3000
    assert report["links"] == {"link_to_config": "model/layers/config.json"}


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_each_kind(kind, directory, tmp_path):
    src = place(kind, directory, tmp_path)
    report = json.loads(ok(dckpt("inspect", src, "--json")))
    check_report(report, "directory" if kind == "file_uri" else kind)
    if kind == "bytes":
        assert report["packed_format_version"] == 2
        assert report["stored_size"] == os.path.getsize(src)
    text = ok(dckpt("inspect", src))
    assert '"epoch": 3' in text and "dict_checkpoint.pkl; pass --unpickle" in text
    assert "model/\n" in text and "weights.bin" in text and "292.97 kiB" in text


@pytest.mark.s3
def test_inspect_s3(directory, s3_bucket, s3_storage_options):
    uri = Checkpoint.from_directory(directory).to_uri(
        f"{s3_bucket}/ckpt", storage_options=s3_storage_options)
    report = json.loads(ok(dckpt("inspect", uri, "--json", *s3_options(s3_storage_options))))
    check_report(report, "uri")
    assert report["uri_status"] == "committed"


class _Evil:
    """Unpickling this creates a file: proof that nothing was unpickled if absent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_inspect_unpickles_nothing_unless_asked(tmp_path):
    marker = tmp_path / "unpickled"
    checkpoint = Checkpoint.from_dict({"model": _Evil(str(marker))})
    checkpoint.set_preprocessor(_Evil(str(marker)))
    directory = checkpoint.to_directory(str(tmp_path / "ckpt"))
    packed = tmp_path / "ckpt.dckpt"
    packed.write_bytes(Checkpoint.from_directory(directory).to_bytes())
    assert not marker.exists()
    for src in (directory, str(packed)):
        report = json.loads(ok(dckpt("inspect", src, "--json")))
        assert report["dict_data"] and report["preprocessor"]
        assert not marker.exists()

    report = json.loads(ok(dckpt("inspect", str(packed), "--json", "--unpickle")))
    assert marker.exists()  # the test above could have seen it
    assert report["dict_keys"] == ["model"]
    assert report["preprocessor_type"] == "_io.TextIOWrapper"


def test_inspect_of_damaged_or_foreign_files_fails_in_one_line(directory, tmp_path):
    packed = Checkpoint.from_directory(directory).to_bytes()
    flipped = bytearray(packed)
    flipped[len(packed) // 2] ^= 0xFF
    cases = {
        "foreign": (b"PK\x03\x04 not ours", "has no dckpt header"),
        "truncated": (packed[: len(packed) // 2], "is truncated"),
        "flipped": (bytes(flipped), "corrupted"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.dckpt"
        path.write_bytes(data)
        assert message in failed(dckpt("inspect", str(path)), "inspect")
    assert "no such file" in failed(dckpt("inspect", str(tmp_path / "missing")), "inspect")


# --------------------------------------------------------------------------------- cp


@pytest.mark.parametrize("src_kind", KINDS)
def test_cp_between_every_pair_of_kinds(src_kind, directory, tmp_path):
    src = place(src_kind, directory, tmp_path)
    expected = contents(Checkpoint.from_directory(directory), tmp_path)
    destinations = {
        "directory": str(tmp_path / "to-dir"),
        "file_uri": f"file://{tmp_path}/to-uri",
        "bytes": str(tmp_path / "to-bytes.dckpt"),
    }
    for dst_kind, dst in destinations.items():
        out = ok(dckpt("cp", src, dst))
        assert out.startswith("copied ") and "B" in out
        copy = (Checkpoint.from_bytes(Path(dst).read_bytes()) if dst_kind == "bytes"
                else Checkpoint.from_uri(dst))
        assert contents(copy, tmp_path) == expected, (src_kind, dst_kind)
    # Nothing half-written or staged beside the destinations.
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


@pytest.mark.s3
def test_cp_to_and_from_s3(directory, tmp_path, s3_bucket, s3_storage_options):
    expected = contents(Checkpoint.from_directory(directory), tmp_path)
    uri = f"{s3_bucket}/ckpt"
    options = s3_options(s3_storage_options)
    ok(dckpt("cp", directory, uri, *options))
    assert contents(Checkpoint.from_uri(uri, storage_options=s3_storage_options),
                    tmp_path) == expected
    packed = tmp_path / "from-s3.dckpt"
    ok(dckpt("cp", uri, str(packed), *options))
    assert contents(Checkpoint.from_bytes(packed.read_bytes()), tmp_path) == expected


@pytest.mark.s3
def test_inspect_and_cp_read_the_old_checkpoint_after_an_interrupted_overwrite(
    directory, tmp_path, s3_bucket, s3_storage_options
):
    import dask.config
    from fsspec.callbacks import Callback

    class DropAfterTwoFiles(Callback):
        def branched(self, path_1: str, path_2: str, **kwargs: Any) -> Callback:
            if self.value >= 2:
                raise ConnectionError("connection dropped mid-upload")
            return Callback()

    uri = Checkpoint.from_directory(directory).to_uri(
        f"{s3_bucket}/ckpt", storage_options=s3_storage_options)
    expected = contents(Checkpoint.from_directory(directory), tmp_path)
    other = tmp_path / "other"
    make_tree(other, seed=1)
    (other / "only_in_the_new_one.txt").write_text("new")
    with (dask.config.set({"dckpt.storage.max-concurrency": 1}),
          pytest.raises(OSError, match="connection dropped")):
        Checkpoint.from_directory(other).to_uri(uri, storage_options=s3_storage_options,
                                                callback=DropAfterTwoFiles())
    options = s3_options(s3_storage_options)
    report = json.loads(ok(dckpt("inspect", uri, "--json", *options)))
    check_report(report, "uri")
    assert "only_in_the_new_one.txt" not in report["files"]
    ok(dckpt("cp", uri, str(tmp_path / "copied"), *options))
    assert contents(Checkpoint.from_directory(tmp_path / "copied"), tmp_path) == expected


@pytest.mark.s3
def test_storage_failure_is_one_line_naming_the_uri(s3_storage_options):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # closed again: nobody listens there
        port = sock.getsockname()[1]
    options = {**s3_storage_options, "client_kwargs": {
        "endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    line = failed(dckpt("inspect", "s3://bucket/ckpt", *s3_options(options),
                        "-o", "config_kwargs.retries.max_attempts=1"), "inspect")
    assert "cannot read the checkpoint at s3://bucket/ckpt: EndpointConnectionError" in line


def test_cp_refuses_an_existing_destination_without_force(directory, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir()
    (dst / "keep").write_text("mine")
    assert "--force" in failed(dckpt("cp", directory, str(dst)), "cp")
    assert (dst / "keep").read_text() == "mine"
    ok(dckpt("cp", directory, str(dst), "--force", "--quiet"))
    assert not (dst / "keep").exists()


def test_cp_progress_bar_only_when_asked_off_a_terminal(directory, tmp_path):
    always = {"DASK_DCKPT__CLI__PROGRESS_MIN_BYTES": "0"}
    shown = dckpt("cp", directory, str(tmp_path / "a.dckpt"), "--progress", env=always)
    assert "pack: 100%" in ok(shown) + shown.stderr
    silent = dckpt("cp", directory, str(tmp_path / "b.dckpt"), env=always)
    assert ok(silent).startswith("copied ") and silent.stderr == ""
    quiet = dckpt("cp", directory, str(tmp_path / "c.dckpt"), "--quiet", env=always)
    assert ok(quiet) == "" and quiet.stderr == ""


def _entries(packed: bytes) -> dict[str, tuple[str, int, bytes | str | None]]:
    """Every entry of a packed checkpoint: path -> (kind, mode, payload or target)."""
    import io

    from dckpt._formats import ArchiveReader

    reader = ArchiveReader(io.BytesIO(packed))
    out: dict[str, tuple[str, int, bytes | str | None]] = {}
    for entry in reader:
        payload = reader.read_payload() if entry.kind == "file" else entry.target
        out[entry.path] = (entry.kind, entry.mode, payload)
    return out


def test_cp_bytes_files_hold_what_to_bytes_and_from_bytes_do(directory, tmp_path):
    packed = tmp_path / "copy.dckpt"
    ok(dckpt("cp", directory, str(packed), "--quiet"))
    blob = Checkpoint.from_directory(directory).to_bytes()
    assert _entries(packed.read_bytes()) == _entries(blob)
    restored = Checkpoint.from_bytes(packed.read_bytes())
    assert contents(restored, tmp_path) == contents(Checkpoint.from_directory(directory), tmp_path)

    # And the other way: a file to_bytes() wrote unpacks to what from_bytes() gives.
    written = tmp_path / "written.dckpt"
    written.write_bytes(blob)
    ok(dckpt("cp", str(written), str(tmp_path / "unpacked"), "--quiet"))
    expected = Checkpoint.from_bytes(blob).to_directory(str(tmp_path / "expected"))
    assert read_tree(tmp_path / "unpacked") == read_tree(expected)
    assert Checkpoint.from_directory(str(tmp_path / "unpacked")).get_metadata() == METADATA


def _peak_rss_bytes(*args: str) -> int:
    """Run ``python -m dckpt ARGS``; the peak RSS of that process alone, in bytes.

    ``os.wait4`` gives the child's own rusage (``RUSAGE_CHILDREN`` would be the
    largest of every child this test process ever waited for).
    """
    process = subprocess.Popen([sys.executable, "-m", "dckpt", *args], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    process.stderr.close()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.returncode == 0, stderr
    return usage.ru_maxrss * 1024  # KiB on Linux


@pytest.mark.slow
def test_cp_to_and_from_a_bytes_file_streams_in_bounded_memory(tmp_path):
    size = 256 << 20
    big = tmp_path / "big"
    (big / "model").mkdir(parents=True)
    with open(big / "model" / "weights.bin", "wb") as f:
        for _ in range(size >> 22):
            f.write(os.urandom(4 << 20))  # random: lz4 cannot shrink it in memory
    small = Checkpoint.from_dict({"step": 1}).to_directory(str(tmp_path / "small"))

    base = max(_peak_rss_bytes("cp", small, str(tmp_path / "small.dckpt"), "-q"),
               _peak_rss_bytes("cp", str(tmp_path / "small.dckpt"), str(tmp_path / "s"), "-q"))
    packing = _peak_rss_bytes("cp", str(big), str(tmp_path / "big.dckpt"), "-q")
    unpacking = _peak_rss_bytes("cp", str(tmp_path / "big.dckpt"), str(tmp_path / "out"), "-q")
    assert packing < base + size / 4, (packing, base)
    assert unpacking < base + size / 4, (unpacking, base)
    assert os.path.getsize(tmp_path / "out" / "model" / "weights.bin") == size


def test_cp_to_uri_writes_the_uri_layout_into_a_local_folder(directory, tmp_path):
    from dckpt import _storage

    expected = read_tree(directory)
    for dst in (f"file://{tmp_path}/as-uri", str(tmp_path / "as-uri-path")):
        ok(dckpt("cp", directory, dst, "--to", "uri", "--quiet"))
        uri = dst if dst.startswith("file://") else f"file://{dst}"
        folder = _storage.local_path_of(uri)
        assert os.path.isfile(os.path.join(folder, _storage.COMMIT_MARKER))
        assert _storage.uri_status(uri) == "committed"
        assert set(_storage.list_files(uri)) == {k for k, v in expected.items() if v is not None}
        report = json.loads(ok(dckpt("inspect", uri, "--json")))
        assert report["kind"] == "uri" and report["uri_status"] == "committed"
        assert _storage.COMMIT_MARKER not in report["files"]
        # Read back as the URI it is: the markers are no files of the checkpoint.
        back = tmp_path / f"back-{uuid.uuid4().hex[:8]}"
        ok(dckpt("cp", uri, str(back), "--quiet"))
        assert read_tree(back) == expected


# ---------------------------------------------------------------- usage and --help


@pytest.mark.parametrize("argv", [
    [], ["nope"], ["inspect"], ["cp", "a"], ["cp", "a", "b", "--to", "zip"],
    ["cp", "a", "b", "-o", "no-equals-sign"], ["ls"], ["cluster", "--nodes", "two"],
    ["demo", "--batches", "many"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: dckpt" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    names = [module.NAME for module in SUBCOMMANDS]
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: dckpt {name}" in capsys.readouterr().out
    assert names == ["inspect", "cp", "ls", "cluster", "demo"]


def test_the_help_promises_only_what_the_subcommands_do(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    names = {module.NAME for module in SUBCOMMANDS}
    # The summary once said "serve", and no subcommand serves anything.
    for verb in ("serve", "deploy", "predict", "train"):
        assert verb not in text.split("positional arguments")[0] or verb in names, verb


def test_usage_error_exits_2_from_the_console_entry_point():
    result = dckpt("cp", "only-one-argument")
    assert result.returncode == 2 and "usage: dckpt cp" in result.stderr


# ------------------------------------------------------------------------- clusters


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ls_of_a_wrong_address_fails_in_one_line():
    # A timeout longer than dckpt()'s own 60 s: a refused connection must not wait it out.
    result = dckpt("ls", "--scheduler", f"tcp://127.0.0.1:{_free_port()}", "--timeout", "600")
    assert "connection refused" in failed(result, "ls")


@pytest.mark.parametrize("address", ["nonsense", "tcp://127.0.0.1:notaport",
                                     "tcp://127.0.0.1:0", "nope://127.0.0.1:8786"])
def test_ls_of_a_malformed_address_is_a_usage_error_at_once(address):
    result = dckpt("ls", "--scheduler", address, "--timeout", "600")
    assert result.returncode == 2, result.stderr
    assert "usage: dckpt ls" in result.stderr and "Traceback" not in result.stderr
    assert "argument --scheduler" in result.stderr and "tcp://127.0.0.1:8786" in result.stderr


def test_ls_of_something_that_is_no_scheduler_fails_in_one_line():
    """A port that accepts connections but never answers (nobody calls accept())."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = "tcp://127.0.0.1:%d" % listener.getsockname()[1]
        result = dckpt("ls", "--scheduler", address, "--timeout", "1")
    message = failed(result, "ls")  # one line: no "Exception ignored in Client.__del__"
    assert "does not answer as one (no answer within 1 s (--timeout))" in message


def test_a_reader_that_stops_early_ends_dckpt_quietly(tmp_path):
    """``dckpt inspect --json | head -1``: exit 141 (128 + SIGPIPE, as a shell
    reports for cat), nothing on stderr."""
    for i in range(3000):  # more JSON than a pipe buffers: dckpt is still writing
        (tmp_path / f"file-{i:05d}.txt").write_bytes(b"x")
    process = subprocess.Popen([sys.executable, "-m", "dckpt", "inspect", str(tmp_path), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert process.stdout.readline() == b"{\n"
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=60) == 141, stderr
        assert stderr == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def _write_checkpoint() -> Checkpoint:
    """On a worker: a directory checkpoint under the node root; returning it
    registers it with the node's store."""
    from dckpt import _node

    path = os.path.join(_node.node_root(), f"ckpt-{uuid.uuid4().hex[:8]}")
    return Checkpoint.from_directory(Checkpoint.from_dict({"step": 1}).to_directory(path))


@pytest.mark.slow
def test_cluster_runs_until_ctrl_c_and_ls_lists_its_checkpoints(tmp_path):
    from distributed import Client

    from dckpt.cluster import who_has
    from tests.cluster.test_registry import eventually

    before = child_pids()
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "dckpt", "cluster", "--nodes", "2"],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
        )
    try:
        lines = lines_until_ready(process)
        output = "".join(lines)
        assert output.startswith("scheduler: tcp://127.0.0.1:"), output + stderr.read_text()
        address = lines[0].split()[1]
        workers = dict(line.split()[:2] for line in lines if line.startswith("  node-"))
        owner = workers["node-1:"]

        with Client(address, set_as_default=False) as client:
            checkpoint = client.submit(_write_checkpoint, workers=[owner], pure=False).result()
            kind, ref = checkpoint.get_internal_representation()
            assert kind == "node_ref"
            eventually(lambda: who_has(client, [ref.checkpoint_id])[ref.checkpoint_id],
                       lambda places: places["origin"] == [owner], "registration")

        report = json.loads(ok(dckpt("ls", "--scheduler", address, "--json")))
        listed = report["workers"]
        assert listed[owner]["node_id"] == "node-1"
        assert listed[owner]["origin"] == {ref.checkpoint_id: ref.size}
        assert listed[owner]["stats"]["registered"] == 1
        assert all(not w["origin"] for a, w in listed.items() if a != owner)
        assert report["checkpoints"] == {ref.checkpoint_id: {
            "size": ref.size, "uris": [],
            "holders": [{"node_id": "node-1", "address": owner, "kind": "origin"}]}}
        table = ok(dckpt("ls", "--scheduler", address))
        assert re.search(rf"(?m)^{ref.checkpoint_id}\s+\d+ B\s+node-1 \(origin\)\s+-$", table), table

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, stderr.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
    assert child_pids() == before


# ---------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_tells_the_whole_story_in_one_command():
    from dckpt.cluster import isolation_available

    if not isolation_available():
        pytest.skip("the demo's figures are those of isolated nodes")
    out = ok(dckpt("demo", "--batches", "40"))
    assert "killing node-1, which runs rank 1, after epoch 8" in out
    assert "1 failure(s) survived; resumed at epoch 9" in out
    assert "best checkpoints kept, best first: epoch" in out and "accuracy 0.9" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("node-")]
    assert [row[0] for row in rows] == ["node-0", "node-1", "node-2"]
    assert all(int(row[4]) <= 1 for row in rows)  # prediction: once per node at most


@pytest.mark.parametrize("argv", [["demo", "--nodes", "2"], ["demo", "--batches", "0"],
                                  ["cluster", "--nodes", "0"]])
def test_too_few_nodes_or_batches_are_usage_errors(argv):
    result = dckpt(*argv)
    assert result.returncode == 2, result.stderr
    assert f"usage: dckpt {argv[0]}" in result.stderr and "at least" in result.stderr
    assert "Traceback" not in result.stderr
