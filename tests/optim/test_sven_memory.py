"""Sven's memory budget: the formulas, the path ``jacobian="auto"`` takes and records, and the
errors of a model too large for its budget (before anything is allocated or changed)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import torchsteer.optim.sven as sven_module
from torchsteer.jacobian.captured import GraphRowCapture
from torchsteer.optim import Sven
from torchsteer.optim.sven_memory import (
    MemoryBudgetError,
    dense_bytes,
    matrix_free_bytes,
    plan,
    sven_memory,
)

F64 = torch.float64
P = 38  # mlp(): 3 x 6 + 6 + 6 x 2 + 2
B = 6
N = 8  # float64


def mlp(seed=0):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise((3, 6, 2)):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(F64)


def data(rows=B):
    g = torch.Generator().manual_seed(5)
    return torch.randn(rows, 3, generator=g, dtype=F64), torch.randn(
        rows, 2, generator=g, dtype=F64
    )


def per_sample(out, y):
    return ((out - y) ** 2).sum(dim=1)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def forbid_dense(monkeypatch):
    """Any formation of the dense Jacobian fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the dense Jacobian was formed")

    monkeypatch.setattr(sven_module, "graph_jacobian", forbidden)
    monkeypatch.setattr(sven_module, "per_sample_jacobian", forbidden)
    monkeypatch.setattr(GraphRowCapture, "rows", forbidden)


def steps(opt, model, functional, n=2):
    x, y = data()
    for _ in range(n):
        if functional:
            opt.step(batch=(x, y))
        else:
            opt.step(lambda: per_sample(model(x), y))


# ---------------------------------------------------------------- the formulas
def test_formulas_closed_form():
    assert dense_bytes(8, 123_750_000, 4) == 8 * 123_750_000 * 4
    # n l (2 P + 2 P_k), + 8 P + 16 P_k for a fraction
    assert matrix_free_bytes(1000, 1000, 4, 4) == 4 * 4 * 4000
    assert matrix_free_bytes(1000, 100, 4, 4) == 4 * 4 * 2200 + 8000 + 1600
    est = sven_memory(8, 1000, 4, rank=64, oversample=10, fraction=0.1)
    widths = [k for k in est if "l = 8" in k]  # l = min(rank + oversample, B, P_k)
    assert len(widths) == 1 and est[widths[0]] == 4 * 8 * 2200 + 8000 + 1600


def test_plan_chooses_dense_matrix_free_then_a_fraction():
    args = dict(rows=B, cols=P, itemsize=N, fraction=1.0, rank=1, oversample=0, exact=False)
    dense = B * P * N  # 1824
    assert plan("auto", budget=dense, **args).path == "dense"
    mf = plan("auto", budget=dense - 1, **args)  # sketch: 8 * 1 * 4 * 38 = 1216
    assert (mf.path, mf.fraction, mf.bytes) == ("matrix_free", 1.0, 1216)
    # 912 + 32 P_k <= 1200  ->  P_k = 9
    part = plan("auto", budget=1200, **args)
    assert part.path == "matrix_free" and math.ceil(part.fraction * P) == 9
    assert part.bytes == 8 * (2 * P + 2 * 9) + 8 * P + 16 * 9 <= 1200
    with pytest.raises(MemoryBudgetError, match=r"Sven Jacobian.*1,824 bytes.*memory_budget"):
        plan("auto", budget=900, **args)
    # a given fraction is an upper bound: auto only lowers it
    assert plan("auto", budget=10**9, **{**args, "fraction": 0.5}).fraction == 0.5
    assert plan("matrix_free", budget=1, **args).path == "matrix_free"  # budget not consulted


def test_plan_at_124m_parameters():
    """GPT-2 small at B = 8 (the scale runs): 3.96 GB dense, a fraction at 3.5 GiB, l = 2."""
    P124 = 123_750_000
    args = dict(rows=8, cols=P124, itemsize=4, fraction=1.0, oversample=0, exact=False)
    chosen = plan("auto", budget=int(3.5 * 2**30), rank=2, **args)
    kept = (int(3.5 * 2**30) - (2 * 8 + 8) * P124) // (2 * 8 + 16)
    assert chosen.path == "matrix_free" and math.ceil(chosen.fraction * P124) == kept
    with pytest.raises(MemoryBudgetError, match="lower rank / oversample"):
        plan("auto", budget=int(3.5 * 2**30), rank=4, **args)  # l = 4: at least 4.95 GB
    with pytest.raises(MemoryBudgetError, match=r"dense Jacobian: B x P = 8 x 123,750,000"):
        plan("dense", budget=2**28, rank=2, **args)


# ---------------------------------------------------------------- the path in state
@pytest.mark.parametrize("functional", [False, True])
def test_auto_goes_matrix_free_and_records_it(monkeypatch, functional):
    """Over the dense budget, auto takes exactly the matrix-free step (bit for bit the one of
    jacobian="matrix_free") without forming M, and says so in its state."""
    kw = dict(lr=0.1, rank=1, oversample=0, seed=7)
    ref_model = mlp()
    fkw = dict(model=ref_model, loss_fn=per_sample) if functional else {}
    ref = Sven(ref_model.parameters(), jacobian="matrix_free", **{**kw, **fkw})
    steps(ref, ref_model, functional)
    model = mlp()
    fkw = dict(model=model, loss_fn=per_sample) if functional else {}
    opt = Sven(model.parameters(), memory_budget=B * P * N - 1, **{**kw, **fkw})
    forbid_dense(monkeypatch)
    steps(opt, model, functional)
    assert torch.equal(flat(model), flat(ref_model))
    state = opt.state[next(model.parameters())]
    assert opt.jacobian_path == "matrix_free" and float(state["matrix_free"]) == 1.0
    assert float(state["path_fraction"]) == 1.0


@pytest.mark.parametrize("functional", [False, True])
def test_auto_lowers_the_fraction_to_fit(monkeypatch, functional):
    model = mlp()
    fkw = dict(model=model, loss_fn=per_sample) if functional else {}
    opt = Sven(model.parameters(), rank=1, oversample=0, seed=3, memory_budget=1200, **fkw)
    forbid_dense(monkeypatch)
    steps(opt, model, functional)
    state = opt.state[next(model.parameters())]
    f = float(state["path_fraction"])
    assert opt.jacobian_path == "matrix_free" and math.ceil(f * P) == 9
    monkeypatch.undo()
    ref_model = mlp()
    fkw = dict(model=ref_model, loss_fn=per_sample) if functional else {}
    ref = Sven(
        ref_model.parameters(), rank=1, oversample=0, seed=3, jacobian="matrix_free",
        param_fraction=float(state["path_fraction"]), **fkw,
    )  # fmt: skip
    steps(ref, ref_model, functional)
    assert torch.equal(flat(model), flat(ref_model))
    moved = (flat(model) != flat(mlp())).sum()
    assert 0 < moved <= 2 * 9  # two steps of 9 coordinates each


def test_dense_path_is_recorded_and_the_state_resumes():
    model = mlp()
    opt = Sven(model.parameters(), rank=4, seed=1)
    steps(opt, model, False, n=1)
    state = opt.state[next(model.parameters())]
    assert opt.jacobian_path == "dense" and float(state["path_fraction"]) == 1.0
    saved = copy.deepcopy(opt.state_dict())
    assert float(saved["state"][0]["matrix_free"]) == 0.0
    other_model = mlp()
    other = Sven(other_model.parameters(), rank=4, seed=1)
    other_model.load_state_dict(model.state_dict())
    other.load_state_dict(saved)
    steps(opt, model, False, n=1)
    steps(other, other_model, False, n=1)
    assert torch.equal(flat(model), flat(other_model))
    assert other.jacobian_path == "dense"


@pytest.mark.parametrize(
    ("key", "value"), [("matrix_free", 0.5), ("path_fraction", 0.0), ("path_fraction", 2.0)]
)
def test_a_bad_recorded_path_is_refused_at_load(key, value):
    model = mlp()
    opt = Sven(model.parameters(), rank=4, seed=1)
    steps(opt, model, False, n=1)
    live = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(live)
    bad["state"][0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert torch.equal(after["state"][0]["matrix_free"], live["state"][0]["matrix_free"])
    assert torch.equal(after["state"][0]["path_fraction"], live["state"][0]["path_fraction"])


# ---------------------------------------------------------------- over budget: errors
def test_dense_forced_over_budget_raises_at_construction():
    model = mlp()
    with pytest.raises(MemoryBudgetError) as info:
        Sven(model.parameters(), jacobian="dense", memory_budget=P * N - 1)
    msg = str(info.value)
    assert "Sven dense Jacobian" in msg and f"{P * N:,} bytes" in msg
    assert "jacobian='auto'" in msg and "memory_budget" in msg
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("functional", [False, True])
def test_dense_forced_over_budget_raises_before_the_jacobian(monkeypatch, functional):
    """B x P is over, one row is not: the step raises before M exists; nothing changes."""
    model = mlp()
    fkw = dict(model=model, loss_fn=per_sample) if functional else {}
    opt = Sven(model.parameters(), jacobian="dense", memory_budget=B * P * N - 1, **fkw)
    forbid_dense(monkeypatch)
    before = flat(model)
    with pytest.raises(MemoryBudgetError, match=rf"B x P = {B} x {P} needs {B * P * N:,} bytes"):
        steps(opt, model, functional, n=1)
    assert torch.equal(flat(model), before) and not opt.state


def test_auto_with_nothing_that_fits_raises():
    model = mlp()
    with pytest.raises(MemoryBudgetError, match="at any param_fraction"):
        Sven(model.parameters(), memory_budget=100)  # even B = 1 is over
    opt = Sven(model.parameters(), rank=4, oversample=0, memory_budget=2 * P * N)  # B = 1 fits
    before = flat(model)
    with pytest.raises(MemoryBudgetError, match=r"raise memory_budget, or lower rank"):
        steps(opt, model, False, n=1)
    assert torch.equal(flat(model), before) and not opt.state
