"""MFAC against a hand-written dense loop, SGD, and its own resumed copy (float64)."""

import copy
import io

import pytest
import torch
from torch import nn

from torchsteer.optim.mfac import MFAC

F64 = torch.float64


def problem(seed: int = 0, dtype=F64):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=gen).to(dtype)
    y = torch.randn(16, 2, generator=gen).to(dtype)
    return model, x, y


def loss_fn(model, x, y):
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()


def train(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def reference_mfac(model, x, y, steps, groups, ngrads, damp):
    """The spec's algorithm, written out: dense F from the last m decayed gradients."""
    params = list(model.parameters())
    history, bufs = [], [torch.zeros_like(p) for p in params]
    owner = [g for g in groups for _ in g["params"]]
    for _ in range(steps):
        for p in params:
            p.grad = None
        loss_fn(model, x, y).backward()
        with torch.no_grad():
            flat = torch.cat(
                [(p.grad + grp["weight_decay"] * p).reshape(-1) for p, grp in zip(params, owner)]
            )
            history.append(flat)
            rows = torch.zeros(ngrads, flat.numel(), dtype=F64)
            for i, r in enumerate(history[-ngrads:]):
                rows[i] = r
            fisher = damp * torch.eye(flat.numel(), dtype=F64) + rows.T @ rows / ngrads
            u = torch.linalg.solve(fisher, flat)
            offset = 0
            for p, buf, grp in zip(params, bufs, owner):
                n = p.numel()
                mom = grp["momentum"]
                buf.mul_(mom).add_(u[offset : offset + n].view_as(p), alpha=1 - mom)
                p.sub_(grp["lr"] * buf)
                offset += n


def test_matches_hand_written_loop_with_groups_weight_decay_momentum_wraparound():
    model, x, y = problem()
    ref_model = copy.deepcopy(model)
    w1, b1, w2, b2 = model.parameters()
    spec = [
        dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
        dict(lr=0.02, momentum=0.0, weight_decay=0.0),
    ]
    opt = MFAC(
        [dict(params=[w1, b1], **spec[0]), dict(params=[w2, b2], **spec[1])],
        ngrads=3,
        damp=1e-2,
    )
    train(model, opt, x, y, steps=8)  # the ring of 3 wraps twice
    ref_groups = [dict(params=[0, 1], **spec[0]), dict(params=[2, 3], **spec[1])]
    reference_mfac(ref_model, x, y, 8, ref_groups, ngrads=3, damp=1e-2)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_huge_damp_reduces_to_sgd_with_lr_over_damp():
    model, x, y = problem(1)
    sgd_model = copy.deepcopy(model)
    damp, lr = 1e8, 1e7  # F^{-1} g = g / damp up to |g|^2 / (m damp) ~ 1e-9
    opt = MFAC(model.parameters(), lr=lr, ngrads=4, damp=damp)
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=lr / damp)
    a = train(model, opt, x, y, 10)
    b = train(sgd_model, sgd, x, y, 10)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-7, atol=0)
    for p, q in zip(model.parameters(), sgd_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_state_dict_resume_is_bit_for_bit(dtype):
    model, x, y = problem(2, dtype)
    kw = dict(lr=0.03, ngrads=3, damp=1e-3, momentum=0.5, weight_decay=1e-3)
    opt = MFAC(model.parameters(), **kw)
    train(model, opt, x, y, 4)
    twin = copy.deepcopy(model)
    opt2 = MFAC(twin.parameters(), **kw)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    first = next(twin.parameters())
    assert opt2.state[first]["window_gram"].dtype == F64  # not cast to the parameter dtype
    assert opt2.state[first]["window_inverse"].dtype == F64
    a = train(model, opt, x, y, 5)  # through a wrap-around and the periodic refresh
    b = train(twin, opt2, x, y, 5)
    assert a == b
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for pid in s1:
        for key in s1[pid]:
            assert s1[pid][key].dtype == s2[pid][key].dtype, key
            assert torch.equal(s1[pid][key], s2[pid][key]), key


def _snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    return params, state


def _assert_same(snapshot, model, opt):
    params, state = snapshot
    for p, q in zip(params, model.parameters()):
        assert torch.equal(p, q)
    now = opt.state_dict()["state"]
    assert now.keys() == state.keys()
    for pid in state:
        for key in state[pid]:
            assert torch.equal(state[pid][key], now[pid][key]), key


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_and_changes_nothing(bad):
    model, x, y = problem(3)
    opt = MFAC(model.parameters(), lr=0.1, ngrads=2, damp=1e-2, momentum=0.5)
    train(model, opt, x, y, 3)
    snap = _snapshot(model, opt)
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    list(model.parameters())[1].grad[0] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        opt.step()
    _assert_same(snap, model, opt)


def test_nonfinite_gradient_skip_mode_is_as_if_the_step_never_happened():
    model, x, y = problem(4)
    twin = copy.deepcopy(model)
    kw = dict(lr=0.1, ngrads=2, damp=1e-2, momentum=0.5, nonfinite="skip")
    opt, opt2 = MFAC(model.parameters(), **kw), MFAC(twin.parameters(), **kw)
    train(model, opt, x, y, 3)
    train(twin, opt2, x, y, 3)
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()  # skipped
    first = next(model.parameters())
    assert opt.state[first]["skipped_steps"].item() == 1
    assert opt.state[first]["step"].item() == 3
    assert train(model, opt, x, y, 3) == train(twin, opt2, x, y, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lr=-1.0), "lr"),
        (dict(ngrads=0), "ngrads"),
        (dict(ngrads=2.5), "ngrads"),
        (dict(damp=0.0), "damp"),
        (dict(damp=float("inf")), "damp"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1e-3), "weight_decay"),
        (dict(window_dtype=torch.int64), "window_dtype"),
        (dict(nonfinite="ignore"), "nonfinite"),
        (dict(shard="auto"), "shard"),
    ],
)
def test_invalid_hyperparameters(kwargs, name):
    model, _, _ = problem()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        MFAC(model.parameters(), **kwargs)


@pytest.mark.parametrize("shard", [True, False])
def test_shard_without_a_process_group_is_the_plain_optimizer(shard):
    """One process is one shard: bit-identical to the default; consolidation is a no-op and
    the state dict is the usual one. (Two ranks: tests/distributed/test_mfac_ddp.py.)"""
    model, x, y = problem(6)
    twin = copy.deepcopy(model)
    kw = dict(lr=0.05, ngrads=3, damp=1e-2, momentum=0.5)
    opt, opt2 = MFAC(model.parameters(), shard=shard, **kw), MFAC(twin.parameters(), **kw)
    assert train(model, opt, x, y, 5) == train(twin, opt2, x, y, 5)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    opt.consolidate_state_dict()
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    d = sum(p.numel() for p in model.parameters())
    assert sd["state"][0]["window_grads"].shape == (3, d)
    assert torch.equal(sd["state"][0]["window_grads"], sd2["state"][0]["window_grads"])


def test_closure_is_evaluated_with_grad_and_returns_loss():
    model, x, y = problem(5)
    twin = copy.deepcopy(model)
    opt = MFAC(model.parameters(), lr=0.05, ngrads=4, damp=1e-2)
    opt2 = MFAC(twin.parameters(), lr=0.05, ngrads=4, damp=1e-2)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    with torch.no_grad():
        losses = [opt.step(closure).item() for _ in range(3)]
    assert losses == train(twin, opt2, x, y, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_parameter_without_grad_is_not_updated_and_counts_as_zero():
    model, x, y = problem(6)
    frozen = nn.Parameter(torch.randn(3, dtype=F64))
    ref_model = copy.deepcopy(model)
    opt = MFAC([*model.parameters(), frozen], lr=0.05, ngrads=3, damp=1e-2)
    before = frozen.detach().clone()
    train(model, opt, x, y, 5)
    assert torch.equal(frozen, before)
    # Zero gradient entries change nothing in F^{-1} g on the other coordinates.
    groups = [dict(params=list(range(4)), lr=0.05, momentum=0.0, weight_decay=0.0)]
    reference_mfac(ref_model, x, y, 5, groups, ngrads=3, damp=1e-2)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)


def test_window_dtype_and_low_precision_parameters():
    model, x, y = problem(7, torch.float32)
    opt = MFAC(model.parameters(), lr=0.05, ngrads=3, damp=1e-2, window_dtype=F64)
    ref = copy.deepcopy(model).to(F64)
    train(model, opt, x, y, 4)
    groups = [dict(params=list(range(4)), lr=0.05, momentum=0.0, weight_decay=0.0)]
    reference_mfac(ref, x.double(), y.double(), 4, groups, ngrads=3, damp=1e-2)
    assert next(iter(opt.state.values()))["window_grads"].dtype == F64
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-4, atol=1e-5)
    bf16 = nn.Linear(3, 2).to(torch.bfloat16)
    opt_bf16 = MFAC(bf16.parameters(), ngrads=2)
    bf16(torch.ones(1, 3, dtype=torch.bfloat16)).sum().backward()
    opt_bf16.step()
    assert next(iter(opt_bf16.state.values()))["window_grads"].dtype == torch.float32


def test_lightning_automatic_optimization_matches_plain_loop():
    lightning = pytest.importorskip("lightning.pytorch")
    model, x, y = problem(8)
    plain = copy.deepcopy(model)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            return loss_fn(self.net, *batch)

        def configure_optimizers(self):
            return MFAC(self.parameters(), lr=0.05, ngrads=3, damp=1e-2, momentum=0.5)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    from .._lightning import trainer

    trainer(max_steps=5).fit(Module(), loader)
    opt = MFAC(plain.parameters(), lr=0.05, ngrads=3, damp=1e-2, momentum=0.5)
    train(plain, opt, x, y, 5)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    model, x, y = problem(9)
    gpu = copy.deepcopy(model).cuda()
    kw = dict(lr=0.05, ngrads=3, damp=1e-2, momentum=0.5, weight_decay=1e-3)
    train(model, MFAC(model.parameters(), **kw), x, y, 7)
    train(gpu, MFAC(gpu.parameters(), **kw), x.cuda(), y.cuda(), 7)
    for p, q in zip(model.parameters(), gpu.parameters()):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- the optimizer contract
# (issue 18: items 8, 12, 18, 20, 23, 25; every test below fails on the code before them)

KW = dict(lr=0.03, ngrads=3, damp=1e-3, momentum=0.5, weight_decay=1e-3)


def _trained(seed=10, steps=4, **kw):
    model, x, y = problem(seed)
    opt = MFAC(model.parameters(), **{**KW, **kw})
    train(model, opt, x, y, steps)
    return model, opt, x, y


def _assert_continues_like(model, opt, x, y, ref_model, ref_opt, steps=4):
    assert train(model, opt, x, y, steps) == train(ref_model, ref_opt, x, y, steps)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def _other_checkpoint(**kw):
    model, x, y = problem(11)
    opt = MFAC(model.parameters(), **{**KW, **kw})
    train(model, opt, x, y, 2)
    return opt.state_dict()


def _wider_model_checkpoint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)
    x, y = torch.randn(16, 4, dtype=F64), torch.randn(16, 2, dtype=F64)
    opt = MFAC(model.parameters(), **KW)
    train(model, opt, x, y, 2)
    return opt.state_dict()


def _nan_window_checkpoint():
    sd = _roundtrip(_other_checkpoint())
    sd["state"][0]["window_grads"][0, 0] = float("nan")
    return sd


def _bad_index_checkpoint():
    sd = _roundtrip(_other_checkpoint())
    sd["state"][0]["window_index"] = torch.tensor(7)
    return sd


def _bad_momentum_checkpoint():
    sd = _roundtrip(_other_checkpoint())
    sd["state"][1]["momentum_buffer"] = torch.zeros(7, dtype=F64)
    return sd


@pytest.mark.parametrize(
    ("make", "text"),
    [
        (lambda: _other_checkpoint(ngrads=4), "ngrads"),
        (lambda: _other_checkpoint(damp=1e-2), "damp"),
        (_wider_model_checkpoint, "window_grads"),
        (_nan_window_checkpoint, "window_grads"),
        (_bad_index_checkpoint, "window_index"),
        (_bad_momentum_checkpoint, "momentum_buffer"),
        (lambda: {**_other_checkpoint(), "param_groups": []}, "param groups"),
    ],
)
def test_rejected_load_state_dict_raises_and_changes_nothing(make, text):
    """Issue 18 #8: validate everything, then assign; the optimizer still steps as before."""
    model, opt, x, y = _trained()
    ref_model, ref_opt = copy.deepcopy((model, opt))
    sd = make()
    with pytest.raises(ValueError, match=text):
        opt.load_state_dict(sd)
    _assert_continues_like(model, opt, x, y, ref_model, ref_opt)


def test_checkpoint_without_the_new_group_keys_loads():
    """A checkpoint whose groups lack ngrads/damp/... (saved before they were hyperparameters)
    resumes bit for bit; the groups get the live values."""
    model, opt, x, y = _trained()
    twin = copy.deepcopy(model)
    sd = _roundtrip(opt.state_dict())
    for group in sd["param_groups"]:
        for key in ("ngrads", "damp", "window_dtype", "nonfinite", "shard"):
            del group[key]
    opt2 = MFAC(twin.parameters(), **KW)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["ngrads"] == 3
    _assert_continues_like(model, opt, x, y, twin, opt2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lr=float("inf")), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(momentum=float("nan")), "momentum"),
        (dict(damp=float("nan")), "damp"),
        (dict(ngrads=True), "ngrads"),
        (dict(lr=torch.tensor([0.1])), "lr"),  # issue 18 #25: only a 0-d tensor lr
        (dict(lr=torch.ones(2, 2)), "lr"),
    ],
)
def test_nonfinite_and_tensor_hyperparameters_are_rejected(kwargs, name):
    """Issue 18 #12 and #25: inf lr/weight_decay, NaN anything, non-0-d tensor lr."""
    model, _, _ = problem()
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        MFAC(model.parameters(), **kwargs)


@pytest.mark.parametrize("bad", [dict(lr=float("nan")), dict(weight_decay=-1.0)])
def test_param_groups_are_validated_in_the_constructor_and_add_param_group(bad):
    """Issue 18 #12: a group with lr=NaN used to make the parameters NaN silently."""
    model, _, _ = problem()
    w1, b1, w2, b2 = model.parameters()
    with pytest.raises(ValueError, match="Invalid"):
        MFAC([dict(params=[w1, b1]), dict(params=[w2, b2], **bad)], ngrads=3)
    opt = MFAC([w1, b1], ngrads=3)
    with pytest.raises(ValueError, match="Invalid"):
        opt.add_param_group(dict(params=[w2, b2], **bad))
    assert len(opt.param_groups) == 1  # nothing was added


def test_a_group_value_set_directly_is_checked_at_the_step():
    model, opt, x, y = _trained()
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0]["lr"] = float("nan")
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_a_0d_tensor_lr_equals_the_float_lr():
    """Issue 18 #25: a 0-d tensor lr works as torch.optim's does (and with a scheduler)."""
    model, x, y = problem(12)
    twin = copy.deepcopy(model)
    opt = MFAC(model.parameters(), **{**KW, "lr": torch.tensor(0.03, dtype=F64)})
    opt2 = MFAC(twin.parameters(), **KW)
    _assert_continues_like(model, opt, x, y, twin, opt2)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_settings_and_continue_bit_for_bit(how):
    """Issue 18 #20: a copy used to raise AttributeError ('_window') and lose 5 settings."""
    import pickle

    model, opt, x, y = _trained(nonfinite="skip", window_dtype=F64)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    for key in ("ngrads", "damp", "window_dtype", "nonfinite", "shard"):
        assert getattr(opt2, key) == getattr(opt, key), key
    _assert_continues_like(model, opt, x, y, model2, opt2)


def test_global_hyperparameters_in_the_first_group_are_honoured():
    """Issue 18 #23: ngrads/damp given in a param group used to fall back to 1024, 1e-5."""
    model, x, y = problem(13)
    twin = copy.deepcopy(model)
    w1, b1, w2, b2 = model.parameters()
    opt = MFAC([dict(params=[w1, b1], ngrads=3, damp=1e-2), dict(params=[w2, b2])], lr=0.05)
    opt2 = MFAC(twin.parameters(), lr=0.05, ngrads=3, damp=1e-2)
    assert (opt.ngrads, opt.damp) == (3, 1e-2)
    _assert_continues_like(model, opt, x, y, twin, opt2)


@pytest.mark.parametrize("key", ["ngrads", "damp", "nonfinite", "window_dtype"])
def test_a_group_that_disagrees_on_a_global_hyperparameter_raises(key):
    model, _, _ = problem()
    w1, b1, w2, b2 = model.parameters()
    other = dict(ngrads=5, damp=0.5, nonfinite="skip", window_dtype=torch.float32)[key]
    with pytest.raises(ValueError, match=f"Invalid param group: {key} is global"):
        MFAC([dict(params=[w1, b1]), dict(params=[w2, b2], **{key: other})])


def test_add_param_group_after_the_first_step_raises_clearly():
    """Issue 18 #18: it used to fail at the next step with a raw size mismatch."""
    model, opt, x, y = _trained()
    ref_model, ref_opt = copy.deepcopy((model, opt))
    extra = nn.Parameter(torch.randn(3, dtype=F64))
    with pytest.raises(ValueError, match="before the first step"):
        opt.add_param_group(dict(params=[extra]))
    _assert_continues_like(model, opt, x, y, ref_model, ref_opt)


def test_add_param_group_before_the_first_step_equals_building_with_it():
    model, x, y = problem(14)
    twin = copy.deepcopy(model)
    w1, b1, w2, b2 = model.parameters()
    opt = MFAC([w1, b1], **KW)
    opt.add_param_group(dict(params=[w2, b2], lr=0.01))
    u1, c1, u2, c2 = twin.parameters()
    opt2 = MFAC([dict(params=[u1, c1]), dict(params=[u2, c2], lr=0.01)], **KW)
    _assert_continues_like(model, opt, x, y, twin, opt2)


def test_hyperparameters_are_in_defaults_and_in_the_state_dict():
    _, opt, _, _ = _trained(nonfinite="skip")
    keys = {"lr", "ngrads", "damp", "momentum", "weight_decay", "window_dtype", "nonfinite"}
    assert keys | {"shard"} <= opt.defaults.keys()
    group = _roundtrip(opt.state_dict())["param_groups"][0]
    assert {k: group[k] for k in keys} == {k: opt.param_groups[0][k] for k in keys}
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_duplicate_gradients_never_step_uphill(scale):
    """The same gradient 200 times, float32 window, default damp (issue 18 #6: 80 of 200
    updates went uphill). Oracle: with k copies of g in the window, F^{-1} g = g / (damp +
    k |g|^2 / m) in closed form; the update must be -lr times that, never uphill."""
    m, d, damp = 256, 1000, 1e-5
    g = torch.randn(d, generator=torch.Generator().manual_seed(0)) * scale
    p = torch.nn.Parameter(torch.zeros(d))
    opt = MFAC([p], lr=1.0, ngrads=m, damp=damp)
    gg = float(g.double() @ g.double())
    errors = []
    for k in range(1, 201):
        before = p.detach().double().clone()
        p.grad = g.clone()
        opt.step()
        step = p.detach().double() - before
        assert float(g.double() @ step) < 0, k  # downhill on every step
        want = -gg / (damp + k * gg / m)  # g^T (-F^{-1} g)
        errors.append(abs(float(g.double() @ step) - want) / abs(want))
    errors.sort()
    assert errors[189] < 1e-2  # 95 % of the steps within 1 % of the closed form
    assert opt._window.float64_passes > 0  # the regime this test is about was reached


def test_maximize_equals_minimizing_the_negated_objective():
    """torch.optim's ``maximize``: the step on f with maximize=True equals the step on -f
    (the oracle), weight decay included; bad values raise; the flag is in state_dict."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    w0 = torch.randn(4, generator=gen, dtype=torch.float64)
    runs = []
    for maximize, sign in ((True, 1.0), (False, -1.0)):
        w = torch.nn.Parameter(w0.clone())
        opt = MFAC([w], lr=0.1, ngrads=3, damp=1e-2, weight_decay=0.1, maximize=maximize)
        for _ in range(5):
            opt.zero_grad()
            (sign * -(a @ w).square().mean()).backward()  # maximize f = -mean((a w)^2)
            opt.step()
        runs.append(w.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert opt.state_dict()["param_groups"][0]["maximize"] is False
    with pytest.raises(ValueError, match="maximize"):
        MFAC([torch.nn.Parameter(torch.zeros(2))], maximize="yes")


def test_compiled_step_trains_like_the_eager_step():
    """torch.compile(opt.step) used to train for one step and then leave the parameters
    unchanged (issue 18 #16). Oracle: the same steps uncompiled, bit for bit."""
    runs = []
    for compiled in (True, False):
        torch._dynamo.reset()
        p = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 7, dtype=torch.float64))
        opt = MFAC([p], lr=0.1, ngrads=4, damp=1e-2, momentum=0.5)
        step = torch.compile(opt.step, backend="eager") if compiled else opt.step
        trajectory = []
        for _ in range(6):
            p.grad = p.detach() ** 3 - 0.5  # the gradient of sum(p^4 / 4 - p / 2)
            step()
            trajectory.append(p.detach().clone())
        runs.append(trajectory)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][-1], runs[0][-2])  # still moving at the last step
