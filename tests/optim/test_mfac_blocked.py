"""MFAC's block_size, bfloat16 window and memory_budget: against a hand-written block-diagonal
dense loop, against dense MFAC on each block alone, bitwise against the dense optimizer when
one block holds everything, and the memory formula against the bytes actually allocated."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from torchsteer.optim import MFAC
from torchsteer.optim.mfac_memory import (
    check_memory_budget,
    mfac_max_ngrads,
    mfac_n_blocks,
    mfac_window_bytes,
)

F64 = torch.float64


def problem(seed=0, dtype=F64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)  # 37 params
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=gen).to(dtype)
    y = torch.randn(16, 2, generator=gen).to(dtype)
    return model, x, y


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
        opt.step()


def reference_blocked(model, x, y, steps, groups, ngrads, damp, block_size):
    """The spec, written out: per block the explicit (damp I + G_b^T G_b / m)^{-1} g_b."""
    params = list(model.parameters())
    owner = [g for g in groups for _ in g["params"]]
    history, bufs = [], [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        for p in params:
            p.grad = None
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
        with torch.no_grad():
            g = torch.cat(
                [(p.grad + o["weight_decay"] * p).reshape(-1) for p, o in zip(params, owner)]
            )
            history.append(g)
            rows = torch.zeros(ngrads, g.numel(), dtype=F64)
            for i, r in enumerate(history[-ngrads:]):
                rows[i] = r
            u = torch.empty_like(g)
            for lo in range(0, g.numel(), block_size):
                hi = min(lo + block_size, g.numel())
                gb = rows[:, lo:hi]
                fisher = damp * torch.eye(hi - lo, dtype=F64) + gb.T @ gb / ngrads
                u[lo:hi] = torch.linalg.solve(fisher, g[lo:hi])
            offset = 0
            for p, buf, o in zip(params, bufs, owner):
                n = p.numel()
                buf.mul_(o["momentum"]).add_(
                    u[offset : offset + n].view_as(p), alpha=1 - o["momentum"]
                )
                p.sub_(o["lr"] * buf)
                offset += n


def test_blocks_cross_parameters_and_groups_and_match_the_explicit_block_inverse():
    model, x, y = problem()
    ref = copy.deepcopy(model)
    w1, b1, w2, b2 = model.parameters()  # 20 + 5 + 10 + 2: blocks of 6 cross every boundary
    spec = [
        dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
        dict(lr=0.02, momentum=0.0, weight_decay=0.0),
    ]
    groups = [dict(params=[w1, b1], **spec[0]), dict(params=[w2, b2], **spec[1])]
    opt = MFAC(groups, ngrads=3, damp=1e-2, block_size=6)
    train(model, opt, x, y, 8)  # the ring of 3 wraps twice
    ref_groups = [dict(params=[0, 1], **spec[0]), dict(params=[2, 3], **spec[1])]
    reference_blocked(ref, x, y, 8, ref_groups, ngrads=3, damp=1e-2, block_size=6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert opt.state[w1]["window_gram"].shape == (7, 3, 3)  # ceil(37 / 6) blocks


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_each_block_is_dense_mfac_on_its_slice_alone(dtype):
    """Fixed gradients g_t (with momentum): block k of a blocked MFAC moves
    as a dense MFAC on a parameter holding block k alone, fed g_t[block k]. Their windows are
    equal; the parameters agree to rounding only because the dense optimizer fuses G^T x
    into the momentum update (one addmv) and a BLAS may sum a strided block in another
    order."""
    d, bs, kw = 50, 16, dict(lr=0.1, ngrads=4, damp=1e-3, momentum=0.5)  # (decay: test above)
    gen = torch.Generator().manual_seed(1)
    p = nn.Parameter(torch.randn(d, generator=gen, dtype=dtype))
    pieces = [nn.Parameter(p.detach()[lo : lo + bs].clone()) for lo in range(0, d, bs)]
    blocked = MFAC([p], block_size=bs, **kw)
    dense = [MFAC([q], **kw) for q in pieces]
    for _ in range(11):
        g = torch.randn(d, generator=gen, dtype=dtype)
        p.grad = g.clone()
        blocked.step()
        for k, (q, opt) in enumerate(zip(pieces, dense)):
            q.grad = g[k * bs : (k + 1) * bs].clone()
            opt.step()
        # the last block (2 coordinates, m = 4) is rank deficient: cond ~ 1e4 amplifies the
        # one-rounding difference of the fused update
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(p.detach(), torch.cat([q.detach() for q in pieces]), **tol)
    for k, opt in enumerate(dense):
        window = opt.state[pieces[k]]["window_grads"]
        assert torch.equal(blocked.state[p]["window_grads"][:, k * bs : (k + 1) * bs], window)
        gram = opt.state[pieces[k]]["window_gram"]  # float32 rows of a strided view: the
        # BLAS may sum in another order than on the contiguous slice, so to rounding
        torch.testing.assert_close(blocked.state[p]["window_gram"][k], gram, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_size", [37, 1000])
def test_one_block_is_bitwise_the_dense_optimizer(block_size):
    model, x, y = problem(3, torch.float32)
    twin = copy.deepcopy(model)
    a = MFAC(model.parameters(), lr=0.05, ngrads=4, damp=1e-3, momentum=0.9)
    b = MFAC(twin.parameters(), lr=0.05, ngrads=4, damp=1e-3, momentum=0.9, block_size=block_size)
    train(model, a, x, y, 9)
    train(twin, b, x, y, 9)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    sa, sb = a.state[next(model.parameters())], b.state[next(twin.parameters())]
    for key in ("window_grads", "window_gram", "window_inverse", "window_since_refresh"):
        assert torch.equal(sa[key], sb[key]), key


def _trained(steps=5, **kw):
    model, x, y = problem(4)
    opt = MFAC(model.parameters(), lr=0.05, ngrads=3, damp=1e-2, block_size=8, **kw)
    train(model, opt, x, y, steps)
    return model, opt, x, y


@pytest.mark.parametrize("how", ["state_dict", "torch.save", "deepcopy", "pickle"])
def test_blocked_resume_and_copies_continue_bit_for_bit(how):
    model, opt, x, y = _trained(momentum=0.5)
    twin = copy.deepcopy(model)
    if how in ("state_dict", "torch.save"):
        other = MFAC(twin.parameters(), lr=0.05, ngrads=3, damp=1e-2, block_size=8, momentum=0.5)
        sd = copy.deepcopy(opt.state_dict())  # as torch.optim: a live state_dict holds references
        if how == "torch.save":
            buf = io.BytesIO()
            torch.save(sd, buf)
            buf.seek(0)
            sd = torch.load(buf, weights_only=True)
        other.load_state_dict(sd)
    else:
        bundle = (
            copy.deepcopy((model, opt))
            if how == "deepcopy"
            else pickle.loads(pickle.dumps((model, opt)))
        )
        twin, other = bundle
        assert other.param_groups[0]["block_size"] == 8
    train(model, opt, x, y, 4)
    train(twin, other, x, y, 4)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda m: MFAC(m.parameters(), lr=0.05, ngrads=3, damp=1e-2, block_size=9), "block_size"),
        (lambda m: MFAC(m.parameters(), lr=0.05, ngrads=3, damp=1e-2), "block_size"),
    ],
)
def test_a_save_of_other_blocks_is_rejected_atomically(make, text):
    model, opt, x, y = _trained()
    other_model = copy.deepcopy(model)
    other = make(other_model)
    train(other_model, other, x, y, 2)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=text):
        other.load_state_dict(opt.state_dict())
    after = other.state_dict()
    first = before["param_groups"][0]["params"][0]
    for key, value in before["state"][first].items():
        assert torch.equal(torch.as_tensor(after["state"][first][key]), torch.as_tensor(value)), key
    train(other_model, other, x, y, 1)  # still steps


def test_a_tampered_blocked_save_is_rejected():
    _model, opt, _x, _y = _trained()
    sd = opt.state_dict()
    first = sd["param_groups"][0]["params"][0]
    bad = copy.deepcopy(sd)
    bad["state"][first]["window_gram"] = bad["state"][first]["window_gram"][:3]
    with pytest.raises(ValueError, match="window_gram"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][first]["window_since_refresh"] = torch.tensor(0)
    with pytest.raises(ValueError, match="window_since_refresh"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.5), "block_size"),
        (dict(block_size=True), "block_size"),
        (dict(memory_budget=0), "memory_budget"),
        (dict(memory_budget=float("nan")), "memory_budget"),
        (dict(memory_budget=-1.0), "memory_budget"),
        (dict(memory_budget="1GB"), "memory_budget"),
    ],
)
def test_invalid_block_size_and_budget(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        MFAC([nn.Parameter(torch.zeros(10))], **kwargs)


def test_blocks_and_shard_true_are_refused():
    with pytest.raises(ValueError, match="shard"):
        MFAC([nn.Parameter(torch.zeros(10))], block_size=4, shard=True)
    MFAC([nn.Parameter(torch.zeros(10))], block_size=10, shard=True)  # one block: dense


def test_bfloat16_window_step_equals_float64_algebra_on_the_rounded_gradients():
    """bf16 storage, float32 passes: the step is F^{-1} g with F built in float64 from the
    bf16-rounded gradients (tolerance: float32 arithmetic, see
    tests/linalg/test_blocked_window.py::test_bfloat16_window_computes_in_float32)."""
    d, m, damp, lr = 600, 8, 1e-3, 0.1
    gen = torch.Generator().manual_seed(2)
    for block_size in (None, 256):
        p = nn.Parameter(torch.zeros(d))
        opt = MFAC(
            [p], lr=lr, ngrads=m, damp=damp, window_dtype=torch.bfloat16, block_size=block_size
        )
        rows = torch.zeros(m, d, dtype=F64)
        for t in range(2 * m):
            g = torch.randn(d, generator=gen)
            before = p.detach().double().clone()
            p.grad = g.clone()
            opt.step()
            gb = g.to(torch.bfloat16).double()
            rows[t % m] = gb
            u = torch.empty(d, dtype=F64)
            for lo in range(0, d, block_size or d):
                hi = min(lo + (block_size or d), d)
                fisher = (
                    damp * torch.eye(hi - lo, dtype=F64) + rows[:, lo:hi].T @ rows[:, lo:hi] / m
                )
                u[lo:hi] = torch.linalg.solve(fisher, gb[lo:hi])
            step = before - p.detach().double()
            # lr * u rounded to float32 in the parameter: 1e-4 relative covers both
            assert float((step - lr * u).norm() / (lr * u).norm()) < 1e-4
        assert opt.state[p]["window_grads"].dtype == torch.bfloat16


# ---------------------------------------------------------------------- memory


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(block_size=8),
        dict(block_size=5, window_dtype=torch.bfloat16),
        dict(window_dtype=torch.float64),
    ],
)
def test_window_bytes_equal_what_mfac_allocates(kwargs):
    """The formula against the optimizer's own tensors: window, Gram, inverse, gradient buffer."""
    model, x, y = problem(5, torch.float32)
    opt = MFAC(model.parameters(), ngrads=6, **kwargs)
    train(model, opt, x, y, 1)
    state = opt.state[next(model.parameters())]
    held = sum(
        state[k].numel() * state[k].element_size()
        for k in ("window_grads", "window_gram", "window_inverse")
    )
    held += opt._flat.numel() * opt._flat.element_size()
    dtype = kwargs.get("window_dtype", torch.float32)
    assert mfac_window_bytes(37, 6, kwargs.get("block_size"), dtype) == held


def test_window_bytes_formula_and_max_ngrads():
    d = 124_000_000
    assert mfac_window_bytes(d, 1024) == 1024 * d * 4 + 2 * 1024**2 * 8 + d * 4
    nb = -(-d // 1_000_000)
    assert mfac_n_blocks(d, 1_000_000) == nb == 124
    assert (
        mfac_window_bytes(d, 32, 1_000_000, torch.bfloat16)
        == 32 * d * 2 + nb * 2 * 32**2 * 8 + d * 2
    )
    assert mfac_window_bytes(d, 32, world_size=4) == 32 * (d // 4) * 4 + 2 * 32**2 * 8 + d // 4 * 4
    for budget, kw in (
        (8e9, dict(window_dtype=torch.bfloat16)),
        (1e9, dict(block_size=4096)),
        (3e6, {}),
    ):
        m = mfac_max_ngrads(d if budget > 1e8 else 1000, budget, **kw)
        n = d if budget > 1e8 else 1000
        assert mfac_window_bytes(n, m, **kw) <= budget < mfac_window_bytes(n, m + 1, **kw)
    assert mfac_max_ngrads(d, 1e6) == 0


def test_budget_error_at_construction_names_mfac_the_bytes_and_the_options():
    """A 124M-parameter model on the meta device (nothing is ever allocated): the default
    window needs 508 GB."""
    p = nn.Parameter(torch.empty(124_000_000, device="meta"))
    need = mfac_window_bytes(124_000_000, 1024)
    with pytest.raises(ValueError) as info:
        MFAC([p], memory_budget=24e9)
    text = str(info.value)
    assert text.startswith("MFAC") and f"{need:,} bytes" in text
    for option in ("ngrads", "block_size", "window_dtype=torch.bfloat16"):
        assert option in text
    fit = mfac_max_ngrads(124_000_000, 24e9)
    assert f"ngrads <= {fit} fits" in text
    MFAC([p], ngrads=fit, memory_budget=24e9)  # the advertised setting fits


def test_budget_error_at_the_first_step_allocates_nothing():
    """Groups added after construction (or a budget lowered) are checked before the window
    exists: the step raises, no state is created and the parameters do not move."""
    a, b = nn.Parameter(torch.ones(100)), nn.Parameter(torch.ones(1000))
    opt = MFAC([a], ngrads=4, memory_budget=mfac_window_bytes(100, 4))
    with pytest.raises(ValueError, match="MFAC: the window needs"):
        opt.add_param_group(dict(params=[b]))
    assert len(opt.param_groups) == 1
    opt.param_groups[0]["memory_budget"] = 1000.0
    a.grad = torch.ones(100)
    with pytest.raises(ValueError, match="MFAC: the window needs"):
        opt.step()
    assert "window_grads" not in opt.state[a] and opt._window is None
    assert torch.equal(a.detach(), torch.ones(100))


def test_check_memory_budget_none_and_exact_fit():
    check_memory_budget(1000, 8, None, torch.float32, None)
    need = mfac_window_bytes(1000, 8)
    check_memory_budget(1000, 8, None, torch.float32, need)
    with pytest.raises(ValueError, match="MFAC"):
        check_memory_budget(1000, 8, None, torch.float32, need - 1)
