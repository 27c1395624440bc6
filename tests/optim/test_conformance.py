"""Generic optimizer tests run over the registry in ``conformance.py``."""

import copy

import pytest
import torch

from .conformance import INFOS, make_closure, make_problem, per_sample_loss

IDS = [i.name for i in INFOS]


def run(info, opt, model, x, y, steps):
    for _ in range(steps):
        opt.step(make_closure(info, opt, model, x, y))


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_state_equal(a, b):
    """Exact equality of two nested state dicts (tensors compared bitwise, NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b) or bool(
            (a.isnan() & b.isnan()).sum() + (a == b).sum() == a.numel()
        )
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_state_equal(u, v)
    else:
        assert a == b or (a != a and b != b)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_lockstep_resume_from_state_dict(info):
    model, x, y = make_problem()
    opt = info.build(model)
    run(info, opt, model, x, y, 3)
    model2 = copy.deepcopy(model)
    opt2 = info.build(model2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        run(info, opt, model, x, y, 1)
        run(info, opt2, model2, x, y, 1)
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, q)
    assert_state_equal(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_two_groups_with_equal_hyperparameters_equal_one_group(info):
    model, x, y = make_problem()
    model2 = copy.deepcopy(model)
    opt = info.build(model)
    groups = [{"params": list(model2[0].parameters())}, {"params": list(model2[2].parameters())}]
    opt2 = info.build(model2, params=groups)
    run(info, opt, model, x, y, 3)
    run(info, opt2, model2, x, y, 3)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_group_learning_rate_applies_per_group(info):
    """A group with lr = 0 does not move; the other moves as in the one-group run."""
    if "lr" not in info.kwargs:
        pytest.skip("no lr hyperparameter")
    model, x, y = make_problem()
    frozen = params_of(model[0])
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.0},
        {"params": list(model[2].parameters())},
    ]
    opt = info.build(model, params=groups)
    run(info, opt, model, x, y, 2)
    for p, q in zip(model[0].parameters(), frozen):
        assert torch.equal(p, q)
    assert not all(
        torch.equal(p, q) for p, q in zip(model[2].parameters(), params_of(make_problem()[0][2]))
    )


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_float32_follows_float64(info):
    m64, x, y = make_problem(torch.float64)
    m32 = copy.deepcopy(m64).float()
    o64, o32 = info.build(m64), info.build(m32)
    run(info, o64, m64, x, y, 2)
    run(info, o32, m32, x.float(), y.float(), 2)
    for p, q in zip(m64.parameters(), m32.parameters()):
        assert q.dtype == torch.float32
        torch.testing.assert_close(q.double(), p, rtol=info.float32_rtol, atol=info.float32_rtol)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_bf16_parameters_follow_float32(info):
    if not info.bf16:
        pytest.skip("bf16 not supported")
    m32, x, y = make_problem(torch.float32)
    mbf = copy.deepcopy(m32).bfloat16()
    start = [p.detach().float() for p in mbf.parameters()]  # bf16-rounded start
    with torch.no_grad():
        for p, q in zip(m32.parameters(), start):
            p.copy_(q)
    o32, obf = info.build(m32), info.build(mbf)
    run(info, o32, m32, x, y, 1)
    run(info, obf, mbf, x.bfloat16(), y.bfloat16(), 1)
    assert all(q.dtype == torch.bfloat16 for q in mbf.parameters())
    d32 = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(m32.parameters(), start)])
    dbf = torch.cat([(q.detach().float() - s).reshape(-1) for q, s in zip(mbf.parameters(), start)])
    # the bf16 update points the same way and has about the same length as the float32 one
    cos = float(d32 @ dbf / (d32.norm() * dbf.norm()))
    assert cos > 0.95, cos
    assert 0.7 < float(dbf.norm() / d32.norm()) < 1.3


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_nonfinite_input_leaves_parameters_and_state_untouched(info):
    if not info.nonfinite:
        pytest.skip("no non-finite guarantee")
    model, x, y = make_problem()
    opt = info.build(model, nonfinite="raise")
    run(info, opt, model, x, y, 2)
    before_params = params_of(model)
    before_state = copy.deepcopy(opt.state_dict())
    bad = y.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN|Inf|non-finite"):
        opt.step(make_closure(info, opt, model, x, bad))
    for p, q in zip(model.parameters(), before_params):
        assert torch.equal(p, q)
    assert_state_equal(opt.state_dict(), before_state)
    # with nonfinite="skip" the step is skipped and nothing changes either
    opt_skip = info.build(model, nonfinite="skip")
    opt_skip.load_state_dict(copy.deepcopy(before_state))
    opt_skip.step(make_closure(info, opt_skip, model, x, bad))
    for p, q in zip(model.parameters(), before_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_invalid_hyperparameters_raise_naming_them(info):
    model, _, _ = make_problem()
    assert info.invalid, "register at least one invalid hyperparameter"
    for kwargs, text in info.invalid:
        with pytest.raises(ValueError, match=text):
            info.build(model, **kwargs)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_closure_runs_with_grad_enabled_and_step_returns_loss(info):
    model, x, y = make_problem()
    opt = info.build(model)
    expected = per_sample_loss(model, x, y).mean().detach()
    calls = []
    with torch.no_grad():
        out = opt.step(make_closure(info, opt, model, x, y, calls))
    assert calls and all(calls)
    if info.returns_loss:
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(
            torch.as_tensor(out).detach().double().mean(), expected.double(), rtol=1e-12, atol=1e-14
        )
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_identical_runs_are_bitwise_identical(info):
    runs = []
    for _ in range(2):
        model, x, y = make_problem()
        run(info, info.build(model), model, x, y, 3)
        runs.append(params_of(model))
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.cuda
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_cuda_follows_cpu(info):
    """Three float64 steps on CUDA land where the CPU's land (state on the device too)."""
    cpu_model, x, y = make_problem()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    o_cpu, o_gpu = info.build(cpu_model), info.build(gpu_model)
    run(info, o_cpu, cpu_model, x, y, 3)
    run(info, o_gpu, gpu_model, x.cuda(), y.cuda(), 3)
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters()):
        assert q.is_cuda
        torch.testing.assert_close(q.cpu(), p, rtol=1e-7, atol=1e-9)
