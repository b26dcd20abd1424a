"""What the framework checkpoints (``dckpt.train.sklearn``, ``.xgboost``, ``.lightgbm``)
share: making one from a model file, finding that file again, and shaping batches.

No framework is imported here. A framework checkpoint is made as Ray AIR 2.6 makes
one: the model is written into a fresh directory (with the preprocessor beside it),
read into a dict checkpoint of the caller's class, and the directory removed. So the
checkpoint travels inline, and its :meth:`~dckpt.Checkpoint.to_directory` gives the
model file under its usual name, which the framework's own tools read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from dckpt import _config
from dckpt._checkpoint import Checkpoint
from dckpt.errors import CheckpointFormatError

__all__ = ["checkpoint_from_file", "model_path", "to_frame"]

C = TypeVar("C", bound=Checkpoint)


def checkpoint_from_file(
    cls: type[C], write: Callable[[str], object], filename: str, preprocessor: Any
) -> C:
    """A dict checkpoint of class ``cls`` holding the file ``write(path)`` writes.

    ``write`` gets the path of ``filename`` in an empty directory of
    ``dckpt.temporary-directory``; the preprocessor, when not ``None``, is stored
    under Ray's name (``_preprocessor``).
    """
    with tempfile.TemporaryDirectory(
        prefix=".dckpt-model-", dir=_config.temporary_directory()
    ) as directory:
        write(os.path.join(directory, filename))
        checkpoint = cls.from_directory(directory)
        if preprocessor is not None:
            checkpoint.set_preprocessor(preprocessor)
        data = checkpoint.to_dict()
    return cls.from_dict(data)


def model_path(checkpoint: Checkpoint, directory: str, names: Sequence[str]) -> str:
    """The first of ``names`` that is a file in ``directory`` (the checkpoint's).

    Raises
    ------
    CheckpointFormatError
        None of them is there.
    """
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise CheckpointFormatError(
        f"{checkpoint!r} holds no model file: expected one of {list(names)} in its "
        f"directory, found {sorted(os.listdir(directory))[:20]}; was it made with "
        f"{type(checkpoint).__name__}.from_model/from_estimator (or by Ray's)?"
    )


def to_frame(batch: Any, feature_columns: Sequence[Any] | None) -> Any:
    """``batch`` restricted to ``feature_columns``, as a model of a tabular library reads it.

    A dict of arrays becomes a pandas DataFrame (Ray does the same for these
    predictors); a numpy array keeps its type (``feature_columns`` are then column
    indices); a DataFrame keeps its index.
    """
    if isinstance(batch, Mapping):
        import pandas as pd

        batch = pd.DataFrame(dict(batch))
    if feature_columns is None:
        return batch
    if type(batch).__module__.split(".")[0] == "numpy":
        return batch[:, list(feature_columns)]
    return batch[list(feature_columns)]
