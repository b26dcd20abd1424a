"""The JSON of the HTTP endpoint: request bodies to batches, predictions to bodies.

Pure (no server, no cluster); numpy is needed to read a request, pandas only for the
``"dataframe"`` form.

Requests are a JSON object with exactly one of these keys:

- ``{"instances": [[1.0, 2.0], [3.0, 4.0]]}``: rows, as TensorFlow Serving, KServe
  and MLflow take them; the batch is ``numpy.asarray(instances)``.
- ``{"columns": {"a": [1.0, 3.0], "b": [2.0, 4.0]}}``: named columns of equal
  length; the batch is a dict of numpy arrays.
- ``{"dataframe": {"a": [1.0, 3.0], "b": [2.0, 4.0]}}``: the same columns as a pandas
  DataFrame (index 0..n-1), for predictors that select columns by name.

Answers are ``{"predictions": P}``: an array answer is nested lists
(``ndarray.tolist()``); a dict of arrays or a DataFrame is ``{column: list}`` (the
DataFrame's index is dropped), except that one whose only column is ``"predictions"``
(what :class:`~dckpt.predict.Predictor` makes of an array answer to a dict or a
DataFrame) is that column's list, so that every form of request gets the same kind
of answer. Non-finite floats are written as ``NaN``/``Infinity``, as Python's
``json`` does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dckpt.predict._predictor import PREDICTIONS

__all__ = ["REQUEST_FORMS", "BadRequestError", "dump", "dump_predictions", "load_request"]

REQUEST_FORMS = ("instances", "columns", "dataframe")


class BadRequestError(ValueError):
    """A request body that is not JSON, or not in one of :data:`REQUEST_FORMS`."""


def load_request(body: bytes) -> Any:
    """The batch a request body asks predictions for.

    Raises
    ------
    BadRequestError
        The body is not a JSON object of one of the forms above.
    """
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequestError(f"the body is not JSON: {e}") from e
    if not isinstance(request, dict):
        raise BadRequestError(f"the body is a JSON {type(request).__name__}; "
                              f"expected an object with one of the keys {_forms()}")
    forms = [key for key in REQUEST_FORMS if key in request]
    unknown = sorted(set(request) - set(REQUEST_FORMS))
    if len(forms) != 1 or unknown:
        found = f" (found {sorted(request)})" if request else " (found none)"
        raise BadRequestError(f"expected exactly one of the keys {_forms()}{found}")
    form = forms[0]
    import numpy as np

    if form == "instances":
        instances = request[form]
        if not isinstance(instances, list) or not instances:
            raise BadRequestError('"instances" must be a non-empty list of rows')
        return _array(np, instances, '"instances"')
    columns = _columns(np, request[form], form)
    if form == "columns":
        return columns
    try:
        import pandas as pd
    except ImportError as e:
        raise BadRequestError('this server has no pandas: send "columns" instead of '
                              '"dataframe"') from e
    return pd.DataFrame(columns)


def _forms() -> str:
    return ", ".join(f'"{key}"' for key in REQUEST_FORMS)


def _array(np: Any, values: Any, what: str) -> Any:
    try:
        array = np.asarray(values)
    except ValueError as e:  # ragged rows
        raise BadRequestError(f"{what} is not a rectangular array: {e}") from e
    if array.dtype == object:
        raise BadRequestError(f"{what} holds values of mixed kinds or ragged rows")
    return array


def _columns(np: Any, columns: Any, form: str) -> dict[str, Any]:
    if not isinstance(columns, dict) or not columns:
        raise BadRequestError(f'"{form}" must be a non-empty object of columns')
    arrays = {name: _array(np, values, f'column "{name}"') for name, values in columns.items()}
    lengths = {name: len(a) if a.ndim else None for name, a in arrays.items()}
    if None in lengths.values() or len(set(lengths.values())) != 1:
        raise BadRequestError(f"the columns must be lists of equal length; got {lengths}")
    return arrays


def dump_predictions(predictions: Any) -> bytes:
    """The body that answers a request with ``predictions``.

    Raises
    ------
    TypeError
        ``predictions`` hold something JSON cannot carry.
    """
    if type(predictions).__name__ == "DataFrame" and hasattr(predictions, "to_dict"):
        predictions = {str(c): predictions[c].to_numpy() for c in predictions.columns}
    if isinstance(predictions, Mapping) and list(predictions) == [PREDICTIONS]:
        predictions = predictions[PREDICTIONS]
    return dump({"predictions": predictions})


def dump(document: Any) -> bytes:
    """``document`` as JSON bytes; numpy arrays and scalars become lists and numbers."""
    return json.dumps(document, default=_plain).encode()


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and type(value).__module__.split(".")[0] == "numpy":
        return value.tolist()
    raise TypeError(f"a prediction of type {type(value).__name__} cannot be written as JSON")
