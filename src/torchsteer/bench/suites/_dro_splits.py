"""Data splits of the ``dro`` suite: the loader's split, a stratified k-fold, a validation carve.

``"legacy"`` is :func:`torchsteer.bench.data.digits`' split (the first 359 rows are the test
set); ``"cv5"`` tests seed ``s`` on fold ``s mod 5`` of :func:`stratified_folds` (every digit is
tested once over five seeds). :func:`carve_validation` takes a stratified validation part out
of a training set, so hyperparameters are chosen without the test set.
"""

from __future__ import annotations

import numpy as np
import torch

from torchsteer.bench import data

__all__ = ["SPLITS", "carve_validation", "load_split", "stratified_folds"]

SPLITS = ("legacy", "cv5")


def stratified_folds(y: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Fold id in ``[0, k)`` per row: each class shuffled (NumPy ``seed``), dealt round-robin."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(y), dtype=np.int64)
    labels = y.numpy()
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        folds[rows] = np.arange(len(rows)) % k
    return torch.as_tensor(folds)


def carve_validation(x, y, fraction: float = 0.25, seed: int = 0):
    """A stratified validation split of a training set: ``(x_fit, y_fit, x_val, y_val)``."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    labels = y.numpy()
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        val[rows[: round(fraction * len(rows))]] = True
    v = torch.as_tensor(val)
    return x[~v], y[~v], x[v], y[v]


def load_split(config, seed: int):
    """``(x_train, y_train, x_test, y_test)`` of ``config.split`` (a suite ``Config``) for this
    seed."""
    if config.split == "legacy":
        return data.digits()
    if config.split == "cv5":
        x, y, _, _ = data.digits(test_fraction=0.0)
        test = stratified_folds(y, 5) == seed % 5
        return x[~test], y[~test], x[test], y[test]
    raise ValueError(f"Invalid split: {config.split!r}; expected one of {SPLITS}")
