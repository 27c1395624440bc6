"""The two built-in suites on tiny configurations, and the data they use."""

import math

import numpy as np
import pytest
import torch

from torchsteer.bench import data
from torchsteer.bench.registry import Context, get_suite
from torchsteer.bench.suites import digits_mlp, regression


def test_regression_data_is_standardized_with_training_statistics():
    x, y, xv, _ = data.regression_1d(n_train=3000, n_val=2000, seed=1, dtype=torch.float64)
    for t in (x, y):
        assert float(t.mean()) == pytest.approx(0.0, abs=1e-12)
        assert float(t.std(unbiased=False)) == pytest.approx(1.0, rel=1e-12)
    # the validation split is scaled with the training statistics, not its own
    assert float(xv.mean()) != pytest.approx(0.0, abs=1e-12)
    # x ~ U[-1, 1] standardized: the range is 2 / std(x) ~ 2 sqrt(3) wide
    assert float(x.max() - x.min()) == pytest.approx(2 * math.sqrt(3), rel=0.05)


def test_regression_suite_tiny_run():
    config = regression.Config(n_train=256, n_val=256, epochs=2, lbfgs_steps=15, evals=4)
    ticks = []
    runs = regression.run(Context(quick=True, seeds=[0], advance=lambda: ticks.append(1)), config)
    arms = regression.methods(config)
    assert [r.method for r in runs] == [m.name for m in arms]
    assert len(ticks) == len(runs) == len(arms)  # one progress unit per (method, seed)
    _, _, xv, yv = data.regression_1d(256, 256, seed=0)
    lbfgs = next(r for r in runs if r.method == "L-BFGS")
    assert lbfgs.steps[-1] == 15
    # the metric is the validation MSE: at step 0 it is that of the untouched model
    from torchsteer.bench.training import mlp

    model = mlp([1, 16, 16, 16, 1], seed=0)
    with torch.no_grad():
        assert lbfgs.metric[0] == pytest.approx(float(((model(xv) - yv) ** 2).mean()), rel=1e-6)
    assert lbfgs.final_metric < 0.05 * lbfgs.metric[0]
    assert all(np.diff(r.cpu_time).min() >= 0 for r in runs)


def test_digits_suite_tiny_run_reaches_a_known_accuracy():
    config = digits_mlp.Config(epochs=1, lbfgs_steps=10, evals=2)
    runs = digits_mlp.run(Context(quick=True, seeds=[1]), config)
    assert [r.method for r in runs] == [m.name for m in digits_mlp.methods(config)]
    assert all(r.seed == 1 for r in runs)
    lbfgs = next(r for r in runs if r.method == "L-BFGS")
    # chance is 0.1; a converging full-batch method passes 0.9 on digits within 10 steps
    assert lbfgs.metric[0] < 0.3 and lbfgs.final_metric > 0.9
    # the recorded loss is the full training cross-entropy of the model
    assert lbfgs.loss[0] == pytest.approx(math.log(10), rel=0.05)


@pytest.mark.parametrize("name", ["regression", "digits-mlp"])
def test_units_match_the_arms(name):
    module = {"regression": regression, "digits-mlp": digits_mlp}[name]
    suite = get_suite(name)
    assert suite.units(True, [0, 1, 2]) == 3 * len(module.methods(module.QUICK))
    assert suite.units(False, [0]) == len(module.methods(module.FULL))
    names = [m.name for m in module.methods(module.QUICK)]
    assert len(set(names)) == len(names)
    assert any(n.split(" ", 1)[0] == suite.baseline for n in names)  # the ratio has a baseline
