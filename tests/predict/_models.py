"""Small models and preprocessors the predict tests share (importable on workers too,
which load them by reference when a checkpoint holding them is unpickled there)."""

from __future__ import annotations

import numpy as np


class Linear:
    """y = X @ w + b, scikit-learn style."""

    def __init__(self, w: list[float], b: float = 0.0) -> None:
        self.w, self.b = np.asarray(w), b

    def predict(self, X):
        return np.asarray(X, dtype=float) @ self.w + self.b


class Scale:
    """A preprocessor in Ray's style: transform_batch."""

    def transform_batch(self, batch):
        return batch * 2
