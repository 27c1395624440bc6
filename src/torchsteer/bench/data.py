"""Data sets of the benchmarks: generated, or bundled with scikit-learn (nothing downloaded).

Each loader returns float tensors in the requested dtype; splits are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from torchsteer.extras import require

__all__ = ["breast_cancer", "digits", "regression_1d"]


def regression_1d(
    n_train: int = 10_000, n_val: int = 10_000, seed: int = 0, dtype: torch.dtype = torch.float32
):
    """The Sven paper's toy regression: f(x) = exp(-10 x^2) sin(2 x), x ~ U[-1, 1].

    Inputs and targets are standardized with the training statistics.

    Returns:
        (x_train, y_train, x_val, y_val), shapes (n, 1).
    """
    g = np.random.default_rng(seed)
    x = g.uniform(-1.0, 1.0, size=(n_train + n_val, 1))
    y = np.exp(-10.0 * x**2) * np.sin(2.0 * x)
    xt, yt = x[:n_train], y[:n_train]
    x = (x - xt.mean()) / xt.std()
    y = (y - yt.mean()) / yt.std()
    t = [
        torch.as_tensor(a, dtype=dtype)
        for a in (x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    ]
    return tuple(t)


def digits(test_fraction: float = 0.2, dtype: torch.dtype = torch.float32):
    """scikit-learn's bundled digits (1797 x 64), features / 16; the first rows are the test set.

    Returns:
        (x_train, y_train, x_test, y_test); labels are int64 in [0, 10).
    """
    d = require("sklearn.datasets", "the digits data").load_digits()
    x = torch.as_tensor(d.data / 16.0, dtype=dtype)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    n_test = math.floor(test_fraction * len(y))
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def breast_cancer(dtype: torch.dtype = torch.float64):
    """scikit-learn's bundled breast-cancer data (569 x 30), standardized; labels in {0, 1}."""
    d = require("sklearn.datasets", "the breast-cancer data").load_breast_cancer()
    x = (d.data - d.data.mean(0)) / d.data.std(0)
    return torch.as_tensor(x, dtype=dtype), torch.as_tensor(d.target, dtype=dtype)
