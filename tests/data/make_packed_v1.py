"""Build the tree of ``packed-v1.bin`` and, run as a script, pack it.

``packed-v1.bin`` was written by this script with dckpt at commit 83ba9a0 (packed
format version 1: one lz4 frame over the records) and is kept as it is, so that the
tests check that data users already have still loads. Do not regenerate it with a
newer dckpt: that would test nothing.

    PYTHONPATH=$PWD python tests/data/make_packed_v1.py tests/data/packed-v1.bin
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path


def build_v1_tree(root: str | os.PathLike[str]) -> Path:
    """A small tree with every record kind, explicit modes and both kinds of data."""
    root = Path(root)
    rng = random.Random(11)
    (root / "model" / "layers").mkdir(parents=True)
    (root / "empty_dir").mkdir()
    (root / "empty_file").write_bytes(b"")
    (root / "model" / "weights.bin").write_bytes(rng.randbytes(3000))  # incompressible
    (root / "model" / "layers" / "config.json").write_text('{"units": [4, 4]}' * 100)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "link_to_config").symlink_to("model/layers/config.json")
    for path, mode in [("run.sh", 0o755), ("empty_file", 0o600),
                       ("model/weights.bin", 0o644), ("model/layers/config.json", 0o640),
                       ("empty_dir", 0o750), ("model/layers", 0o755), ("model", 0o755)]:
        (root / path).chmod(mode)
    return root


if __name__ == "__main__":
    from dckpt._formats import pack_directory_to_bytes

    with tempfile.TemporaryDirectory() as tmp:
        data = pack_directory_to_bytes(build_v1_tree(Path(tmp) / "tree"))
    Path(sys.argv[1]).write_bytes(data)
    print(f"wrote {len(data)} bytes to {sys.argv[1]}")
