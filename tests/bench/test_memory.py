"""Peak memory on CPU: known allocations, and a measured value for the arms of every suite."""

import numpy as np
import torch

from torchsteer.bench.memory import peak_memory


def test_peak_of_known_torch_allocations():
    def two_then_one():
        a = torch.empty(1000, 1000)  # 4,000,000 bytes
        b = torch.empty(500, 1000)  # 2,000,000 bytes, both alive
        del a, b
        torch.empty(250, 1000)  # 1,000,000 bytes after both were freed

    assert peak_memory(two_then_one) == 6_000_000


def test_numpy_is_counted_with_python_true_only():
    make = lambda: np.ones(1_000_000).sum()  # noqa: E731  8,000,000 bytes, freed at once
    assert peak_memory(make) == 0  # torch sees nothing
    peak = peak_memory(make, python=True)
    assert 8_000_000 <= peak < 8_000_000 + 64 * 1024  # the array plus a few Python objects


def test_the_global_rng_is_left_as_it_was():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    peak_memory(lambda: torch.rand(100))
    assert torch.equal(torch.rand(3), expected)


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_rlhf_and_lr_spike_and_dro_arms_measure_their_step():
    from torchsteer.bench.suites import dro, lr_spike, rlhf_toy

    cfg = rlhf_toy.Config(steps=3, warmup=1)
    run = rlhf_toy.train_arm("PID", 0, cfg)
    table = cfg.length * (cfg.vocab + 1) * cfg.vocab * 4
    assert run.peak_memory >= 3 * table  # Adam's grad, exp_avg, exp_avg_sq of the table
    (spike,) = lr_spike.run_branches("MLP+LN", "limiter", 0, (10,), steps=52, n_train=64)
    mlp_bytes = param_bytes(lr_spike.make_model("MLP+LN", 0).parameters())
    assert spike.peak_memory >= 3 * mlp_bytes
    arm = dro.ARMS[1]
    run = dro.train_arm(arm, 0, dro.Config(epochs=1, max_seeds=1))
    dro_bytes = param_bytes(dro.mlp([64, 128, 10], torch.nn.ReLU, seed=0).parameters())
    assert run.peak_memory >= 3 * dro_bytes


def test_convex_arms_count_numpy_too():
    from torchsteer.bench.suites import _convex_problems as problems
    from torchsteer.bench.suites import convex

    problem = problems.logistic_synthetic(100)
    _, problem.f_star, _ = problems.newton_polish(problem, np.zeros(problem.d), maxiter=100)
    by_name = {a.name: a for a in convex.arms()}
    dense = convex.run_arm(by_name["SciPy trust-exact"], problem, quick=True)
    assert dense.peak_memory >= problem.d * problem.d * 8  # its dense float64 Hessian
    newton = convex.run_arm(by_name["RN hessian/cg"], problem, quick=True)
    assert newton.peak_memory > 0
