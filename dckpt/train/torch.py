"""PyTorch on dckpt, by Ray 2.6's names (``ray.train.torch``).

- :class:`TorchCheckpoint`: a :class:`~dckpt.Checkpoint` holding a model or its state
  dict under the key ``"model"``, as Ray's does (:meth:`~TorchCheckpoint.from_state_dict`,
  :meth:`~TorchCheckpoint.from_model`, :meth:`~TorchCheckpoint.get_model`);
- :class:`TorchTrainer`: :class:`~dckpt.train.DataParallelTrainer` with every rank in
  one gloo process group (``torch.distributed``), set up before the training function
  runs and left after it;
- :func:`prepare_model` (to this rank's device, wrapped in ``DistributedDataParallel``
  when there are several ranks) and :func:`get_device`, inside the training function;
- :class:`TorchPredictor`: a :class:`~dckpt.predict.Predictor` that turns numpy or
  pandas batches into tensors, for :class:`~dckpt.predict.BatchPredictor` and
  :class:`~dckpt.predict.PredictorDeployment`.

PyTorch is imported by this module, and only by it: ``import dckpt`` and
``import dckpt.train`` do not import it.

**Security:** like every dict checkpoint, a TorchCheckpoint is a pickle, and
:meth:`TorchCheckpoint.get_model` reads a ``model.pt`` with
``torch.load(weights_only=False)`` (a whole model needs it). Load only checkpoints you
trust.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from dckpt._checkpoint import Checkpoint
from dckpt.errors import CheckpointFormatError
from dckpt.predict import Predictor
from dckpt.train import DataParallelTrainer, get_context

_logger = logging.getLogger(__name__)

__all__ = [
    "TorchCheckpoint",
    "TorchPredictor",
    "TorchTrainer",
    "get_device",
    "prepare_model",
]

#: The dict key of the model (``ray.air.constants.MODEL_KEY``).
_MODEL_KEY = "model"
#: The file a Ray 2.7+ ``TorchCheckpoint`` directory holds its model in.
_MODEL_FILENAME = "model.pt"
# Ray's ``PREPROCESSOR_KEY``; dckpt's Checkpoint reads the preprocessor from it.
_PREPROCESSOR_KEY = "_preprocessor"
# DistributedDataParallel's prefix of every key of a wrapped model's state dict.
_DDP_PREFIX = "module."


class TorchCheckpoint(Checkpoint):
    """A :class:`~dckpt.Checkpoint` of a PyTorch model (Ray AIR's ``TorchCheckpoint``).

    What it stores is Ray 2.6's layout: the dict ``{"model": state_dict_or_model,
    "_preprocessor": preprocessor}``. Make one from any checkpoint of that layout with
    ``TorchCheckpoint.from_checkpoint(checkpoint)``.

    As Ray 2.6 does for every value of the dict, :meth:`from_dict` (and so every
    constructor here) unwraps a ``DistributedDataParallel`` (or ``DataParallel``)
    model and removes the ``"module."`` prefix of a wrapped model's state dict, so
    ``TorchCheckpoint.from_dict({"epoch": 3, "model": ddp_model.state_dict()})``
    loads into the plain model. Where it differs from Ray 2.6 on purpose: that is
    done when the checkpoint is made, not when it is pickled, so :meth:`to_dict`
    shows what every copy holds; and tensors are kept on the device they were on
    (Ray moves them to the CPU when the checkpoint travels): save ``model.cpu()`` or
    its state dict when the reader may have no GPU.
    """

    @classmethod
    def from_dict(cls, data: dict[Any, Any]) -> TorchCheckpoint:
        """A checkpoint of ``data``, with DDP wrappers and prefixes removed (see above).

        ``data`` itself is not changed.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"from_dict() takes a dict, not {type(data).__name__}")
        cleaned = {key: _unwrapped(value) if isinstance(value, nn.Module)
                   else _without_ddp_prefix(value) if isinstance(value, Mapping) else value
                   for key, value in data.items()}
        return super().from_dict(cleaned)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], *, preprocessor: Any = None
    ) -> TorchCheckpoint:
        """A checkpoint of a model's state dict, the way PyTorch recommends saving one.

        Parameters
        ----------
        state_dict
            ``model.state_dict()``; one of a ``DistributedDataParallel`` model loses
            its ``"module."`` prefix (a copy; ``state_dict`` is not changed).
        preprocessor
            Applied to every batch by a predictor made from this checkpoint.

        Examples
        --------
        >>> model = torch.nn.Linear(1, 1)
        >>> checkpoint = TorchCheckpoint.from_state_dict(model.state_dict())
        >>> checkpoint.get_model(torch.nn.Linear(1, 1))
        Linear(in_features=1, out_features=1, bias=True)
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError("from_state_dict() takes a model's state dict (a mapping of "
                            f"names to tensors), not {type(state_dict).__name__}")
        return cls.from_dict({_PREPROCESSOR_KEY: preprocessor, _MODEL_KEY: state_dict})

    @classmethod
    def from_model(cls, model: nn.Module, *, preprocessor: Any = None) -> TorchCheckpoint:
        """A checkpoint of a whole model (pickled, so its class must be importable
        where it is read; :meth:`from_state_dict` has no such need).

        A ``DistributedDataParallel`` (or ``DataParallel``) model is stored unwrapped.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"from_model() takes a torch.nn.Module, not {type(model).__name__}")
        return cls.from_dict({_PREPROCESSOR_KEY: preprocessor, _MODEL_KEY: model})

    def get_model(self, model: nn.Module | None = None) -> nn.Module:
        """The model of this checkpoint.

        Parameters
        ----------
        model
            For a checkpoint of a state dict: the model to load it into (returned).
            For a checkpoint of a whole model it is not needed, and ignored with a
            warning, as in Ray.

        Raises
        ------
        ValueError
            The checkpoint holds a state dict and ``model`` is None.
        CheckpointFormatError
            The checkpoint holds no model (no ``"model"`` key, no ``model.pt``), or
            something that is neither a model nor a state dict (a ``ValueError``;
            Ray raises ``KeyError`` for the first).
        """
        saved = self._saved_model()
        if isinstance(saved, nn.Module):
            if model is not None:
                warnings.warn(
                    "this TorchCheckpoint holds a whole model, so the model passed to "
                    "get_model() is not used; leave out model= (in "
                    "TorchPredictor.from_checkpoint or BatchPredictor too)",
                    UserWarning, stacklevel=2,
                )
            return saved
        if isinstance(saved, Mapping):
            if model is None:
                raise ValueError(
                    "this TorchCheckpoint holds a state dict, not a model: pass the model "
                    "to load it into, get_model(MyModel())"
                )
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
            model.load_state_dict(_without_ddp_prefix(saved))
            return model
        raise CheckpointFormatError(
            f"{self!r} holds a {type(saved).__name__} under {_MODEL_KEY!r}; expected a "
            "torch.nn.Module or a state dict (see TorchCheckpoint.from_model and "
            "from_state_dict)"
        )

    def _saved_model(self) -> Any:
        """What is stored under ``"model"``, or in a directory's ``model.pt``."""
        kind, data = self.get_internal_representation()
        if kind == "data_dict" and _MODEL_KEY in data:
            return data[_MODEL_KEY]
        with self.as_directory() as directory:
            path = os.path.join(directory, _MODEL_FILENAME)
            if os.path.isfile(path):
                # A whole model is a pickle, which weights_only refuses; see the module notes.
                return torch.load(path, map_location="cpu", weights_only=False)
            data = Checkpoint.from_directory(directory).to_dict()
        if _MODEL_KEY in data:
            return data[_MODEL_KEY]
        raise CheckpointFormatError(
            f"{self!r} holds no model: expected a dict key {_MODEL_KEY!r} (as "
            f"TorchCheckpoint.from_state_dict writes it) or a file {_MODEL_FILENAME!r}"
        )


def _unwrapped(model: nn.Module) -> nn.Module:
    # DDP, DataParallel and FSDP keep the user's model as .module (as Ray 2.6 checks).
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def _without_ddp_prefix(state_dict: Mapping[str, Any]) -> Any:
    """``state_dict`` without DDP's ``"module."`` prefix (a copy when it had one)."""
    if not state_dict or not all(isinstance(k, str) and k.startswith(_DDP_PREFIX)
                                 for k in state_dict):
        return state_dict
    stripped = copy.copy(state_dict)  # keeps the type and its _metadata attribute
    consume_prefix_in_state_dict_if_present(stripped, _DDP_PREFIX)  # type: ignore[arg-type]
    return stripped


# ---------------------------------------------------------------------- training

# Whether the ranks of this thread's TorchTrainer run asked for GPUs (set by _TorchLoop).
_use_gpu: contextvars.ContextVar[bool] = contextvars.ContextVar("dckpt_torch_use_gpu",
                                                                default=False)


class _TorchLoop:
    """The user's training function, run with this rank's GPU choice known."""

    def __init__(self, train_loop: Callable[..., Any], use_gpu: bool) -> None:
        self.train_loop = train_loop
        self.use_gpu = use_gpu

    def __call__(self, config: dict[str, Any]) -> Any:
        token = _use_gpu.set(self.use_gpu)
        try:
            if _takes_no_arguments(self.train_loop):  # as the trainer would call it
                return self.train_loop()
            return self.train_loop(config)
        finally:
            _use_gpu.reset(token)


def _takes_no_arguments(func: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                   for p in parameters)


class TorchTrainer(DataParallelTrainer):
    """Data-parallel PyTorch training on Dask (Ray AIR's ``TorchTrainer``).

    A :class:`~dckpt.train.DataParallelTrainer` whose ranks join one
    ``torch.distributed`` process group (gloo, ``init_method="env://"``, the
    ``torchrun`` environment variables set) before the training function runs, and
    leave it afterwards; after a failure every rank of the new attempt joins a new
    group. Inside the function, :func:`prepare_model` wraps the model in
    ``DistributedDataParallel`` and :func:`get_device` gives this rank's device. As
    in Ray, only rank 0's checkpoints are kept.

    Parameters
    ----------
    train_loop_per_worker, train_loop_config, scaling_config, run_config, datasets, resume_from_checkpoint
        As for :class:`~dckpt.train.DataParallelTrainer`; ``scaling_config.use_gpu``
        also makes :func:`get_device` give a GPU where one exists.
    torch_config
        Ray's ``TorchConfig``: only ``None`` is accepted; the backend is gloo, which
        works on CPUs and GPUs alike (NCCL is not set up).
    **kwargs
        The flat keywords of :class:`~dckpt.train.DataParallelTrainer`
        (``num_workers``, ``max_failures``, ``client``, ...), except
        ``setup_torch_distributed``, which is always on.
    """

    def __init__(
        self,
        train_loop_per_worker: Callable[..., Any],
        *,
        train_loop_config: Mapping[str, Any] | None = None,
        torch_config: Any = None,
        scaling_config: Any = None,
        run_config: Any = None,
        datasets: Mapping[str, Any] | None = None,
        resume_from_checkpoint: Checkpoint | None = None,
        **kwargs: Any,
    ) -> None:
        if torch_config is not None:
            raise TypeError(
                "TorchTrainer(torch_config=...) is not supported: dckpt always uses gloo "
                "with init_method='env://'; leave torch_config out"
            )
        if "setup_torch_distributed" in kwargs:
            raise TypeError("TorchTrainer always sets up torch.distributed; "
                            "leave setup_torch_distributed out")
        if not callable(train_loop_per_worker):
            raise TypeError(f"train_loop_per_worker must be callable, got {train_loop_per_worker!r}")
        super().__init__(
            train_loop_per_worker, train_loop_config=train_loop_config,
            scaling_config=scaling_config, run_config=run_config, datasets=datasets,
            resume_from_checkpoint=resume_from_checkpoint, setup_torch_distributed=True,
            **kwargs,
        )
        self.train_loop_per_worker = _TorchLoop(train_loop_per_worker,
                                                self.scaling_config.use_gpu)


def get_device() -> torch.device:
    """This rank's device: ``cuda:<local rank mod GPUs>`` when the run asked for GPUs
    (``ScalingConfig(use_gpu=True)``) and this worker has one, else the CPU.

    Outside a :class:`TorchTrainer`'s ranks: a GPU if there is one, else the CPU.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        context = get_context()
    except RuntimeError:  # not in a rank: any GPU of this process will do
        return torch.device("cuda")
    if not _use_gpu.get():
        return torch.device("cpu")
    return torch.device(f"cuda:{context.local_rank % torch.cuda.device_count()}")


def prepare_model(
    model: nn.Module,
    move_to_device: bool | torch.device = True,
    parallel_strategy: str | None = "ddp",
    parallel_strategy_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``model`` on this rank's device, wrapped in ``DistributedDataParallel`` when
    the run has more than one rank (Ray's ``ray.train.torch.prepare_model``).

    Parameters
    ----------
    model
        The model to train.
    move_to_device
        ``True``: to :func:`get_device`; a ``torch.device``: to that one; ``False``:
        leave it where it is.
    parallel_strategy
        ``"ddp"`` or ``None`` (no wrapper). Ray's ``"fsdp"`` is not supported.
    parallel_strategy_kwargs
        Passed to ``DistributedDataParallel``.

    Raises
    ------
    RuntimeError
        Outside the ranks of a :class:`TorchTrainer` (or a trainer with
        ``setup_torch_distributed=True``) when a wrapper is asked for.
    ValueError
        An unsupported ``parallel_strategy``.
    """
    if parallel_strategy not in ("ddp", None):
        raise ValueError(f"parallel_strategy must be 'ddp' or None, not {parallel_strategy!r} "
                         "(FSDP is not supported by dckpt)")
    if move_to_device is not False:
        device = get_device() if move_to_device is True else torch.device(move_to_device)
        model = model.to(device)
    if parallel_strategy is None or get_context().world_size < 2:
        return model
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        raise RuntimeError(
            "prepare_model() wraps the model in DistributedDataParallel, which needs "
            "the ranks' process group: train with TorchTrainer (or "
            "DataParallelTrainer(setup_torch_distributed=True))"
        )
    kwargs = dict(parallel_strategy_kwargs or {})
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cuda":
        kwargs.setdefault("device_ids", [parameter.device])
    return DistributedDataParallel(model, **kwargs)


# ---------------------------------------------------------------------- prediction

#: The key (dict) or column (DataFrame) of a model's single tensor output, as in Ray.
_PREDICTIONS = "predictions"

_warned_no_gpu = threading.Event()


class TorchPredictor(Predictor):
    """Scores batches with a PyTorch model (Ray AIR's ``TorchPredictor``).

    A batch becomes tensors as in Ray 2.6: a numpy array is one tensor; a dict of
    arrays, or a DataFrame of several columns, is a dict of tensors (one per key or
    column) that the model takes as its one argument; a dict or DataFrame of one
    entry is that entry's tensor. The model runs under ``torch.no_grad()`` in eval
    mode (:meth:`call_model`). Its output (a tensor, or a dict of them) comes back as
    numpy: ``{"predictions": array}`` for a numpy or dict batch, as Ray returns it;
    for a DataFrame, a DataFrame with the batch's index, as every dckpt predictor
    gives it (one column ``"predictions"``, or ``"predictions_0"``, ... for each
    output column; a dict output gives a column per key).

    Parameters
    ----------
    model
        The model; put in eval mode.
    preprocessor
        Applied to every batch first.
    use_gpu
        Move the model, and every batch, to the GPU where this process has one. Where
        it has none, the CPU is used and that is logged once per process (Ray fails
        instead).
    """

    def __init__(self, model: nn.Module, preprocessor: Any = None, use_gpu: bool = False) -> None:
        super().__init__(preprocessor)
        if not isinstance(model, nn.Module):
            raise TypeError(f"TorchPredictor takes a torch.nn.Module, not {type(model).__name__}")
        self.use_gpu = use_gpu
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if use_gpu and self.device.type == "cpu" and not _warned_no_gpu.is_set():
            _warned_no_gpu.set()  # once per process: a BatchPredictor makes one per worker
            _logger.warning("TorchPredictor(use_gpu=True) found no GPU in process %d; "
                           "predicting on the CPU", os.getpid())
        self.model = model.to(self.device)
        self.model.eval()

    @classmethod
    def from_checkpoint(
        cls, checkpoint: Checkpoint, model: nn.Module | None = None, use_gpu: bool = False,
        **kwargs: Any,
    ) -> TorchPredictor:
        """A predictor of the checkpoint's model and preprocessor.

        Parameters
        ----------
        checkpoint
            A :class:`TorchCheckpoint`, or any checkpoint of its layout.
        model
            For a checkpoint of a state dict: the model to load it into.
        use_gpu
            As for the constructor.
        """
        torch_checkpoint = TorchCheckpoint.from_checkpoint(checkpoint)
        return cls(torch_checkpoint.get_model(model),
                   preprocessor=torch_checkpoint.get_preprocessor(), use_gpu=use_gpu, **kwargs)

    def call_model(self, tensor: Any) -> Any:
        """The model's output for one batch of tensors; override to adapt it (e.g. a
        list output to a dict), as in Ray."""
        with torch.no_grad():
            return self.model(tensor)

    def predict(self, batch: Any, dtype: Any = None, **kwargs: Any) -> Any:
        """Predictions for ``batch`` (a numpy array, a dict of them, or a DataFrame).

        Parameters
        ----------
        dtype
            The tensors' dtype (e.g. ``torch.float32``), or a mapping of column/key to
            dtype; None keeps numpy's (float64 data gives float64 tensors, as in Ray).
        """
        predictions = super().predict(batch, dtype=dtype, **kwargs)
        if type(predictions).__module__.split(".")[0] == "numpy":
            return {_PREDICTIONS: predictions}  # Ray names a numpy batch's predictions too
        if isinstance(predictions, dict) and _is_frame(batch):
            import pandas as pd

            return pd.DataFrame({key: _column(value) for key, value in predictions.items()},
                                index=batch.index)
        return predictions

    def _predict(self, batch: Any, dtype: Any = None, **kwargs: Any) -> Any:
        output = self.call_model(self._tensors(batch, dtype))
        if isinstance(output, Mapping):
            return {key: _to_numpy(value) for key, value in output.items()}
        return _to_numpy(output)

    def _tensors(self, batch: Any, dtype: Any) -> Any:
        if _is_frame(batch):
            batch = {name: _frame_column(batch[name]) for name in batch.columns}
        if isinstance(batch, Mapping):
            if len(batch) == 1:  # one input: the model takes it as a tensor (Ray)
                ((name, values),) = batch.items()
                return self._tensor(values, _dtype_of(dtype, name))
            return {name: self._tensor(values, _dtype_of(dtype, name))
                    for name, values in batch.items()}
        return self._tensor(batch, dtype)

    def _tensor(self, values: Any, dtype: Any) -> torch.Tensor:
        flags = getattr(values, "flags", None)
        if flags is not None and not flags.writeable:
            # pandas' copy-on-write hands out read-only arrays, which torch only warns about.
            values = values.copy()
        return torch.as_tensor(values, dtype=dtype, device=self.device)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={type(self.model).__name__}, "
                f"preprocessor={self._preprocessor!r}, use_gpu={self.use_gpu!r})")


def _is_frame(batch: Any) -> bool:
    return type(batch).__module__.split(".")[0] == "pandas" and type(batch).__name__ == "DataFrame"


def _frame_column(series: Any) -> Any:
    """A column as one array: a column of equal-shaped arrays is stacked."""
    import numpy as np

    values = series.to_numpy()
    if values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
        return np.stack(list(values))
    return values


def _dtype_of(dtype: Any, name: str) -> Any:
    return dtype.get(name) if isinstance(dtype, Mapping) else dtype


def _to_numpy(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"the model returned a {type(value).__name__}; TorchPredictor takes a tensor "
            "or a dict of tensors. Subclass it and override call_model() to turn other "
            "outputs into one of those"
        )
    return value.detach().cpu().numpy()


def _column(values: Any) -> Any:
    """A DataFrame column of an output array: a row per item, arrays for wider rows."""
    return values if values.ndim <= 1 else list(values)
