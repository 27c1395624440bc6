"""The shared training loop: curves, clocks, batching and the L-BFGS arm, against closed forms."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from torchsteer.bench.training import (
    Method,
    lbfgs_method,
    mlp,
    optimizer_state_bytes,
    peak_step_memory,
    per_sample_closure_step,
    time_to_target,
    torch_method,
    train,
)


def squared_error(out, y):
    return (out - y).pow(2).flatten(1).sum(1)


def linear_problem(n=40, d=3, seed=0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    y = x @ g.normal(size=(d, 1)) + 0.5 + 0.1 * g.normal(size=(n, 1))
    return torch.tensor(x), torch.tensor(y)


def linear_model(d=3):
    model = nn.Linear(d, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    return model


def test_time_to_target_is_the_first_crossing():
    t = [0.0, 1.0, 2.5, 4.0, 7.0]
    down = [1.0, 0.5, 0.09, 0.2, 0.01]
    assert time_to_target(t, down, 0.1, higher_is_better=False) == 2.5
    assert time_to_target(t, down, 0.5, higher_is_better=False) == 1.0  # equality reaches
    assert time_to_target(t, down, 1e-3, higher_is_better=False) is None
    up = [0.1, float("nan"), 0.8, 0.95, 0.9]
    assert time_to_target(t, up, 0.9, higher_is_better=True) == 4.0
    assert time_to_target(t, [float("nan")] * 5, 0.0, higher_is_better=False) is None


def test_full_batch_sgd_equals_gradient_descent_in_closed_form():
    x, y = linear_problem()
    lr, steps = 0.05, 7
    run = train(
        torch_method("SGD", torch.optim.SGD, lr=lr),
        model := linear_model(),
        squared_error,
        x,
        y,
        suite="t",
        seed=0,
        steps=steps,
        batch_size=len(x),
        eval_every=2,
    )
    xa, ya = np.hstack([x.numpy(), np.ones((len(x), 1))]), y.numpy()
    w, losses = np.zeros((4, 1)), [float(np.mean((xa @ np.zeros((4, 1)) - ya) ** 2))]
    for _ in range(steps):
        w = w - lr * 2.0 / len(x) * xa.T @ (xa @ w - ya)
        losses.append(float(np.mean((xa @ w - ya) ** 2)))
    got = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    np.testing.assert_allclose(got, w.ravel(), rtol=1e-12, atol=1e-14)
    assert run.steps == [0, 2, 4, 6, 7]
    np.testing.assert_allclose(run.loss, [losses[s] for s in run.steps], rtol=1e-12)


def test_cpu_time_counts_only_the_steps():
    x, y = linear_problem()
    ticks = itertools.count()  # every clock call advances one "second"
    run = train(
        torch_method("SGD", torch.optim.SGD, lr=0.01),
        linear_model(),
        squared_error,
        x,
        y,
        suite="t",
        seed=0,
        steps=10,
        batch_size=8,
        eval_every=3,
        metric_fn=lambda m: 0.0,
        clock=lambda: float(next(ticks)),
    )
    assert run.cpu_time == [float(s) for s in run.steps] == [0.0, 3.0, 6.0, 9.0, 10.0]
    assert run.step_time == 1.0


def test_minibatches_cover_every_sample_once_per_epoch():
    n, b = 10, 4
    x = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    seen = []

    def record_batch(optimizer, model, loss_fn, xb, yb):
        seen.append(xb.squeeze(1).long().tolist())
        return 0.0

    method = Method(
        name="spy", make=lambda m: torch.optim.SGD(m.parameters(), lr=0.0), step=record_batch
    )
    train(
        method,
        linear_model(1),
        squared_error,
        x,
        x,
        suite="t",
        seed=3,
        steps=6,
        batch_size=b,
        eval_every=100,
        measure_memory=False,
    )
    assert [len(s) for s in seen] == [4, 4, 2, 4, 4, 2]
    for epoch in (seen[:3], seen[3:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(n))
    assert seen[:3] != seen[3:]  # reshuffled


def test_lbfgs_arm_reaches_the_least_squares_optimum():
    x, y = linear_problem(n=50)
    model = linear_model()
    method = lbfgs_method(steps=5, tolerance_grad=1e-14, tolerance_change=1e-16)
    run = train(
        method,
        model,
        squared_error,
        x,
        y,
        suite="t",
        seed=0,
        steps=1000,
        batch_size=8,
        eval_every=1,
    )
    xa = np.hstack([x.numpy(), np.ones((50, 1))])
    w, *_ = np.linalg.lstsq(xa, y.numpy(), rcond=None)
    got = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])
    np.testing.assert_allclose(got, w.ravel(), rtol=1e-7, atol=1e-9)  # line search: ~sqrt(eps)
    assert run.loss[-1] == pytest.approx(float(np.mean((xa @ w - y.numpy()) ** 2)), rel=1e-12)
    assert run.steps[-1] == 5  # the method's own budget, not the suite's
    assert run.extra["func_evals"] >= 2


def test_divergence_stops_the_arm_and_is_marked():
    x, y = linear_problem()
    run = train(
        torch_method("SGD", torch.optim.SGD, lr=100.0),
        linear_model(),
        squared_error,
        x,
        y,
        suite="t",
        seed=0,
        steps=10_000,
        batch_size=len(x),
        eval_every=10_000,
    )
    assert run.extra["diverged"] is True
    assert run.steps[-1] < 10_000
    assert not math.isfinite(run.loss[-1])


def test_optimizer_state_bytes_counts_adam_moments_and_steps():
    model = mlp([3, 5, 2], seed=0)
    opt = torch.optim.Adam(model.parameters())
    assert optimizer_state_bytes(opt) == 0
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    assert optimizer_state_bytes(opt) == 2 * 4 * n + 4 * len(params)  # two moments + step


def test_per_sample_closure_step_hands_the_loss_vector_without_backward():
    class Spy(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure):
            self.losses = closure()
            self.grads = [p.grad for g in self.param_groups for p in g["params"]]
            return self.losses

    x, y = linear_problem(n=6)
    model = linear_model()
    model.weight.grad = torch.ones_like(model.weight)
    opt = Spy(model.parameters())
    mean = per_sample_closure_step(opt, model, squared_error, x, y)
    assert opt.losses.shape == (6,) and opt.losses.requires_grad
    assert opt.grads == [None, None]  # zeroed, no backward
    assert mean == pytest.approx(float(((y - 0.0) ** 2).mean()), rel=1e-12)


def test_mlp_is_seeded_privately():
    state = torch.get_rng_state()
    a, b, c = mlp([2, 4, 1], seed=1), mlp([2, 4, 1], seed=1), mlp([2, 4, 1], seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)
    assert [type(m) for m in a] == [nn.Linear, nn.GELU, nn.Linear]
    with pytest.raises(ValueError, match="Invalid sizes"):
        mlp([3])


def test_peak_step_memory_sees_a_transient_buffer_and_leaves_the_model_alone():
    def step_with_buffer(optimizer, model, loss_fn, x, y):
        buffer = torch.ones(1_000_000, dtype=torch.float32)  # 4 MB, freed at return
        torch.randn(3)  # uses the RNG
        return float(buffer[0])

    x, y = linear_problem(n=8)
    model = linear_model()
    before = [p.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    method = Method(
        name="buf", make=lambda m: torch.optim.SGD(m.parameters(), lr=1.0), step=step_with_buffer
    )
    peak = peak_step_memory(method, model, squared_error, x, y)
    assert 4_000_000 <= peak <= 4_000_000 + 4096
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    sgd = torch_method("SGD", torch.optim.SGD, lr=0.1)
    # an SGD step on the linear model holds at least its gradients (4 float64)
    assert peak_step_memory(sgd, model, squared_error, x, y) >= 4 * 8
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
