"""Sven on the optimizer contract (issue 15 move 4; issue 18 #8, #20, #25; issue 19).

Oracles: the float64 truncated-SVD step of ``test_sven``, exact equality with the run that
was not copied / saved / given a tensor, and exact equality of the state before and after a
rejected call.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from torchsteer.optim.sven import Sven

from .test_sven import F64, batch, flat, mlp, per_sample, residual_jacobian, truncated_step

SETTINGS = dict(
    lr=0.3,
    rank=5,
    rtol=1e-4,
    kappa=1.0,
    svd="exact",
    jacobian="dense",
    oversample=7,
    power_iters=1,
    param_fraction=0.9,
    microbatch_size=2,
    momentum=0.5,
    nonfinite="skip",
    memory_budget=2**20,
    seed=11,
    gram_dtype=F64,
    damping=1e-6,
    max_step_norm=0.8,
    maximize=False,
    foreach=False,
    differentiable=False,
)


def settings_of(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_state_dict(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key, value in a["state"][i].items():
            other = b["state"][i][key]
            assert torch.equal(value, other) and value.dtype == other.dtype


def closure(model, x, y):
    return lambda: per_sample(model(x), y)


# ---------------------------------------------------------------- defaults
def test_every_hyperparameter_is_in_defaults_and_the_state_dict_carries_it():
    model = mlp()
    opt = Sven(model.parameters(), **SETTINGS)
    assert {k: opt.defaults[k] for k in SETTINGS} == SETTINGS
    saved = opt.state_dict()["param_groups"][0]
    assert {k: saved[k] for k in SETTINGS} == SETTINGS
    fresh = Sven(mlp().parameters())
    fresh.load_state_dict(opt.state_dict())
    expected = dict(SETTINGS, nonfinite="raise")  # the policy is the live optimizer's
    assert {k: fresh.param_groups[0][k] for k in SETTINGS} == expected
    assert (fresh.rank, fresh.rtol, fresh.kappa, fresh.seed) == (5, 1e-4, 1.0, 11)
    text = repr(opt)
    for key in ("rank: 5", "rtol: 0.0001", "kappa: 1.0", "damping: 1e-06", "max_step_norm: 0.8"):
        assert key in text


def test_a_drawn_seed_is_kept_in_defaults_so_copies_draw_the_same_sketches():
    params = mlp().parameters()
    torch.manual_seed(3)
    opt = Sven(params)
    torch.manual_seed(3)
    expected = int(torch.randint(0, 2**62, (1,)).item())
    assert opt.defaults["seed"] == expected == opt.param_groups[0]["seed"]


# ---------------------------------------------------------------- #20: copies
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("functional", [False, True])
def test_copies_keep_every_setting_and_step_like_the_original(how, functional):
    # deepcopy/pickle lost 16 settings and step() raised AttributeError
    x, y = batch(8, seed=5)
    model = mlp(seed=5)
    kw = {k: v for k, v in SETTINGS.items() if k not in ("maximize", "foreach", "differentiable")}
    kw.update(nonfinite="raise", svd="randomized", jacobian="matrix_free")
    if functional:
        kw.update(model=model, loss_fn=per_sample)
    opt = Sven(model.parameters(), **kw)

    def step(o, m):
        return o.step(batch=(x, y)) if functional else o.step(closure(m, x, y))

    for _ in range(2):
        step(opt, model)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert settings_of(opt2) == settings_of(opt)
    if functional:
        assert opt2.loss_fn is per_sample
        assert {id(p) for p in opt2.model.parameters()} == {id(p) for p in opt2._params()}
    for _ in range(2):
        step(opt, model)
        step(opt2, model2)
    assert torch.equal(flat(model2), flat(model))
    assert_same_state_dict(opt2.state_dict(), opt.state_dict())


# ---------------------------------------------------------------- #25: tensor lr
def test_a_0d_tensor_lr_takes_the_float_lr_step_and_works_with_a_scheduler():
    x, y = batch(6)
    runs = []
    for lr in (0.25, torch.tensor(0.25, dtype=F64)):
        model = mlp()
        opt = Sven(model.parameters(), lr=lr, rank=4, rtol=1e-3, momentum=0.5, seed=0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            opt.step(closure(model, x, y))
            sched.step()
        runs.append(flat(model))
        assert float(opt.param_groups[0]["lr"]) == 0.25 * 0.5**3
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-15, atol=0)


@pytest.mark.parametrize("lr", [torch.tensor([0.1]), torch.ones(2, 2), torch.tensor(1)])
def test_a_tensor_lr_that_is_not_0d_real_is_rejected_at_construction(lr):
    with pytest.raises(ValueError, match="Invalid lr"):
        Sven(mlp().parameters(), lr=lr)


# ---------------------------------------------------------------- groups
@pytest.mark.parametrize(
    "group,text",
    [
        ({"lr": float("nan")}, "Invalid lr"),
        ({"lr": torch.ones(2)}, "Invalid lr"),
        ({"momentum": 1.5}, "Invalid momentum"),
        ({"rank": 3}, "rank is global"),
        ({"rtol": 0.5}, "rtol is global"),
        ({"maximize": 1}, "Invalid maximize"),
    ],
)
def test_add_param_group_validates_and_adds_nothing_when_invalid(group, text):
    a, b = mlp(seed=0), mlp(seed=1)
    opt = Sven(a.parameters(), rank=4)
    with pytest.raises(ValueError, match=text):
        opt.add_param_group({"params": list(b.parameters()), **group})
    assert len(opt.param_groups) == 1


def test_a_group_value_set_directly_is_checked_at_the_step():
    x, y = batch(6)
    model = mlp()
    opt = Sven(model.parameters(), rank=4)
    opt.param_groups[0]["lr"] = float("inf")
    before = flat(model)
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.step(closure(model, x, y))
    assert torch.equal(flat(model), before) and not opt.state


# ---------------------------------------------------------------- issue 19: torch.optim flags
@pytest.mark.parametrize("kappa", [1.0, 2.0])
def test_maximize_steps_up_by_the_same_truncated_direction(kappa):
    x, y = batch(6, seed=7)
    model = mlp(seed=7)
    R, M = residual_jacobian(model, x, y, kappa)
    d, _, _ = truncated_step(M, R, 4, 1e-3)
    t0 = flat(model)
    opt = Sven(model.parameters(), lr=0.2, rank=4, kappa=kappa, svd="exact", maximize=True)
    opt.step(closure(model, x, y))
    torch.testing.assert_close(flat(model) - t0, 0.2 * d, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("kwargs,name", [({"foreach": True}, "foreach"),
                                         ({"differentiable": True}, "differentiable")])  # fmt: skip
def test_foreach_and_differentiable_true_raise_a_clear_error(kwargs, name):
    with pytest.raises(ValueError, match=f"Invalid {name}: True; Sven applies one flat"):
        Sven(mlp().parameters(), **kwargs)


# ---------------------------------------------------------------- #8: atomic load_state_dict
def trained(seed=0, widths=(3, 6, 2), steps=2):
    x, y = batch(6, seed=seed, d_in=widths[0], d_out=widths[-1])
    model = mlp(seed=seed, widths=widths)
    opt = Sven(model.parameters(), lr=0.3, rank=4, momentum=0.5, seed=seed)
    for _ in range(steps):
        opt.step(closure(model, x, y))
    return model, opt, x, y


def corrupt_generator(sd):
    sd["state"][0]["generator_state"] = sd["state"][0]["generator_state"][:100]


def corrupt_key(sd):
    sd["state"][1]["exp_avg"] = torch.zeros(3)


def corrupt_lr(sd):
    sd["param_groups"][0]["lr"] = -1.0


def corrupt_dtype(sd):
    sd["state"][1]["momentum_buffer"] = sd["state"][1]["momentum_buffer"].long()


def corrupt_step(sd):
    sd["state"][0]["step"] = torch.tensor(-3.0)


@pytest.mark.parametrize(
    "corrupt,text",
    [
        (corrupt_generator, "generator_state"),
        (corrupt_key, "unknown Sven state"),
        (corrupt_lr, "Invalid lr"),
        (corrupt_dtype, "momentum_buffer"),
        (corrupt_step, "step"),
    ],
)
def test_a_rejected_state_dict_raises_at_load_and_changes_nothing(corrupt, text):
    model, opt, x, y = trained()
    before, params = snapshot(opt), flat(model)
    bad = snapshot(opt)
    corrupt(bad)
    with pytest.raises(ValueError, match=text):
        opt.load_state_dict(bad)
    assert_same_state_dict(opt.state_dict(), before)
    # and it still steps as it would have
    clone_model, clone, _, _ = trained()
    opt.step(closure(model, x, y))
    clone.step(closure(clone_model, x, y))
    assert torch.equal(flat(model), flat(clone_model)) and not torch.equal(flat(model), params)


def test_the_state_of_a_differently_shaped_model_is_rejected_at_load_not_at_the_step():
    # it was accepted, and the next step failed
    other = trained(widths=(3, 5, 2))[1]
    model, opt, x, y = trained()
    before = snapshot(opt)
    with pytest.raises(ValueError, match="momentum_buffer"):
        opt.load_state_dict(other.state_dict())
    assert_same_state_dict(opt.state_dict(), before)
    opt.step(closure(model, x, y))


def test_a_state_dict_of_the_old_format_loads_and_continues_bit_for_bit():
    # groups that carry only lr and momentum (before the contract): the live settings fill in
    model, opt, x, y = trained()
    old = snapshot(opt)
    old["param_groups"] = [
        {"lr": g["lr"], "momentum": g["momentum"], "params": g["params"]}
        for g in old["param_groups"]
    ]
    model2 = copy.deepcopy(model)
    opt2 = Sven(model2.parameters(), lr=0.3, rank=4, momentum=0.5, seed=123)
    opt2.load_state_dict(old)
    assert settings_of(opt2) == [dict(settings_of(opt)[0], seed=123)]
    for _ in range(2):
        opt.step(closure(model, x, y))
        opt2.step(closure(model2, x, y))
    assert torch.equal(flat(model2), flat(model))


# ---------------------------------------------------------------- PyTorch's generic checks
def test_a_non_tensor_step_and_records_load_and_continue_bit_for_bit():
    # torch.optim's test_load_nontensor_step: the counters as Python numbers (was refused)
    model, opt, x, y = trained()
    sd = snapshot(opt)
    for key in ("step", "skipped_steps", "kept_rank", "sigma_max"):
        sd["state"][0][key] = sd["state"][0][key].item()
    model2 = copy.deepcopy(model)
    opt2 = Sven(model2.parameters(), lr=0.3, rank=4, momentum=0.5, seed=0)
    opt2.load_state_dict(sd)
    assert isinstance(opt2.state[next(model2.parameters())]["step"], torch.Tensor)
    for _ in range(2):
        opt.step(closure(model, x, y))
        opt2.step(closure(model2, x, y))
    assert torch.equal(flat(model2), flat(model))
    assert int(opt2.state[next(model2.parameters())]["step"]) == 4


@pytest.mark.parametrize("functional", [False, True])
def test_step_hooks_run_around_every_path_and_gradients_are_never_written(functional):
    # torch.optim's register_step_pre_hook / post_hook and test_grads_are_never_inplaced_into
    x, y = batch(6)
    model = mlp()
    kw = dict(model=model, loss_fn=per_sample) if functional else {}
    opt = Sven(model.parameters(), rank=4, seed=0, **kw)
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", flat(model))))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", flat(model))))
    t0 = flat(model)
    if functional:
        opt.step(batch=(x, y))
    else:
        opt.step(lambda: per_sample(model(x), y))
    assert [c[0] for c in calls] == ["pre", "post"]
    assert torch.equal(calls[0][1], t0) and torch.equal(calls[1][1], flat(model))
    assert not torch.equal(flat(model), t0)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert p.grad is g and bool((g == 7.0).all())
