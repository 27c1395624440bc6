"""Sven's reliability (issue 18 #1, #11, #17; issue 19's sparse gradients), against oracles.

Each test checks the step against the float64 truncated-SVD oracle of ``test_sven`` (numpy's
SVD of a ``jacrev`` Jacobian), or checks that parameters and state are exactly as they were.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import torchsteer.optim._sven_device as sven_device
from torchsteer.optim.sven import SKIP_WARNING, Sven

from .test_sven import F64, batch, flat, mlp, per_sample, residual_jacobian, truncated_step

PATHS = {
    "closure-dense": dict(jacobian="dense", svd="exact"),
    "closure-matrix-free": dict(jacobian="matrix_free", svd="exact"),
    "functional-dense": dict(jacobian="dense", svd="exact", functional=True),
    "functional-matrix-free": dict(jacobian="matrix_free", svd="exact", functional=True),
}


def build(model, functional=False, **kwargs):
    if functional:
        kwargs.update(model=model, loss_fn=per_sample)
    return Sven(model.parameters(), **kwargs)


def take_step(opt, model, x, y, functional=False):
    if functional:
        return opt.step(batch=(x, y))
    return opt.step(lambda: per_sample(model(x), y))


def active_oracle(model, x, y, rank, rtol):
    """The float64 truncated step over the parameters that require grad only."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def R(q):
        return per_sample(functional_call(model, q, (x,)), y)

    jac = jacrev(R)(params)
    M = torch.cat([jac[n].reshape(x.shape[0], -1) for n in names], dim=1)
    d, _, _ = truncated_step(M, R(params).detach(), rank, rtol)
    return d


# ---------------------------------------------------------------- #1: what is called NaN
@pytest.mark.parametrize("jac", ["dense", "matrix_free"])
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_closure_that_calls_backward_is_not_called_nan(jac, mode):
    # it was relabelled "Invalid Jacobian: contains NaN or Inf" (matrix-free), and with
    # nonfinite="skip" every step was skipped silently
    x, y = batch(6)
    model = mlp()
    opt = Sven(model.parameters(), rank=4, jacobian=jac, nonfinite=mode, seed=0)
    before = flat(model)

    def closure():
        opt.zero_grad()
        losses = per_sample(model(x), y)
        losses.sum().backward()
        return losses

    with pytest.raises(RuntimeError, match="backward through the graph") as info:
        opt.step(closure)
    assert "must not call backward()" in "".join(getattr(info.value, "__notes__", []))
    assert torch.equal(flat(model), before) and not opt.state


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_a_solver_error_on_a_finite_jacobian_keeps_its_type_and_is_not_skipped(monkeypatch, mode):
    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    monkeypatch.setattr(sven_device, "solve_rows", fails)  # the read-once and masked steps'
    x, y = batch(6)
    model = mlp()
    opt = Sven(model.parameters(), rank=4, jacobian="dense", nonfinite=mode)
    before = flat(model)
    with pytest.raises(torch.linalg.LinAlgError, match="failed to converge"):
        opt.step(lambda: per_sample(model(x), y))
    assert torch.equal(flat(model), before) and not opt.state


@pytest.mark.parametrize("c", [1e20, 1e-20])
@pytest.mark.parametrize("kappa", [1.0, 2.0])
@pytest.mark.parametrize(
    "path",
    [
        dict(jacobian="dense", svd="exact"),
        dict(jacobian="dense", svd="exact", gram_dtype=F64),
        dict(jacobian="dense", svd="randomized"),
        dict(jacobian="matrix_free", svd="exact"),
    ],
)
def test_float32_losses_scaled_by_1e20_or_1e_minus20_give_the_unscaled_step(c, kappa, path):
    # the dense Gram of 1e20 losses overflowed float32 (eigh failed: "Invalid Jacobian:
    # contains NaN or Inf"), that of 1e-20 losses underflowed (a NaN step)
    x, y = batch(8, seed=3)
    model64 = mlp(seed=3)
    R, M = residual_jacobian(model64, x, y, kappa)
    d, s, keep = truncated_step(M, R, 5, 1e-2)  # the float64 oracle at scale 1
    model = copy.deepcopy(model64).float()
    x32, y32 = x.float(), y.float()
    t0 = flat(model).double()
    opt = Sven(model.parameters(), lr=0.5, rank=5, rtol=1e-2, kappa=kappa, seed=0, **path)
    opt.step(lambda: c * per_sample(model(x32), y32))
    torch.testing.assert_close(flat(model).double() - t0, -0.5 * d, rtol=2e-3, atol=2e-5)
    st = opt.state[next(model.parameters())]
    assert st["kept_rank"].item() == len(keep)
    sigma = float(st["sigma_max"])
    assert sigma == pytest.approx(c ** (kappa / 2) * s[0], rel=1e-4)


def test_no_rescaling_inside_the_band_keeps_the_step_bit_for_bit(monkeypatch):
    # power-of-two rescaling only outside [2^-16, 2^16]: a loss scale of 4 gives the same
    # digits as the unscaled run, and a scale of 2^40 the same digits too (powers of two)
    x, y = batch(8)
    steps = []
    for c in (1.0, 4.0, 2.0**40):
        model = mlp()
        t0 = flat(model)
        opt = Sven(model.parameters(), lr=0.5, rank=5, rtol=1e-2, svd="exact", jacobian="dense")
        opt.step(lambda m=model, c=c: c * per_sample(m(x), y))
        steps.append(flat(model) - t0)
    assert torch.equal(steps[1], steps[0])
    torch.testing.assert_close(steps[2], steps[0], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- #1: skipping warns
def test_skipping_steps_in_a_row_warns_once_at_the_users_line():
    x, y = batch(6, seed=2)
    model = mlp(seed=2)
    opt = Sven(model.parameters(), rank=4, nonfinite="skip", seed=0)
    before = flat(model)

    def bad():
        return per_sample(model(x), y) * float("nan")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(SKIP_WARNING + 3):
            opt.step(bad)  # the line the warning must name
    ours = [w for w in caught if "skipped" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is RuntimeWarning
    assert ours[0].filename == __file__
    assert int(opt.state[next(model.parameters())]["skipped_steps"]) == SKIP_WARNING + 3
    assert torch.equal(flat(model), before)
    # a good step ends the run of skips: a new run warns again, once
    opt.step(lambda: per_sample(model(x), y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(SKIP_WARNING - 1):
            opt.step(bad)
        assert not [w for w in caught if "skipped" in str(w.message)]
        opt.step(bad)
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1


# ---------------------------------------------------------------- #11, #17: frozen parameters
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("frozen", ["0.weight", "2.bias"])
def test_frozen_parameters_are_untouched_and_the_rest_takes_the_step_without_them(path, frozen):
    # functional path: the frozen weight moved (0.056 in 3 steps); closure path: raw
    # autograd error "One of the differentiated Tensors does not require grad"
    kw = dict(PATHS[path])
    functional = kw.pop("functional", False)
    x, y = batch(5, seed=4)
    model = mlp(seed=4)
    dict(model.named_parameters())[frozen].requires_grad_(False)
    frozen_before = dict(model.named_parameters())[frozen].detach().clone()
    opt = build(model, functional, lr=0.5, rank=4, rtol=1e-3, momentum=0.5, seed=0, **kw)
    for _ in range(3):
        d = active_oracle(model, x, y, 4, 1e-3)
        active = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
        take_step(opt, model, x, y, functional)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
        if _ == 0:  # the first step is the truncated step over the trainable parameters
            torch.testing.assert_close(after - active, -0.5 * d, rtol=1e-7, atol=1e-10)
    assert torch.equal(dict(model.named_parameters())[frozen], frozen_before)
    assert "momentum_buffer" not in opt.state[dict(model.named_parameters())[frozen]]


@pytest.mark.parametrize("path", list(PATHS))
def test_all_parameters_frozen_raises_a_clear_error_and_changes_nothing(path):
    kw = dict(PATHS[path])
    functional = kw.pop("functional", False)
    x, y = batch(5)
    model = mlp()
    opt = build(model, functional, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    before = flat(model)
    with pytest.raises(ValueError, match="none requires grad"):
        take_step(opt, model, x, y, functional)
    assert torch.equal(flat(model), before) and not opt.state


# ---------------------------------------------------------------- issue 19: sparse gradients
@pytest.mark.parametrize("path", list(PATHS))
def test_a_sparse_embedding_raises_a_clear_value_error(path):
    kw = dict(PATHS[path])
    functional = kw.pop("functional", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2)).double()
    idx = torch.randint(0, 10, (6,))
    y = torch.randn(6, 2, dtype=F64)
    opt = build(model, functional, rank=4, **kw)
    before = flat(model)
    with pytest.raises(ValueError, match=r"sparse.*sparse=False"):
        take_step(opt, model, idx, y, functional)
    assert torch.equal(flat(model), before) and not opt.state
