"""dckpt in one minute: the Ray AIR Checkpoint API, on one machine, no network.

Run it with ``python examples/quickstart.py``. It creates a checkpoint from a dict,
turns it into a directory, bytes and a URI (fsspec's in-memory filesystem stands in
for S3 here), and shows that every round trip gives back what went in.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile

from dckpt import Checkpoint


class Scaler:
    """A stand-in for a fitted preprocessor: any picklable object will do."""

    def __init__(self, mean: float) -> None:
        self.mean = mean

    def transform_batch(self, batch: list[float]) -> list[float]:
        return [x - self.mean for x in batch]


def main() -> None:
    workdir = tempfile.mkdtemp(prefix="dckpt-quickstart-")
    try:
        # 1. From a dict, as a training loop would report it.
        checkpoint = Checkpoint.from_dict({"weights": [0.5, -1.25, 2.0], "epoch": 3})
        checkpoint.set_preprocessor(Scaler(mean=1.0))
        checkpoint.set_metadata({"epoch": 3, "val_loss": 0.42})

        # 2. To a directory and back: the dict comes back exactly.
        path = checkpoint.to_directory(f"{workdir}/ckpt")
        restored = Checkpoint.from_directory(path)
        data = restored.to_dict()
        assert data["weights"] == [0.5, -1.25, 2.0] and data["epoch"] == 3
        print(f"directory  {path}: {sorted(os.listdir(path))}")

        # 3. Through bytes (a header, then an lz4 frame with checksums).
        blob = restored.to_bytes()
        from_bytes = Checkpoint.from_bytes(blob)
        assert from_bytes.to_dict()["weights"] == data["weights"]
        assert from_bytes.get_metadata() == {"epoch": 3, "val_loss": 0.42}
        print(f"bytes      {len(blob)} bytes, starts with {blob[:6]!r}")

        # 4. Through a URI: any fsspec URI works (s3://... with `pip install dckpt[s3]`).
        uri = restored.to_uri("memory://quickstart/ckpt")
        from_uri = Checkpoint.from_uri(uri)
        print(f"uri        {uri}: metadata {from_uri.get_metadata()}")
        with from_uri.as_directory() as local:
            print(f"as_directory -> {local}")

        # 5. Checkpoints pickle, so Dask can ship them to workers.
        shipped = pickle.loads(pickle.dumps(from_uri))
        scaler = shipped.get_preprocessor()
        print(f"preprocessor {type(scaler).__name__}: {scaler.transform_batch([1.0, 2.0])}")
        assert shipped.to_dict()["weights"] == [0.5, -1.25, 2.0]
        print("all round trips recovered the original data")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
