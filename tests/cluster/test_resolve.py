"""Which failures of a source resolution moves on from, and which it raises at once.

A table over the errors a holder or a URI can end with (the cluster tests in
``test_references.py`` show two of them end to end).
"""

from __future__ import annotations

import errno

import pytest
from distributed.comm import CommClosedError

from dckpt.cluster._core import CheckpointId, NodeRef
from dckpt.cluster._failures import fixable_elsewhere, raise_unless_fixable_elsewhere
from dckpt.cluster._holders import BUSY_SERVING, order_holders
from dckpt.errors import (
    CacheFullError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CorruptChunkError,
    IncompleteCheckpointError,
    UnsafePathError,
)

REF = NodeRef(node_id="node-0", path="/data/ckpt", checkpoint_id=CheckpointId("c" * 32),
              size=1234, digest="d" * 64, store_address="tcp://127.0.0.1:4000", uris=())


@pytest.mark.parametrize("error", [
    CommClosedError("the owner went away"),
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
    TimeoutError("the store of node node-0 did not answer within 1 s"),
    PermissionError("the store at ...: not registered with this node's store"),
    CheckpointNotFoundError("the store at ...: checkpoint was at /x, which is gone"),
    IncompleteCheckpointError("s3://b/x: an upload that never finished"),
    CheckpointError("the store at ...: [Errno 5] Input/output error"),  # the holder's disk
    CorruptChunkError("chunk of weights.bin at 0 failed its checksum 3 times"),
    OSError(errno.EIO, "Input/output error"),
], ids=type)
def test_another_source_may_fix(error):
    assert fixable_elsewhere(error)
    raise_unless_fixable_elsewhere(error, REF, "node-1", "the store")  # returns


@pytest.mark.parametrize(("error", "raised"), [
    (CacheFullError("larger than the whole node cache; raise `dckpt.cache.max-bytes`"),
     CacheFullError),
    (OSError(errno.ENOSPC, "No space left on device"), CacheFullError),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), CacheFullError),
    (UnsafePathError("'../x' leads outside the target"), UnsafePathError),
    (CheckpointFormatError("a manifest of format 9"), CheckpointFormatError),
    (ValueError("chunk_bytes must be an integer"), ValueError),
    (TypeError("an argument too many"), TypeError),
], ids=lambda v: v.__name__ if isinstance(v, type) else type(v).__name__)
def test_no_other_source_can_fix_and_the_error_names_this_node(error, raised):
    assert not fixable_elsewhere(error)
    with pytest.raises(raised) as info:
        raise_unless_fixable_elsewhere(error, REF, "node-1", "the store")
    shown = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert f"node node-1 copying checkpoint {'c' * 32} of node node-0" in shown
    if raised is CacheFullError:
        assert "dckpt.cache.max-bytes" in shown


# --- which holders step 4 asks, in which order ------------------------------------------


def _holder(address: str, node_id: str, kind: str, serving: int = 0) -> dict:
    return {"address": address, "node_id": node_id, "kind": kind, "serving": serving}


def test_idle_holders_come_first_then_the_origin_then_busy_ones():
    answer = {
        "holders": [
            _holder("tcp://busy:1", "node-3", "cached", serving=BUSY_SERVING),
            _holder(REF.store_address, "node-0", "origin"),
            _holder("tcp://idle:1", "node-2", "cached", serving=1),
            _holder("tcp://idler:1", "node-4", "cached", serving=0),
            _holder("tcp://here:1", "node-1", "cached"),  # this node: its cache was looked at
        ],
        "node_addresses": [REF.store_address],
        "address_alive": True,
    }
    holders, notes = order_holders(answer, REF, "node-1")
    assert [h.address for h in holders] == [
        "tcp://idler:1", "tcp://idle:1", REF.store_address, "tcp://busy:1"]
    assert notes == []


def test_a_dead_origin_address_is_replaced_by_the_nodes_current_worker():
    restarted = "tcp://10.0.0.1:5000"
    answer = {"holders": [_holder(restarted, "node-0", "origin")],
              "node_addresses": [restarted], "address_alive": False}
    holders, notes = order_holders(answer, REF, "node-1")
    assert [(h.address, h.kind) for h in holders] == [(restarted, "origin")] and notes == []


def test_a_gone_origin_is_noted_and_not_tried():
    answer = {"holders": [_holder("tcp://n2:1", "node-2", "cached")],
              "node_addresses": [], "address_alive": False}
    holders, notes = order_holders(answer, REF, "node-1")
    assert [h.address for h in holders] == ["tcp://n2:1"]
    assert notes == [f"store of node-0 at {REF.store_address}: that worker is gone, and no "
                     "worker of node-0 is in the registry"]


def test_a_reference_younger_than_the_registry_still_reaches_its_live_origin():
    answer = {"holders": [], "node_addresses": [], "address_alive": True}
    holders, _ = order_holders(answer, REF, "node-1")
    assert [(h.address, h.node_id, h.kind) for h in holders] == [
        (REF.store_address, "node-0", "origin")]


def test_without_a_registry_the_references_own_store_is_asked():
    holders, notes = order_holders(None, REF, "node-1")
    assert [h.address for h in holders] == [REF.store_address] and notes == []
