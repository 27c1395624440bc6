"""The dro suite's splits: stratified folds partition each class evenly, the cv5 split tests
every row once over five seeds, the validation carve is stratified and disjoint."""

from types import SimpleNamespace

import pytest
import torch

from torchsteer.bench import data
from torchsteer.bench.suites._dro_splits import carve_validation, load_split, stratified_folds


def labels(seed=0, n=503, classes=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("k", [2, 5])
def test_stratified_folds_deal_each_class_evenly(k):
    y = labels()
    folds = stratified_folds(y, k)
    assert torch.equal(folds, stratified_folds(y, k))  # deterministic
    assert not torch.equal(folds, stratified_folds(y, k, seed=1))
    assert set(folds.tolist()) == set(range(k))
    for c in y.unique():
        counts = torch.bincount(folds[y == c], minlength=k)
        assert int(counts.max() - counts.min()) <= 1


def test_carve_validation_is_stratified_and_disjoint():
    y = labels(seed=1)
    x = torch.arange(len(y), dtype=torch.float64)[:, None]  # row ids as features
    xa, ya, xv, yv = carve_validation(x, y, 0.25)
    ids = torch.cat([xa, xv]).flatten().long()
    assert torch.equal(ids.sort().values, torch.arange(len(y)))  # a partition of the rows
    assert torch.equal(torch.cat([ya, yv]), y[ids])  # labels travel with their rows
    for c in y.unique():
        assert int((yv == c).sum()) == round(0.25 * int((y == c).sum()))


def test_cv5_tests_every_digit_once_and_legacy_is_the_loader_split():
    x, y, _, _ = data.digits(test_fraction=0.0)
    tested = torch.zeros(len(y), dtype=torch.long)
    folds = stratified_folds(y, 5)
    cv5 = SimpleNamespace(split="cv5")
    for s in range(5):
        _, ytr, xte, yte = load_split(cv5, s)
        assert len(ytr) + len(yte) == len(y)
        assert torch.equal(yte, y[folds == s]) and torch.equal(xte, x[folds == s])
        tested[folds == s] += 1
    assert bool((tested == 1).all())
    legacy = load_split(SimpleNamespace(split="legacy"), 3)
    assert all(torch.equal(a, b) for a, b in zip(legacy, data.digits()))
    with pytest.raises(ValueError, match="Invalid split"):
        load_split(SimpleNamespace(split="other"), 0)
