"""``CheckpointManager``: keeps a training run's best checkpoints and persists them.

The driver registers each reported checkpoint with its metrics. The manager keeps the
top ``num_to_keep`` by score (plus the latest, until a newer one arrives), deletes the
others wherever they live, uploads every ``persist_every``-th checkpoint in a single
background thread, and after each change writes its state beside the checkpoints so
that :meth:`CheckpointManager.restore` can rebuild it in a new driver.

Threads: :meth:`~CheckpointManager.register` and the properties run in the caller's
thread and only take a lock; uploads, deletions and state writes run, in the order
they were asked for, in the manager's one background thread. That order is what makes
"a checkpoint dropped while its upload is queued leaves nothing behind" hold: the
upload is skipped if it has not started, and the deletion queued after it removes it
if it has.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dckpt import _config, _storage
from dckpt._checkpoint import Checkpoint, node_ref_of
from dckpt.errors import CheckpointFormatError, CheckpointNotFoundError
from dckpt.train import _persist
from dckpt.train._ranking import RankKey, jsonable_metrics, rank_key, score_of
from dckpt.train._run_config import CheckpointConfig
from dckpt.train._state import read_state, write_state

if TYPE_CHECKING:
    from distributed import Client
    from typing_extensions import Self

    from dckpt.cluster import NodeRef

__all__ = ["CheckpointManager", "TrackedCheckpoint"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackedCheckpoint:
    """A checkpoint the manager keeps, as it stood when this snapshot was taken.

    ``uri`` is where it is persisted, once it is (``None`` until then). ``metrics`` are
    as reported (after :meth:`CheckpointManager.restore`: as stored, i.e. JSON data).
    """

    checkpoint: Checkpoint
    metrics: dict[str, Any]
    index: int
    uri: str | None


@dataclass
class _Entry:
    """The manager's mutable record of one registered checkpoint (guarded by its lock)."""

    checkpoint: Checkpoint
    metrics: dict[str, Any]
    stored_metrics: dict[str, Any]  # JSON data, taken at registration
    index: int
    key: RankKey
    ref: NodeRef | None  # taken at registration: using the data here resolves it away
    uri: str | None = None
    dropped: bool = False

    def tracked(self) -> TrackedCheckpoint:
        return TrackedCheckpoint(self.checkpoint, self.metrics, self.index, self.uri)


class CheckpointManager:
    """Keeps the best checkpoints of a training run and persists them in the background.

    Behaves like Ray Train's checkpoint manager (Ray 2.6), with these choices:

    - **Retention.** The best ``num_to_keep`` by ``checkpoint_score_attribute`` are
      kept, and so is the latest registered one until a newer one exists, even when its
      score is the worst. NaN scores rank last in both orders; of equal scores the
      later checkpoint ranks higher (as in Ray). :attr:`best_checkpoints` lists the
      best ``num_to_keep`` worst first, as Ray's ``Result.best_checkpoints`` does.
    - **Deleting** a checkpoint that falls out: a node reference's directory on its
      node and every node's cached copy (cached copies pinned at that moment stay until
      unpinned; see :func:`dckpt.cluster._forget.forget`), and its persisted copy at
      ``storage_uri``. A directory or dict checkpoint in the driver's own process is
      the caller's and is never deleted: the manager makes no local copies of its own
      besides the persisted ones.
    - **Persistence** to ``{storage_uri}/checkpoint_{index:06d}`` runs in one
      background thread; :meth:`register` never waits for it. A failure is logged and
      re-raised by the next :meth:`wait` (or :meth:`close`); later checkpoints are
      still persisted. A node reference is uploaded from its own node to remote or
      shared storage, and fetched and written by the driver when ``storage_uri`` is
      the driver's local disk (see ``CheckpointConfig.storage_uri``); once it is
      persisted, the manager tracks a copy of it whose reference also carries the URI
      (so ``latest_checkpoint`` can be had from storage when its node is gone).
    - **State** (``{storage_uri}/dckpt_manager_state.json``, JSON only) is rewritten
      after each change, unless ``persist_every=0`` (then nothing is written anywhere). Metrics are stored as JSON data: numpy scalars and arrays as
      numbers and lists, anything else JSON cannot hold as its ``repr``.

    Parameters
    ----------
    config
        What to keep and where to persist; ``CheckpointConfig()`` when None.
    run_name
        Names the default storage directory (``<dckpt.temporary-directory>/dckpt-train/
        <run_name>``) and the log lines; a fresh ``run-<time>-<random>`` when None.
    client
        The Dask client used to upload and delete node references on their nodes;
        the default client when None (only needed once a node reference is registered).

    Examples
    --------
    >>> manager = CheckpointManager(CheckpointConfig(num_to_keep=2,
    ...     checkpoint_score_attribute="loss", checkpoint_score_order="min",
    ...     persist_every=0))
    >>> for loss in [3.0, 1.0, 2.0]:
    ...     _ = manager.register(Checkpoint.from_dict({"loss": loss}), {"loss": loss})
    >>> [metrics["loss"] for _, metrics in manager.best_checkpoints]  # worst first, as in Ray
    [2.0, 1.0]
    >>> manager.close()
    """

    config: CheckpointConfig
    run_name: str
    storage_uri: str
    _client: Client | None
    _lock: threading.Lock
    _entries: list[_Entry]  # kept ones, registration order
    _next_index: int
    _latest_index: int | None
    _executor: concurrent.futures.ThreadPoolExecutor
    _pending: list[concurrent.futures.Future[None]]
    _errors: list[BaseException]
    _closed: bool

    def __init__(
        self,
        config: CheckpointConfig | None = None,
        *,
        run_name: str | None = None,
        client: Client | None = None,
    ) -> None:
        self.config = config if config is not None else CheckpointConfig()
        self.run_name = run_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.storage_uri = (self.config.storage_uri or os.path.join(
            _config.temporary_directory(), "dckpt-train", self.run_name)).rstrip("/")
        _storage.resolve_uri(self.storage_uri, self.config.storage_options)  # bad protocols now
        self._client = client
        self._lock = threading.Lock()
        self._entries = []
        self._next_index = 0
        self._latest_index = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"dckpt-manager-{self.run_name}"
        )
        self._pending = []
        self._errors = []
        self._closed = False

    # ------------------------------------------------------------------ registering

    def register(self, checkpoint: Checkpoint, metrics: Mapping[str, Any]) -> TrackedCheckpoint:
        """Track ``checkpoint`` reported with ``metrics``; returns at once.

        Its upload (if this is a checkpoint to persist), the deletion of what falls out
        of the top K and the state write are queued for the background thread.

        Raises
        ------
        MetricNotFoundError
            ``metrics`` lack ``checkpoint_score_attribute`` (nothing is registered).
        TypeError
            ``checkpoint`` is not a Checkpoint, or the score is not a number.
        """
        if not isinstance(checkpoint, Checkpoint):
            raise TypeError(f"expected a dckpt Checkpoint, not {type(checkpoint).__name__}")
        attribute = self.config.checkpoint_score_attribute
        score = score_of(metrics, attribute) if attribute is not None else None
        kept_metrics, stored = dict(metrics), jsonable_metrics(metrics)
        ref = node_ref_of(checkpoint)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"checkpoint manager {self.run_name} is closed")
            index = self._next_index
            entry = _Entry(checkpoint, kept_metrics, stored, index,
                           rank_key(score, self.config.checkpoint_score_order, index), ref)
            self._next_index += 1
            self._latest_index = index
            self._entries.append(entry)
            dropped = self._drop_outranked()
            every = self.config.persist_every
            if every and (index + 1) % every == 0:
                self._submit(functools.partial(self._persist, entry))
            for old in dropped:
                self._submit(functools.partial(self._delete, old))
            if every:  # persist_every=0: nothing goes to storage, not even the state
                self._submit(self._write_state)
            tracked = entry.tracked()
        logger.debug("registered checkpoint %d of %s (score %s); dropped %s",
                     index, self.run_name, score, [old.index for old in dropped])
        return tracked

    def _drop_outranked(self) -> list[_Entry]:
        """Mark and remove what is neither in the top K nor the latest (lock held)."""
        keep = self.config.num_to_keep
        if keep is None or len(self._entries) <= keep:
            return []
        best = {id(e) for e in sorted(self._entries, key=_key, reverse=True)[:keep]}
        dropped = [e for e in self._entries
                   if id(e) not in best and e.index != self._latest_index]
        for entry in dropped:
            entry.dropped = True
        self._entries = [e for e in self._entries if not e.dropped]
        return dropped

    # ------------------------------------------------------------------ reading

    @property
    def latest_checkpoint(self) -> Checkpoint | None:
        """The checkpoint registered last (None before any)."""
        with self._lock:
            latest = max(self._entries, key=lambda e: e.index, default=None)
        return latest.checkpoint if latest is not None else None

    @property
    def best_checkpoint(self) -> Checkpoint | None:
        """The best kept checkpoint by score (the latest without a score attribute):
        the last of :attr:`best_checkpoints`."""
        best = self.best_checkpoints
        return best[-1][0] if best else None

    @property
    def best_checkpoints(self) -> list[tuple[Checkpoint, dict[str, Any]]]:
        """The best ``num_to_keep`` checkpoints with their metrics, **worst first**.

        Ray 2.6's order, which its ``Result.best_checkpoints`` has (its checkpoint
        manager's ``best_checkpoints()``, ascending by score): the best is last, NaN
        scores come first, of equal scores the earlier one comes first, and without a
        score attribute the order is that of registration. As in Ray, the latest
        checkpoint is not listed when it is not among the best (it is kept, as
        :attr:`latest_checkpoint`, until a newer one arrives; :attr:`tracked` lists it).
        """
        with self._lock:
            ranked = sorted(self._entries, key=_key)
        keep = self.config.num_to_keep
        if keep is not None:
            ranked = ranked[-keep:]
        return [(e.checkpoint, e.metrics) for e in ranked]

    @property
    def tracked(self) -> list[TrackedCheckpoint]:
        """The kept checkpoints, in registration order."""
        with self._lock:
            return [e.tracked() for e in self._entries]

    # ------------------------------------------------------------------ background

    def wait(self, timeout: float | None = None) -> None:
        """Wait until the uploads, deletions and state writes asked for so far are done.

        Raises
        ------
        TimeoutError
            They are not done within ``timeout`` seconds.
        Exception
            The first error of the background work since the last ``wait`` (it is
            cleared: the next ``wait`` reports only newer ones).
        """
        with self._lock:
            pending = list(self._pending)
        _, not_done = concurrent.futures.wait(pending, timeout)
        if not_done:
            raise TimeoutError(
                f"{len(not_done)} background tasks of checkpoint manager {self.run_name} "
                f"still running after {timeout} s"
            )
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()]
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def close(self) -> None:
        """:meth:`wait`, then stop the background thread. Registering afterwards fails."""
        with self._lock:
            self._closed = True
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _submit(self, work: Callable[[], None]) -> None:
        """Queue ``work`` for the background thread (lock held, so the order is kept)."""
        self._pending.append(self._executor.submit(self._run, work))

    def _run(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - kept for wait(); later work goes on
            logger.warning("checkpoint manager %s: background work failed: %r", self.run_name, e)
            with self._lock:
                self._errors.append(e)

    def _persist(self, entry: _Entry) -> None:
        """Background: upload ``entry`` unless it was dropped before its turn came."""
        with self._lock:
            if entry.dropped:
                logger.debug("not persisting checkpoint %d: no longer kept", entry.index)
                return
        uri = f"{self.storage_uri}/checkpoint_{entry.index:06d}"
        started = time.perf_counter()
        persisted = _persist.persist(entry.checkpoint, uri, self.config.storage_options,
                                     self._client)
        with self._lock:
            # Dropped meanwhile: its deletion is queued after this and removes ``uri``.
            entry.uri, entry.checkpoint = uri, persisted
        logger.info("persisted checkpoint %d of %s to %s in %.1f s", entry.index,
                    self.run_name, uri, time.perf_counter() - started)

    def _delete(self, entry: _Entry) -> None:
        """Background: delete a dropped checkpoint wherever it lives."""
        _persist.delete(entry.ref, entry.uri, self.config.storage_options, self._client)
        logger.debug("deleted checkpoint %d of %s", entry.index, self.run_name)

    def _write_state(self) -> None:
        with self._lock:
            state = {
                "run_name": self.run_name,
                "config": {**self.config.to_json(), "storage_uri": self.storage_uri},
                "next_index": self._next_index,
                "latest_index": self._latest_index,
                "checkpoints": [
                    {"index": e.index, "metrics": e.stored_metrics, "uri": e.uri}
                    for e in self._entries
                ],
            }
        write_state(self.storage_uri, state, self.config.storage_options)

    # ------------------------------------------------------------------ restoring

    @classmethod
    def restore(
        cls,
        uri: str,
        *,
        client: Client | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> CheckpointManager:
        """Rebuild the manager whose ``storage_uri`` was ``uri``, to carry on registering.

        The configuration is the stored one, with ``storage_uri=uri`` (the folder may
        have moved) and ``storage_options``. The persisted checkpoints come back as
        ``Checkpoint.from_uri`` with their stored metrics and ranking; those never
        persisted are gone with the old driver, and so are persisted ones whose upload
        no longer reads back (each logged). Indexes continue after the last one
        registered.

        Raises
        ------
        CheckpointNotFoundError
            No state file at ``uri``.
        CheckpointFormatError
            The state file is damaged, or of a newer dckpt.
        """
        state = read_state(uri, storage_options)
        names = {f.name for f in dataclasses.fields(CheckpointConfig)}
        stored = {k: v for k, v in state["config"].items() if k in names}
        try:
            config = CheckpointConfig(**{**stored, "storage_uri": uri,
                                         "storage_options": storage_options})
            attribute = config.checkpoint_score_attribute
            scores = [score_of(item["metrics"], attribute) if attribute is not None else None
                      for item in state["checkpoints"]]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(
                f"the checkpoint manager state at {uri} does not make sense: {e}"
            ) from e
        manager = cls(config, run_name=state.get("run_name"), client=client)
        for item, score in zip(state["checkpoints"], scores):
            if item["uri"] is None:
                logger.info("checkpoint %d was never persisted: not restored", item["index"])
                continue
            try:
                checkpoint = Checkpoint.from_uri(item["uri"], storage_options=storage_options)
            except CheckpointNotFoundError as e:
                logger.warning("checkpoint %d is not restored: %s", item["index"], e)
                continue
            manager._entries.append(_Entry(
                checkpoint, item["metrics"], item["metrics"], item["index"],
                rank_key(score, config.checkpoint_score_order, item["index"]), None,
                uri=item["uri"],
            ))
        manager._entries.sort(key=lambda e: e.index)
        manager._next_index = state["next_index"]
        manager._latest_index = state["latest_index"]
        logger.info("restored checkpoint manager %s from %s: %d checkpoints, next index %d",
                    manager.run_name, uri, len(manager._entries), manager._next_index)
        return manager


def _key(entry: _Entry) -> RankKey:
    return entry.key
