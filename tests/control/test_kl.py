"""KL controllers against hand-computed sequences, bad input, state round trips."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

from torchsteer.control.kl import (
    AdaptiveKLController,
    FixedKLController,
    PIDKLController,
    SAFEController,
)

# ---------------------------------------------------------------- fixed


def test_fixed_is_constant_and_penalty_is_linear():
    c = FixedKLController(beta=0.25)
    for kl in (0.0, 3.0, 100.0):
        assert c.update(kl=kl) == 0.25
    kl = torch.tensor(2.0, requires_grad=True)
    p = c.penalty(kl)
    p.backward()
    assert p.item() == 0.5 and kl.grad.item() == 0.25


# ---------------------------------------------------------------- adaptive (Ziegler / TRL)


def test_adaptive_defaults_are_trl():
    c = AdaptiveKLController()
    assert (c.coef, c.target, c.horizon) == (0.2, 6.0, 10_000.0)


@pytest.mark.parametrize(
    ("kl", "err"),
    [
        (6.0, 0.0),  # at target: unchanged
        (6.6, 0.1),  # above, inside the clip
        (5.4, -0.1),  # below, inside the clip
        (60.0, 0.2),  # far above: clipped
        (0.0, -0.2),  # far below: clipped
    ],
)
def test_adaptive_one_step(kl, err):
    c = AdaptiveKLController(beta0=0.2, target=6.0, horizon=10_000)
    beta = c.update(kl=kl, n_steps=256)
    assert beta == pytest.approx(0.2 * (1 + err * 256 / 10_000), rel=1e-12)


def test_adaptive_sequence_by_hand():
    c = AdaptiveKLController(beta0=0.5, target=2.0, horizon=100)
    # kl/target - 1: 0.5 -> clip 0.2; 0.1; -0.25 -> clip -0.2
    expected, beta = [], 0.5
    for e in (0.2, 0.1, -0.2):
        beta *= 1 + e * 10 / 100
        expected.append(beta)
    got = [c.update(kl=kl, n_steps=10) for kl in (3.0, 2.2, 1.5)]
    assert got == pytest.approx(expected, rel=1e-12)


def trl_adaptive(kls, n_steps, beta0=0.2, target=6.0, horizon=10_000):
    """TRL's ``AdaptiveKLController.update(current, n_steps)``, written out (the oracle)."""
    value, out = beta0, []
    for current, n in zip(kls, n_steps):
        proportional_error = min(max(current / target - 1, -0.2), 0.2)  # np.clip
        mult = 1 + proportional_error * n / horizon
        value *= mult
        out.append(value)
    return out


def test_adaptive_is_trl_bitwise_inside_trls_valid_range():
    gen = torch.Generator().manual_seed(0)
    kls = (3 + 6 * torch.rand(200, generator=gen, dtype=torch.float64)).tolist()
    # n_steps up to horizon / (2 clip) = 25,000: the factor stays in [1/2, 2]
    ns = torch.randint(1, 25_001, (200,), generator=gen).tolist()
    c = AdaptiveKLController()
    got = [c.update(kl=k, n_steps=n) for k, n in zip(kls, ns)]
    assert got == trl_adaptive(kls, ns)  # bit for bit
    assert 1e-8 < min(got) < 0.01 and 0.5 < max(got) < 1e8  # inside beta_bounds, moving


@pytest.mark.parametrize(
    ("kl", "n_steps", "trl", "ours"),
    [
        (0.0, 60_000, -0.04, 0.1),  # TRL: 0.2 (1 - 0.2 * 6): the penalty becomes a reward
        (0.0, 50_000, 0.0, 0.1),  # TRL: exactly 0, and 0 forever after
        (60.0, 60_000, 0.44, 0.4),  # TRL's factor 2.2, ours clamped to 2
        (0.0, 20_000, 0.12, 0.12),  # factor 0.6: inside the valid range, TRL's value
    ],
)
def test_adaptive_factor_is_clamped_beyond_horizon_over_clip(kl, n_steps, trl, ours):
    assert trl_adaptive([kl], [n_steps])[0] == pytest.approx(trl, abs=1e-15)
    c = AdaptiveKLController()
    assert c.update(kl=kl, n_steps=n_steps) == pytest.approx(ours, rel=1e-15)
    # the sign flip of TRL, alternating: 0.2 -> -0.04 -> 0.008 ...; ours stays positive
    for _ in range(5):
        assert c.update(kl=0.0, n_steps=60_000) > 0


def test_adaptive_beta_stays_finite_and_positive_and_recovers():
    lo, hi = 1e-8, 1e8
    n, steps = 1280, 30_000
    trl = trl_adaptive([60.0] * steps, [n] * steps)
    assert math.isinf(trl[-1])  # TRL: sustained high KL overflows
    c = AdaptiveKLController()
    got = [c.update(kl=60.0, n_steps=n) for _ in range(steps)]
    assert got == [min(t, hi) for t in trl]  # TRL's values until the bound, then the bound
    assert got[-1] == hi
    # back below target: beta decreases from the bound at once, factor 1 - 0.2 n / horizon
    f = 1 - 0.2 * n / 10_000
    down = [c.update(kl=0.0, n_steps=n) for _ in range(10)]
    assert down == pytest.approx([hi * f**k for k in range(1, 11)], rel=1e-12)
    # sustained low KL: TRL underflows to a denormal (the penalty is gone and beta can never
    # climb back: x (1 + 0.0256) rounds to x); ours stops at the floor
    stuck = trl_adaptive([0.0] * steps + [60.0] * 100, [n] * (steps + 100))
    assert stuck[steps - 1] < 1e-320 and stuck[-1] == stuck[steps - 1]
    for _ in range(steps):
        c.update(kl=0.0, n_steps=n)
    assert c.coef == lo
    assert c.update(kl=60.0, n_steps=n) == pytest.approx(lo * (1 + 0.2 * n / 10_000), rel=1e-15)


def test_adaptive_beta_bounds_validated():
    for bounds in [(0.0, 1.0), (1.0, 0.5), (1e-3, float("inf")), (1.0,), "ab"]:
        with pytest.raises(ValueError, match="beta_bounds"):
            AdaptiveKLController(beta_bounds=bounds)
    with pytest.raises(ValueError, match="beta0"):
        AdaptiveKLController(beta0=2.0, beta_bounds=(1e-3, 1.0))


# ---------------------------------------------------------------- TRL's call convention


def test_trl_call_convention_runs_unchanged():
    import numpy as np

    def trl_style_loop(kl_ctl, kls):  # as TRL's PPOTrainer drives its controller
        coefs = []
        for mean_kl in kls:
            coefs.append(kl_ctl.value)
            kl_ctl.update(np.float64(mean_kl), np.int64(64) * 2)  # batch size x processes
        return [*coefs, kl_ctl.value]

    kls = [5.0, 7.5, 6.2, 2.0, 9.0]
    for make in (lambda: AdaptiveKLController(), lambda: FixedKLController(0.05)):
        ours, twin = make(), make()
        want = [twin.coef] + [twin.update(kl=k, n_steps=128) for k in kls]
        assert trl_style_loop(ours, kls) == want
        assert ours.state_dict() == twin.state_dict()
    assert trl_style_loop(AdaptiveKLController(), kls) == [0.2, *trl_adaptive(kls, [128] * 5)]
    pid = PIDKLController(target=6.0)
    assert pid.update(7.0, 128) == pid.value == pid.coef > 0
    with pytest.raises(ValueError, match="kl"):
        pid.update(7.0, kl=7.0)  # the KL given twice


# ---------------------------------------------------------------- PID Lagrangian


def pid_reference(kls, d, kp, ki, kd, beta0=0.0, a=0.95, delay=10):
    """Slow reference: the PID Lagrangian written out with full histories."""
    integral, p, ema, emas, out = beta0, 0.0, 0.0, [0.0], []
    for j in kls:
        integral = max(0.0, integral + ki * (j - d))
        p = a * p + (1 - a) * (j - d)
        ema = a * ema + (1 - a) * j
        earlier = emas[-delay] if len(emas) >= delay else 0.0
        deriv = max(0.0, ema - earlier)
        emas.append(ema)
        out.append(max(0.0, kp * p + integral + kd * deriv))
    return out


def test_pid_constant_input_closed_form():
    # constant J: P_n = (1 - 0.95^n)(J - d), I_n = n Ki (J - d) (J > d), D from the EMA
    c = PIDKLController(target=1.0, kp=2.0, ki=0.1, kd=0.0)
    for n in range(1, 31):
        beta = c.update(kl=1.5)
        assert beta == pytest.approx(2.0 * (1 - 0.95**n) * 0.5 + n * 0.1 * 0.5, rel=1e-12)


def test_pid_integral_is_clamped_at_zero():
    c = PIDKLController(target=1.0, kp=0.0, ki=0.1, kd=0.0, beta0=0.25)
    got = [c.update(kl=0.0) for _ in range(4)]
    assert got == pytest.approx([0.15, 0.05, 0.0, 0.0], abs=1e-12)
    assert c.integral == 0.0


def test_pid_derivative_constant_input():
    # cost EMA C_n = J (1 - 0.95^n); D_n = C_n - C_{n-10} (C_m = 0 for m <= 0)
    c = PIDKLController(target=10.0, kp=0.0, ki=0.0, kd=1.0)
    for n in range(1, 25):
        c.update(kl=2.0)
        cn = 2.0 * (1 - 0.95**n)
        earlier = 2.0 * (1 - 0.95 ** (n - 10)) if n > 10 else 0.0
        assert c.deriv == pytest.approx(cn - earlier, rel=1e-12)
        assert c.coef == pytest.approx(cn - earlier, rel=1e-12)


def test_pid_step_input_matches_reference():
    kls = [0.1] * 15 + [0.9] * 25 + [0.3] * 20
    c = PIDKLController(target=0.3, kp=1.5, ki=0.2, kd=3.0, beta0=0.05)
    got = [c.update(kl=k) for k in kls]
    want = pid_reference(kls, 0.3, 1.5, 0.2, 3.0, beta0=0.05)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    # the derivative term fires on the rising edge only, and the coefficient rises there
    assert got[15] > got[14]


def test_pid_entropy_gate():
    c = PIDKLController(target=1.0, kp=0.0, ki=0.5, kd=0.0, entropy_floor=2.0)
    assert c.update(kl=2.0, entropy=3.0) == pytest.approx(0.5)  # above the floor: g = 1
    assert c.update(kl=1.0, entropy=2.0) == pytest.approx(0.5)  # at the floor: g = 1
    assert c.update(kl=1.0, entropy=0.4) == pytest.approx(0.5 * 2.1 / 0.5)
    with pytest.raises(ValueError, match="entropy"):
        c.update(kl=1.0)  # the gate needs the entropy


# ---------------------------------------------------------------- SAFE


def safe_reference(ks, hs, rs, tau0=0.3, scale=0.1):
    """The released rule, written out step by step (floats; fresh histories)."""
    ks_, kl_, ema, integ, eprev, hist, out = 0.0, 0.0, None, 0.0, 0.0, [], []
    for k, h, r in zip(ks, hs, rs):
        ks_ = 0.9 * ks_ + 0.1 * k
        kl_ = 0.99 * kl_ + 0.01 * k
        hist.append(r)
        if len(hist) < 50:
            phi = 1.5
        else:
            recent, old = hist[-50:], (hist[-100:-50] if len(hist) >= 100 else hist[-50:])
            m = sum(recent) / 50
            if m > sum(old) / len(old) + 0.01:
                phi = 1.2
            elif statistics.pstdev(recent) < 0.02 and m > 0.7:
                phi = 1.0
            else:
                phi = 0.8
        if ema is None:
            ema, u = r, 0.0
        else:
            new = 0.95 * ema + 0.05 * r
            e = (new - ema) - 0.001
            integ = min(max(integ + e, -1.0), 1.0)
            u = 0.3 * e + 0.01 * integ + 0.05 * (e - eprev)
            eprev, ema = e, new
        tau = min(max((tau0 + u) * phi, 0.1), 0.6)
        g = max(0.5, 2.0 / (h + 0.1))
        pen = scale * g * (ks_ - tau) ** 2 if ks_ > tau else 0.0
        out.append((ks_, kl_, phi, tau, g, pen))
    return out


def test_safe_first_steps_by_hand():
    c = SAFEController()
    c.update(kl=1.0, entropy=1.9, reward=0.5)
    # KL_s = 0.1, KL_l = 0.01, warm-up phi 1.5, u = 0 -> tau = 0.45, g = 2 / 2 = 1
    assert (c.kl_short, c.kl_long) == pytest.approx((0.1, 0.01))
    assert (c.threshold, c.gate, c.u) == pytest.approx((0.45, 1.0, 0.0))
    c.update(kl=1.0, entropy=0.9, reward=1.5)
    # E' = 0.95 0.5 + 0.05 1.5 = 0.55, e = 0.05 - 0.001 = 0.049, I = 0.049
    e = 0.049
    u = 0.3 * e + 0.01 * e + 0.05 * e
    assert c.u == pytest.approx(u, rel=1e-12)
    assert c.threshold == pytest.approx(min((0.3 + u) * 1.5, 0.6), rel=1e-12)
    assert c.gate == pytest.approx(2.0, rel=1e-12)
    assert c.kl_short == pytest.approx(0.19)


def test_safe_penalty_first_fires_when_kl_short_crosses_tau():
    # constant KL 1.0 in warm-up: KL_s = 1 - 0.9^n crosses tau = 0.45 at n = 6 (0.4686)
    c = SAFEController()
    fired = []
    for n in range(1, 10):
        p = c.penalty(torch.tensor(1.0))
        ks = 1 - 0.9**n
        tau = c.threshold  # 0.45 (warm-up), less a tiny PID term: reward flat, e = -0.001
        assert tau == pytest.approx(0.45, abs=2e-3)
        want = 0.1 * c.gate * (ks - tau) ** 2 if ks > tau else 0.0
        assert p.item() == pytest.approx(want, abs=1e-7)
        fired.append(p.item() > 0)
        c.update(kl=1.0, entropy=1.9, reward=0.5)  # gate 1, reward flat: u = 0 - tiny
    assert fired.index(True) == 5  # the 6th step


def test_safe_matches_reference_over_phases():
    g = torch.Generator().manual_seed(0)
    n = 260
    ks = (0.2 + 0.6 * torch.rand(n, generator=g)).tolist()
    hs = (0.1 + 3 * torch.rand(n, generator=g)).tolist()
    # rising, then flat and high (converged), then flat and low (plateau)
    rs = [0.01 * i for i in range(80)] + [0.8] * 100 + [0.3] * 80
    ref = safe_reference(ks, hs, rs)
    c = SAFEController()
    phases = []
    for k, h, r, (ks_, kl_, phi, tau, gate, pen) in zip(ks, hs, rs, ref):
        c.update(kl=k, entropy=h, reward=r)
        assert (c.kl_short, c.kl_long) == pytest.approx((ks_, kl_), rel=1e-12)
        assert c.signals()["phase"] == phi
        assert c.threshold == pytest.approx(tau, rel=1e-9, abs=1e-12)
        assert c.gate == pytest.approx(gate, rel=1e-12)
        assert c.signals()["penalty"] == pytest.approx(pen, rel=1e-9, abs=1e-15)
        phases.append(c.phase)
    for name in ("warmup", "climbing", "converged", "plateau"):
        assert name in phases
    # 49 rewards: warm-up; 50-99: "old" is the recent window itself, so never climbing
    assert phases[48] == "warmup" and phases[49] == "plateau" and phases[99] == "climbing"


def test_safe_threshold_is_clipped():
    c = SAFEController(base_threshold=0.05)
    c.update(kl=0.0, entropy=1.0, reward=0.0)
    assert c.threshold == 0.1  # 0.05 * 1.5 clipped up
    c = SAFEController(base_threshold=1.0)
    c.update(kl=0.0, entropy=1.0, reward=0.0)
    assert c.threshold == 0.6


@pytest.mark.parametrize("differentiable", [True, False])
def test_safe_penalty_gradient(differentiable):
    c = SAFEController(differentiable=differentiable)
    for _ in range(20):
        c.update(kl=0.8, entropy=1.0, reward=0.5)
    tau, gate, ks = c.threshold, c.gate, c.kl_short
    assert ks > tau
    kl = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    p = c.penalty(kl)
    ks_new = 0.9 * ks + 0.1 * 0.8
    assert p.item() == pytest.approx(0.1 * gate * (ks_new - tau) ** 2, rel=1e-12)
    if differentiable:
        p.backward()
        # dP/dkl = 0.1 g 2 (KL_s - tau) 0.1
        assert kl.grad.item() == pytest.approx(0.02 * gate * (ks_new - tau), rel=1e-12)
        assert kl.grad.item() > 0
    else:
        assert not p.requires_grad  # the released defect: no gradient at all
    # below the threshold: zero penalty, zero gradient
    c2 = SAFEController(differentiable=differentiable)
    kl = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    p = c2.penalty(kl)
    assert p.item() == 0.0
    if differentiable:
        p.backward()
        assert kl.grad.item() == 0.0


def test_safe_penalty_does_not_change_state():
    c = SAFEController()
    c.update(kl=1.0, entropy=1.0, reward=0.3)
    before = copy.deepcopy(c.state_dict())
    c.penalty(torch.tensor(5.0))
    assert c.state_dict() == before


# ---------------------------------------------------------------- shared contract


def _controllers():
    return [
        FixedKLController(0.1),
        AdaptiveKLController(beta0=0.1, target=0.5, horizon=50),
        PIDKLController(target=0.5, kp=1.0, ki=0.1, kd=2.0, entropy_floor=1.0),
        SAFEController(),
        SAFEController(differentiable=False),
    ]


def _feed(c, n, offset=0):
    out = []
    for i in range(offset, offset + n):
        out.append(
            c.update(
                kl=0.5 + 0.4 * math.sin(i),
                entropy=1.0 + 0.5 * math.cos(i),
                reward=0.01 * i,
                n_steps=4,
            )
        )
    return out


@pytest.mark.parametrize("c", _controllers(), ids=lambda c: type(c).__name__)
def test_state_dict_round_trip_continues_exactly(c):
    _feed(c, 60)
    fresh = copy.deepcopy(_controllers()[[type(x) for x in _controllers()].index(type(c))])
    fresh.differentiable = getattr(c, "differentiable", None)
    fresh.load_state_dict(copy.deepcopy(c.state_dict()))
    assert _feed(fresh, 70, offset=60) == _feed(c, 70, offset=60)
    assert fresh.signals() == c.signals()


@pytest.mark.parametrize("c", _controllers(), ids=lambda c: type(c).__name__)
def test_load_state_dict_tolerates_missing_keys(c):
    _feed(c, 5)
    before = c.signals()
    c.load_state_dict({})
    assert c.signals() == before


@pytest.mark.parametrize("c", _controllers(), ids=lambda c: type(c).__name__)
@pytest.mark.parametrize(
    ("stats", "name"),
    [
        ({"kl": float("nan"), "entropy": 1.0, "reward": 0.0}, "kl"),
        ({"kl": torch.tensor(float("inf")), "entropy": 1.0, "reward": 0.0}, "kl"),
        ({"kl": 0.1, "entropy": -0.5, "reward": 0.0}, "entropy"),
        ({"kl": 0.1, "entropy": 1.0, "reward": float("nan")}, "reward"),
        ({"kl": torch.ones(3), "entropy": 1.0, "reward": 0.0}, "kl"),
    ],
)
def test_bad_input_raises_and_keeps_state(c, stats, name):
    _feed(c, 7)
    before = copy.deepcopy(c.state_dict())
    with pytest.raises(ValueError, match=name):
        c.update(**stats)
    assert c.state_dict() == before


@pytest.mark.parametrize("c", _controllers()[1:], ids=lambda c: type(c).__name__)
def test_missing_required_statistic_raises(c):
    before = copy.deepcopy(c.state_dict())
    with pytest.raises(ValueError, match="kl"):
        c.update(entropy=1.0, reward=0.0)
    assert c.state_dict() == before


def test_safe_needs_entropy_and_reward():
    c = SAFEController()
    with pytest.raises(ValueError, match="reward"):
        c.update(kl=0.1, entropy=1.0)
    with pytest.raises(ValueError, match="entropy"):
        c.update(kl=0.1, reward=1.0)
    with pytest.raises(ValueError, match="kl"):
        c.penalty(torch.tensor(float("nan")))


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: FixedKLController(beta=-1.0), "beta"),
        (lambda: AdaptiveKLController(target=0.0), "target"),
        (lambda: AdaptiveKLController(horizon=float("nan")), "horizon"),
        (lambda: PIDKLController(target=1.0, kp=-1.0), "kp"),
        (lambda: PIDKLController(target=1.0, ema=1.0), "ema"),
        (lambda: PIDKLController(target=1.0, delay=0), "delay"),
        (lambda: SAFEController(threshold_bounds=(0.6, 0.1)), "threshold_bounds"),
        (lambda: SAFEController(window=1), "window"),
    ],
)
def test_invalid_hyperparameters(make, name):
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        make()


def test_n_steps_validated():
    with pytest.raises(ValueError, match="n_steps"):
        AdaptiveKLController().update(kl=1.0, n_steps=0)


def _pid():
    return PIDKLController(target=0.5, kp=1.0, ki=0.1, kd=2.0, delay=10)


@pytest.mark.parametrize(
    ("make", "junk", "name"),
    [
        (_pid, {"integral": "abc"}, "integral"),
        (_pid, {"integral": float("nan")}, "integral"),
        (_pid, {"integral": -1.0}, "integral"),  # the clamp keeps I >= 0
        (_pid, {"p_ema": 0.1, "integral": None}, "integral"),  # atomic: p_ema not assigned
        (_pid, {"cost_hist": [0.1] * 11}, "cost_hist"),  # longer than delay 10
        (_pid, {"cost_hist": []}, "cost_hist"),
        (_pid, {"cost_hist": "0.1"}, "cost_hist"),
        (_pid, {"cost_hist": [0.1, float("inf")]}, "cost_hist"),
        (_pid, {"gate": 0.5}, "gate"),  # the gate is >= 1
        (_pid, {"deriv": -0.1}, "deriv"),
        (_pid, {"kl": True}, "kl"),
        (_pid, {"intergal": 0.3}, "intergal"),  # a key it does not have
        (_pid, {"beta": 0.3}, "beta"),  # another controller's state
        (AdaptiveKLController, {"beta": -0.2}, "beta"),
        (AdaptiveKLController, {"beta": float("inf")}, "beta"),
        (AdaptiveKLController, {"beta": 0.0}, "beta"),
        (AdaptiveKLController, {"error": 0.1, "beta": "0.2"}, "beta"),
        (FixedKLController, {"kl": [1.0]}, "kl"),
        (SAFEController, {"phase": "bogus"}, "phase"),
        (SAFEController, {"rewards": [0.1, float("nan")]}, "rewards"),
        (SAFEController, {"rewards": [0.1] * 101}, "rewards"),  # longer than 2 x window
        (SAFEController, {"integral": 5.0}, "integral"),  # clipped to [-1, 1]
        (SAFEController, {"reward_ema": "x"}, "reward_ema"),
        (SAFEController, {"threshold": 0.9}, "threshold"),  # outside threshold_bounds
        (SAFEController, {"gate": 0.1}, "gate"),
        (SAFEController, {"kl_short": torch.ones(2)}, "kl_short"),
    ],
)
def test_load_state_dict_rejects_junk_and_changes_nothing(make, junk, name):
    c = make()
    _feed(c, 30)
    before = copy.deepcopy(c.state_dict())
    with pytest.raises(ValueError, match=name):
        c.load_state_dict(junk)
    assert c.state_dict() == before
    assert _feed(c, 5, offset=30) == _feed(_replay(make, 30), 5, offset=30)  # still works


def _replay(make, n):
    c = make()
    _feed(c, n)
    return c


@pytest.mark.parametrize("c", _controllers(), ids=lambda c: type(c).__name__)
def test_load_state_dict_takes_tensors_and_rejects_a_non_dict(c):
    _feed(c, 60)
    state = {
        k: torch.tensor(v, dtype=torch.float64) if isinstance(v, (float, list)) else v
        for k, v in c.state_dict().items()
    }
    fresh = copy.deepcopy(_controllers()[[type(x) for x in _controllers()].index(type(c))])
    fresh.differentiable = getattr(c, "differentiable", None)
    fresh.load_state_dict(state)  # 0-d and 1-d tensors, as torch.load may give them back
    assert fresh.state_dict() == c.state_dict()
    with pytest.raises(ValueError, match="state_dict"):
        fresh.load_state_dict([("kl", 1.0)])
