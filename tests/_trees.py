"""Build directory trees for tests and read them back for exact comparison."""

from __future__ import annotations

import os
import random
from pathlib import Path


def make_tree(root: str | os.PathLike[str], seed: int = 0) -> str:
    """A small tree with the shapes that break naive copies.

    Nested folders, an empty folder, an empty file, binary data that does not
    compress, text that does, and an executable file.
    """
    rng = random.Random(seed)
    root = Path(root)
    (root / "model" / "layers").mkdir(parents=True)
    (root / "empty_dir").mkdir()
    (root / "empty_file").write_bytes(b"")
    (root / "model" / "weights.bin").write_bytes(rng.randbytes(300_000))
    (root / "model" / "layers" / "config.json").write_text('{"units": [4, 4]}' * 100)
    (root / "notes.txt").write_text("trained for 3 epochs\n")
    script = root / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    return str(root)


def read_tree(
    root: str | os.PathLike[str], *, follow_links: bool = False
) -> dict[str, bytes | None]:
    """``relpath -> contents`` for files and ``relpath/ -> None`` for folders.

    ``follow_links``: descend into links to folders too (what a reader of the tree
    sees); links to files are read through either way.
    """
    tree: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames:
            tree[os.path.normpath(os.path.join(rel, name)) + "/"] = None
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                tree[os.path.normpath(os.path.join(rel, name))] = f.read()
    return tree
