"""Sven's dense step without host synchronization (issue 17), against recorded oracles.

Oracles: the trajectories of the code before the sync-free step (06f44c7, recorded in
``_sven_sync_oracle.py`` by the ``trajectory`` below), the host-side
:func:`~torchsteer.optim._sven_step.power_of_two_scale` for its device twin, and the eager
step body for the compiled one. Syncs are counted by ``tests/_sync.py`` (what a GPU would see).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests._sync import SyncCounter
from torchsteer.optim import Sven, _sven_device
from torchsteer.optim._sven_device import masked_solve, masked_update, scale_to_unit
from torchsteer.optim._sven_step import SolveConfig, power_of_two_scale, solve_dense
from torchsteer.optim.sven import SKIP_WARNING

from ._sven_scaled_oracle import SCALED
from ._sven_sync_oracle import ORACLE


@pytest.fixture(autouse=True)
def _device_reads(monkeypatch):
    """These tests count the host reads of a device: the CPU's read-as-it-goes step
    (``_sven_device.FREE_READS``) is off, so that they run the device path on the CPU."""
    monkeypatch.setattr(_sven_device, "FREE_READS", ())


CONFIGS = {
    "functional-f64-momentum": dict(dtype=torch.float64, functional=True, momentum=0.5),
    "closure-f64": dict(dtype=torch.float64, functional=False),
    "functional-f32": dict(dtype=torch.float32, functional=True),
    "closure-f32-momentum-cap": dict(
        dtype=torch.float32, functional=False, momentum=0.5, max_step_norm=0.05
    ),
}


def ce(o, t):
    return F.cross_entropy(o, t, reduction="none")


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(
        dtype
    )


def build(model, functional, **kwargs):
    extra = dict(model=model, loss_fn=ce) if functional else {}
    kwargs = dict(dict(lr=0.3, rank=12, rtol=0.05, jacobian="dense", svd="exact"), **kwargs)
    return Sven(model.parameters(), seed=0, **kwargs, **extra)


def step(opt, model, x, y, functional):
    if functional:
        return opt.step(batch=(x, y))
    return opt.step(lambda: ce(model(x), y))


def batches(dtype, n=20, nan_at=10):
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        x = torch.randn(16, 4, generator=g).to(dtype)
        y = torch.randint(0, 3, (16,), generator=g)
        if i == nan_at:
            x = x.clone()
            x[3, 1] = float("nan")
        yield x, y


def trajectory(dtype, functional, nonfinite="skip", **kwargs):
    """20 steps on a fixed seed, a NaN input at step 10 (skipped); how the oracle was made."""
    model = mlp(dtype)
    opt = build(model, functional, nonfinite=nonfinite, **kwargs)
    losses, ranks = [], []
    for x, y in batches(dtype):
        losses.append(float(step(opt, model, x, y, functional)))
        ranks.append(float(opt.state[next(model.parameters())]["kept_rank"]))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    st = opt.state[next(model.parameters())]
    return dict(
        losses=losses,
        kept_rank=ranks,
        params=[float(v) for v in params.double()],
        skipped=float(st["skipped_steps"]),
        step=float(st["step"]),
        sigma_max=float(st["sigma_max"]),
    )


# ---------------------------------------------------------------- results unchanged
@pytest.mark.parametrize("name", list(CONFIGS))
def test_twenty_steps_match_the_code_before_within_rounding(name):
    cfg = dict(CONFIGS[name])
    got, want = trajectory(**cfg), ORACLE[name]
    tol = (
        dict(rtol=1e-12, atol=1e-14)
        if cfg["dtype"] == torch.float64
        else dict(rtol=1e-5, atol=1e-6)
    )
    for key in ("losses", "params"):
        torch.testing.assert_close(
            torch.tensor(got[key]), torch.tensor(want[key]), equal_nan=True, **tol
        )
    assert got["kept_rank"] == want["kept_rank"]
    assert (got["skipped"], got["step"]) == (want["skipped"], want["step"]) == (1.0, 19.0)
    assert got["sigma_max"] == pytest.approx(want["sigma_max"], rel=tol["rtol"])


@pytest.mark.parametrize("name", ["closure-f64", "functional-f32"])
def test_raise_takes_the_same_steps_as_skip_until_the_bad_one(name):
    cfg = dict(CONFIGS[name])
    model = mlp(cfg["dtype"])
    opt = build(model, cfg["functional"], nonfinite="raise")
    for i, (x, y) in enumerate(batches(cfg["dtype"], n=11)):
        if i == 10:
            before = [p.detach().clone() for p in model.parameters()]
            with pytest.raises(ValueError, match="contains NaN or Inf"):
                step(opt, model, x, y, cfg["functional"])
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        else:
            step(opt, model, x, y, cfg["functional"])
    params = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    model2 = mlp(cfg["dtype"])
    opt2 = build(model2, cfg["functional"], nonfinite="skip")
    for x, y in batches(cfg["dtype"], n=11):
        step(opt2, model2, x, y, cfg["functional"])
    params2 = torch.cat([p.detach().reshape(-1).double() for p in model2.parameters()])
    assert torch.equal(params, params2)


# ---------------------------------------------------------------- host synchronizations
def counted(opt, model, functional, x, y, n_before=2):
    for _ in range(n_before):
        step(opt, model, x, y, functional)
    with SyncCounter() as c:
        step(opt, model, x, y, functional)
    return c


@pytest.mark.parametrize("functional", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_a_steady_state_step_with_skip_makes_no_host_synchronization(functional, momentum):
    x, y = next(batches(torch.float32, nan_at=-1))
    model = mlp(torch.float32)
    opt = build(model, functional, nonfinite="skip", momentum=momentum)
    c = counted(opt, model, functional, x, y)
    assert c.total == 0, dict(c.counts)


@pytest.mark.parametrize("functional", [True, False])
def test_a_steady_state_step_with_raise_reads_the_verdict_once(functional):
    x, y = next(batches(torch.float32, nan_at=-1))
    model = mlp(torch.float32)
    opt = build(model, functional, nonfinite="raise")
    c = counted(opt, model, functional, x, y)
    assert c.total == 1 and c.counts["tolist"] == 1, dict(c.counts)


def test_the_first_step_and_kappa_one_read_once():
    x, y = next(batches(torch.float32, nan_at=-1))
    model = mlp(torch.float32)
    opt = build(model, True, nonfinite="skip")
    with SyncCounter() as c:
        opt.step(batch=(x, y))  # no records yet: the step's verdict is read
    assert c.total == 1
    opt_k = build(mlp(torch.float32), True, nonfinite="skip", kappa=1.0)
    c = counted(opt_k, opt_k.model, True, x, y)  # negative losses are a ValueError: read once
    assert c.total == 1


def test_skip_reads_the_run_of_skips_once_every_skip_warning_steps():
    x, y = next(batches(torch.float32, nan_at=-1))
    model = mlp(torch.float32)
    opt = build(model, True, nonfinite="skip")
    opt.step(batch=(x, y))  # the first step: its verdict is read
    per_step = []
    for _ in range(3 * SKIP_WARNING):
        with SyncCounter() as c:
            opt.step(batch=(x, y))
        per_step.append(c.total)
    # the earliest step at which a run of SKIP_WARNING skips could be complete is read
    assert per_step == ([0] * (SKIP_WARNING - 1) + [1]) * 3


# ---------------------------------------------------------------- a masked skip
@pytest.mark.parametrize("functional", [True, False])
@pytest.mark.parametrize("bad", ["nan-input", "inf-loss"])
def test_a_masked_skip_leaves_parameters_and_state_bit_for_bit(functional, bad):
    x, y = next(batches(torch.float32, nan_at=-1))
    model = mlp(torch.float32)
    opt = build(model, functional, nonfinite="skip", momentum=0.5, max_step_norm=0.1)
    for _ in range(3):
        step(opt, model, x, y, functional)
    params = [p.detach().clone() for p in model.parameters()]
    first = next(model.parameters())
    state = {k: v.clone() for k, v in opt.state[first].items()}
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    xb = x.clone()
    if bad == "nan-input":
        xb[0, 0] = float("nan")
        closure = None
    else:
        closure = lambda: ce(model(x), y) * torch.tensor([math.inf] + [1.0] * 15)  # noqa: E731
    with SyncCounter() as c:
        if closure is not None and not functional:
            opt.step(closure)
        else:
            step(opt, model, xb if closure is None else x * math.inf, y, functional)
    assert c.total == 0
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    live = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(bufs, live))
    for key, value in state.items():
        want = value + 1 if key == "skipped_steps" else value
        assert torch.equal(opt.state[first][key].cpu(), want.cpu()), key
    # the next good step is the one the skipped step would have been
    step(opt, model, x, y, functional)
    model2 = mlp(torch.float32)
    opt2 = build(model2, functional, nonfinite="skip", momentum=0.5, max_step_norm=0.1)
    for _ in range(4):
        step(opt2, model2, x, y, functional)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_masked_skips_warn_at_the_fifth_in_a_row_as_before():
    x, y = next(batches(torch.float32, nan_at=-1))
    xb = x.clone()
    xb[0, 0] = float("nan")
    model = mlp(torch.float32)
    opt = build(model, True, nonfinite="skip")
    for _ in range(3):
        opt.step(batch=(x, y))
    for run in (SKIP_WARNING, SKIP_WARNING + 4):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i in range(run):
                opt.step(batch=(xb, y))
                ours = [w for w in caught if "skipped" in str(w.message)]
                assert len(ours) == (1 if i >= SKIP_WARNING - 1 else 0), i
        assert "per-sample losses" in str(ours[0].message) and ours[0].filename == __file__
        opt.step(batch=(x, y))  # a good step ends the run
    skipped = opt.state[next(model.parameters())]["skipped_steps"]
    assert float(skipped) == 2 * SKIP_WARNING + 4


# ---------------------------------------------------------------- the device pieces
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("band", [0, 16])
def test_scale_to_unit_is_the_host_power_of_two_scale_on_the_device(dtype, band):
    tiny = torch.finfo(dtype).tiny
    values = [0.0, tiny, tiny / 8, 1e-30, 2.0**-17, 2.0**-16, 0.3, 0.5, 1.0, 3.0, 2.0**16]
    values += [2.0**16 * 1.5, 1e30, torch.finfo(dtype).max, 7.123e-5, 6.5e12]
    for v in values:
        amax = torch.tensor(v, dtype=dtype)
        want = power_of_two_scale(float(amax), dtype, band=band)
        got = scale_to_unit(amax, band=band)
        assert got.dtype == dtype and float(got) == want, v
    for v in (math.nan, math.inf):
        assert float(scale_to_unit(torch.tensor(v, dtype=dtype), band=band)) == 1.0


def body(M, losses, theta, buf, lr):
    """The sync-free step body: solve + masked update, given the Jacobian rows."""
    config = SolveConfig(rank=6, rtol=1e-3)
    sol, flags = masked_solve(M, losses, 2.0, config, solve_dense, None)
    ok = flags[0].bool() & flags[2].bool() & flags[3].bool()
    new_theta, new_buf = masked_update(theta, buf, sol.direction, ok, -lr, 0.9)
    return new_theta, new_buf, sol.kept_rank, sol.sigma_max, ok


@pytest.mark.parametrize("nan", [False, True])
def test_the_step_body_compiles_with_fullgraph_and_matches_eager(nan):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(10, 30, generator=g, dtype=torch.float64)
    losses = torch.rand(10, generator=g, dtype=torch.float64)
    if nan:
        losses[2] = math.nan
    theta = torch.randn(30, generator=g, dtype=torch.float64)
    buf = torch.randn(30, generator=g, dtype=torch.float64)
    compiled = torch.compile(body, fullgraph=True, backend="inductor")
    want = body(M.clone(), losses, theta, buf, 0.1)
    got = compiled(M.clone(), losses, theta, buf, 0.1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if nan:
        assert not bool(want[-1]) and torch.equal(want[0], theta) and torch.equal(want[1], buf)
    else:  # against the float64 closed form d = M^+ R (rank 6 of 10 kept: the top 6)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        d = Vh[:6].mT @ ((U[:, :6].mT @ losses) / S[:6])
        torch.testing.assert_close(want[1], 0.9 * buf + d, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(want[0], theta - 0.1 * (0.9 * buf + d), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
def test_a_run_resumed_after_masked_steps_continues_bit_for_bit(how):
    data = list(batches(torch.float32, n=8, nan_at=2))
    model = mlp(torch.float32)
    opt = build(model, True, nonfinite="skip", momentum=0.5)
    for x, y in data:
        opt.step(batch=(x, y))
    model2 = mlp(torch.float32)
    opt2 = build(model2, True, nonfinite="skip", momentum=0.5)
    for x, y in data[:5]:
        opt2.step(batch=(x, y))
    if how == "state_dict":
        model3 = copy.deepcopy(model2)
        opt3 = build(model3, True, nonfinite="skip", momentum=0.5)
        opt3.load_state_dict(opt2.state_dict())
    else:
        model3, opt3 = copy.deepcopy((model2, opt2))
    for x, y in data[5:]:
        opt3.step(batch=(x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model3.parameters()))
    first, first3 = next(model.parameters()), next(model3.parameters())
    for key in ("step", "skipped_steps", "kept_rank", "sigma_max"):
        assert float(opt.state[first][key]) == float(opt3.state[first3][key]), key
    assert float(opt3.state[first3]["skipped_steps"]) == 1.0


# ---------------------------------------------------------------- "raise": the former fast path
def scaled_trajectory(c, functional, nonfinite, n=12, **kwargs):
    """12 float32 steps on the losses times ``c`` (how ``_sven_scaled_oracle`` was made)."""
    model = mlp(torch.float32)
    loss = lambda o, t: c * ce(o, t)  # noqa: E731
    extra = dict(model=model, loss_fn=loss) if functional else {}
    kwargs = dict(dict(lr=0.3, rank=12, rtol=0.05, jacobian="dense", svd="exact"), **kwargs)
    opt = Sven(model.parameters(), seed=0, nonfinite=nonfinite, **kwargs, **extra)
    g = torch.Generator().manual_seed(1)
    losses, sigmas = [], []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g).float()
        y = torch.randint(0, 3, (16,), generator=g)
        if functional:
            out = opt.step(batch=(x, y))
        else:
            out = opt.step(lambda x=x, y=y: loss(model(x), y))
        losses.append(float(out))
        sigmas.append(float(opt.state[next(model.parameters())]["sigma_max"]))
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return dict(losses=losses, sigma_max=sigmas, params=[float(v) for v in params.double()])


@pytest.mark.parametrize("key", list(SCALED))
def test_raise_at_loss_scales_1e_minus20_and_1e20_is_the_code_before_bit_for_bit(key):
    # float32: the unscaled Gram over/underflows, so every step rescales M and solves again
    functional = key.startswith("functional")
    scale = 1e-20 if "1e-20" in key else 1e20
    momentum = float(key.rsplit("-m", 1)[1])
    got = scaled_trajectory(scale, functional, "raise", momentum=momentum)
    assert got == SCALED[key]  # every float equal
    skip = scaled_trajectory(scale, functional, "skip", momentum=momentum)  # the device path
    for field in ("losses", "sigma_max", "params"):
        torch.testing.assert_close(
            torch.tensor(skip[field]), torch.tensor(SCALED[key][field]), rtol=1e-5, atol=0.0
        )


@pytest.mark.parametrize("functional", [True, False])
def test_raise_solves_m_unscaled_and_rescales_only_when_that_fails(functional, monkeypatch):
    # the device path (max |M|, M scaled) is for "skip" only: "raise" must not call it
    import torchsteer.optim._sven_device as sven_device

    def refuse(*args, **kwargs):
        raise AssertionError("masked_solve called with nonfinite='raise'")

    monkeypatch.setattr(sven_device, "masked_solve", refuse)
    x, y = next(batches(torch.float32, nan_at=-1))
    reads = {}
    for c in (1.0, 1e20, 1e-20):
        model = mlp(torch.float32)
        loss = lambda o, t, c=c: c * ce(o, t)  # noqa: E731
        extra = dict(model=model, loss_fn=loss) if functional else {}
        opt = Sven(
            model.parameters(), lr=0.3, rank=12, rtol=0.05, jacobian="dense", svd="exact",
            nonfinite="raise", seed=0, **extra,
        )  # fmt: skip

        def run(opt=opt, model=model, loss=loss):
            if functional:
                return opt.step(batch=(x, y))
            return opt.step(lambda: loss(model(x), y))

        run()
        with SyncCounter() as counter:
            run()
        reads[c] = dict(counter.counts)
    # scale 1: one transfer (verdict, S_max, s_R); out of band: + max |M| + the rescaled
    # step's finiteness, as at 06f44c7; at 1e20 the Gram overflows and eigh fails, and
    # gram_solve reads whether M was finite (as at 06f44c7)
    assert reads[1.0] == {"tolist": 1}
    assert reads[1e-20] == {"tolist": 1, "__float__": 1, "__bool__": 1}
    assert reads[1e20] == {"tolist": 1, "__float__": 1, "__bool__": 2}


def test_an_unread_run_of_masked_skips_travels_with_the_read_once_verdict():
    # 3 masked skips (run unread), then momentum is switched on: no buffers yet, so the
    # next steps read once (the run with the verdict); the warning still comes at the 5th
    x, y = next(batches(torch.float32, nan_at=-1))
    xb = x.clone()
    xb[0, 0] = float("nan")
    model = mlp(torch.float32)
    opt = build(model, True, nonfinite="skip")
    for _ in range(2):
        opt.step(batch=(x, y))
    caught_at = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            if i == 3:
                opt.param_groups[0]["momentum"] = 0.5
            with SyncCounter() as c:
                opt.step(batch=(xb, y))
            caught_at += [i] * len([w for w in caught if "skipped" in str(w.message)])
            caught.clear()
            # read-once: one transfer (the run with it: no read of its own), and the check
            # of gram_solve whose eigh failed on the NaN Gram matrix (as at 06f44c7)
            want = {} if i < 3 else {"tolist": 1, "__bool__": 1}
            assert dict(c.counts) == want, i
    assert caught_at == [SKIP_WARNING - 1]
    assert float(opt.state[next(model.parameters())]["skipped_steps"]) == 6
