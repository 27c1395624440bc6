"""PyTorch's own generic optimizer checks (``test/test_optim.py`` with its ``OptimizerInfo``s),
re-expressed over the registry of ``conformance.py``: step hooks, no-op steps, grads never
written into, older and non-tensor state dicts, tensor learning rates, deep copies, return
types. Each test runs on torch.optim.SGD and Adam too, so it is proven on optimizers known to
be right. What does not apply to closure-driven optimizers is listed in docs/optimizer_contract.md
and skipped here with the same reason."""

import copy

import pytest
import torch

from .conformance import INFOS, make_closure, make_problem

IDS = [i.name for i in INFOS]
BACKWARD = [i for i in INFOS if i.closure_kind == "backward"]


def step(info, opt, model, x, y):
    return opt.step(make_closure(info, opt, model, x, y))


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_step_pre_and_post_hooks_run_once_per_step_around_it(info):
    model, x, y = make_problem()
    opt = info.build(model)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o)))
    step(info, opt, model, x, y)
    assert seen == [("pre", opt), ("post", opt)]
    pre.remove()
    post.remove()
    step(info, opt, model, x, y)
    assert len(seen) == 2


@pytest.mark.parametrize("info", BACKWARD, ids=[i.name for i in BACKWARD])
def test_step_is_noop_when_params_have_no_grad(info):
    model, _, _ = make_problem()
    opt = info.build(model)
    before = params_of(model)
    opt.step()  # no closure, every grad None
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("info", BACKWARD, ids=[i.name for i in BACKWARD])
def test_step_is_noop_for_zero_grads(info):
    model, _, _ = make_problem()
    kwargs = {k: v for k, v in info.kwargs.items() if k != "weight_decay"}
    opt = info.cls(model.parameters(), **kwargs)
    before = params_of(model)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


@pytest.mark.parametrize("info", BACKWARD, ids=[i.name for i in BACKWARD])
def test_grads_are_never_written_into(info):
    model, x, y = make_problem()
    opt = info.build(model)
    for _ in range(2):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum(1).mean()).backward()
        grads = [(p.grad.clone(), p.grad._version) for p in model.parameters()]
        opt.step()
        for p, (g, version) in zip(model.parameters(), grads):
            assert p.grad._version == version and torch.equal(p.grad, g)


def _global_state(opt):
    """The state dict's state entries (where counters live)."""
    return opt.state_dict()["state"]


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_load_nontensor_step_continues_identically(info):
    """A state dict whose ``step`` counters are Python numbers (an older save) loads and the
    run continues as from the tensor counters."""
    ref_model, x, y = make_problem()
    ref = info.build(ref_model)
    for _ in range(2):
        step(info, ref, ref_model, x, y)
    saved = copy.deepcopy(ref.state_dict())
    for entry in saved["state"].values():
        for key in ("step", "skipped_steps"):
            if isinstance(entry.get(key), torch.Tensor) and entry[key].numel() == 1:
                entry[key] = entry[key].item()
    model = copy.deepcopy(ref_model)
    opt = info.build(model)
    opt.load_state_dict(saved)
    step(info, ref, ref_model, x, y)
    step(info, opt, model, x, y)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_can_load_a_state_dict_without_newer_group_keys(info):
    """An older save lacks the group keys added since (here: ``maximize``, ``foreach``,
    ``differentiable``, ``capturable``, ``fused`` where present); loading fills them from the
    defaults and the run continues."""
    model, x, y = make_problem()
    opt = info.build(model)
    step(info, opt, model, x, y)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        for key in ("maximize", "foreach", "differentiable", "capturable", "fused"):
            group.pop(key, None)
    fresh_model = copy.deepcopy(model)
    fresh = info.build(fresh_model)
    fresh.load_state_dict(saved)
    for key in ("maximize", "foreach", "differentiable", "capturable", "fused"):
        if key in opt.defaults:
            assert key in fresh.param_groups[0]
    step(info, opt, model, x, y)
    step(info, fresh, fresh_model, x, y)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_zero_dim_tensor_lr_equals_float_lr(info):
    if "lr" not in info.kwargs:
        pytest.skip("no lr in this configuration")
    runs = []
    for lr in (info.kwargs["lr"], torch.tensor(info.kwargs["lr"], dtype=torch.float64)):
        model, x, y = make_problem()
        opt = info.build(model, lr=lr)
        for _ in range(2):
            step(info, opt, model, x, y)
        runs.append(params_of(model))
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_deepcopy_keeps_every_public_attribute_and_steps_alike(info):
    model, x, y = make_problem()
    opt = info.build(model)
    step(info, opt, model, x, y)
    twin_model = copy.deepcopy(model)
    both = copy.deepcopy((model, opt))
    twin_model, twin = both
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(twin) if not k.startswith("_")}
    assert twin.defaults == opt.defaults
    step(info, opt, model, x, y)
    step(info, twin, twin_model, x, y)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("info", [i for i in INFOS if i.returns_loss], ids=lambda i: i.name)
def test_step_returns_the_same_type_every_step(info):
    model, x, y = make_problem()
    opt = info.build(model)
    kinds = {type(step(info, opt, model, x, y)) for _ in range(3)}
    assert len(kinds) == 1 and kinds <= {torch.Tensor, float}
