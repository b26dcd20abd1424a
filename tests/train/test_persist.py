"""Who writes a node reference's persisted copy: its node, or the driver (pure units).

The cluster side is tested in test_trainer.py
(test_the_default_storage_is_the_drivers_disk_and_the_driver_writes_it).
"""

from __future__ import annotations

import dask.config
import pytest

from dckpt.train._persist import uploads_from_node


@pytest.mark.parametrize(("uri", "from_node"), [
    ("s3://bucket/run", True),               # every node reaches it
    ("gcs://bucket/run", True),
    ("memory://run", False),                 # this process's memory
    ("/data/runs/run", False),               # the driver's disk
    ("file:///data/runs/run", False),        # the same, given as a URI
    ("/mnt/shared/runs/run", True),          # under dckpt.shared-paths: every node mounts it
    ("file:///mnt/shared/runs/run", True),
    ("/mnt/shared2/run", False),             # a sibling of the shared path is not under it
])
def test_only_storage_every_node_sees_is_written_from_the_node(uri, from_node):
    with dask.config.set({"dckpt.shared-paths": ["/mnt/shared"]}):
        assert uploads_from_node(uri) is from_node
