"""The distill suite: its losses against float64 oracles, its splits, its metrics, a tiny run."""

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.special import log_softmax, rel_entr, softmax

from torchsteer.bench.registry import Context, get_suite
from torchsteer.bench.suites import distill
from torchsteer.bench.suites.distill import ARMS, Config, student_loss

CONFIG = distill.QUICK
F_ARMS = [a for a in ARMS if a.family == "f"]
BY_NAME = {a.name: a for a in ARMS}


def _logits(seed, n=6, c=10, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=g, dtype=torch.float64)


def _soft(z, t):
    return softmax(z.numpy() / t, axis=1)


def test_labels_only_loss_is_the_cross_entropy():
    z, y = _logits(0), torch.tensor([0, 3, 9, 1, 1, 5])
    loss = student_loss(BY_NAME["labels only"], z, None, y, CONFIG)
    oracle = -log_softmax(z.numpy(), axis=1)[np.arange(6), y.numpy()].mean()
    assert float(loss) == pytest.approx(oracle, rel=1e-12)


def _oracle_divergence(arm, zs, zt, t):
    """T^2 D(p || q) / f''(1), batch mean, from SciPy / the formula in float64."""
    p, q = _soft(zt, t), _soft(zs, t)
    if arm.kind == "kl":
        d, curv = rel_entr(p, q).sum(1), 1.0
    elif arm.kind == "reverse_kl":
        d, curv = rel_entr(q, p).sum(1), 1.0
    elif arm.kind == "js":
        d, curv = np.array([jensenshannon(a, b) ** 2 for a, b in zip(p, q)]), 0.25
    else:  # normalized generalized JS, TRL's mixture M = (1 - beta) q + beta p
        beta = dict(arm.kind_args)["beta"]
        m = (1 - beta) * q + beta * p
        d = (beta * rel_entr(p, m).sum(1) + (1 - beta) * rel_entr(q, m).sum(1)) / (
            beta * (1 - beta)
        )
        curv = 1.0
    return t * t * d.mean() / curv


@pytest.mark.parametrize("arm", F_ARMS, ids=lambda a: a.name)
def test_divergence_term_matches_scipy_and_the_formula(arm):
    zs, zt = _logits(1), _logits(2)
    got = distill.distillation_loss(arm, zs, zt, CONFIG)
    want = _oracle_divergence(arm, zs, zt, CONFIG.temperature)
    assert float(got) == pytest.approx(want, rel=1e-10)
    y = torch.tensor([1, 2, 3, 4, 5, 6])
    ce = -log_softmax(zs.numpy(), axis=1)[np.arange(6), y.numpy()].mean()
    mixed = student_loss(arm, zs, zt, y, CONFIG)
    assert float(mixed) == pytest.approx(0.1 * ce + 0.9 * want, rel=1e-10)


@pytest.mark.parametrize("arm", F_ARMS, ids=lambda a: a.name)
def test_curvature_is_the_second_order_term_at_the_teacher(arm):
    # D(p || q) = f''(1) / 2 chi^2(p, q) + O(eps^3) for q = p + eps; the suite divides by f''(1)
    zt = _logits(3, n=1)
    zs = zt + 1e-3 * _logits(4, n=1, scale=1.0)
    p, q = _soft(zt, 1.0)[0], _soft(zs, 1.0)[0]
    chi2 = ((p - q) ** 2 / q).sum()
    d = distill.distillation_loss(arm, zs, zt, dataclasses.replace(CONFIG, temperature=1.0))
    assert float(d) == pytest.approx(chi2 / 2, rel=1e-2)
    assert distill.curvature(arm) == pytest.approx(
        {"kl": 1.0, "reverse_kl": 1.0, "js": 0.25, "generalized_js": 1.0}[arm.kind], rel=1e-12
    )


def test_scaled_js_equals_normalized_generalized_js_at_one_half():
    zs, zt = _logits(5), _logits(6)
    gjs = distill.Arm("GJS 0.5", "f", "generalized_js", (("beta", 0.5), ("normalized", True)))
    a = distill.distillation_loss(BY_NAME["JS"], zs, zt, CONFIG)
    b = distill.distillation_loss(gjs, zs, zt, CONFIG)
    assert float(a) == pytest.approx(float(b), rel=1e-12)


@pytest.mark.parametrize("arm", F_ARMS, ids=lambda a: a.name)
def test_a_student_equal_to_the_teacher_has_zero_distillation_loss_and_gradient(arm):
    zt = _logits(7)
    zs = zt.clone().requires_grad_(True)
    d = distill.distillation_loss(arm, zs, zt, CONFIG)
    (g,) = torch.autograd.grad(d, zs)
    assert abs(float(d.detach())) < 1e-13
    assert float(g.abs().max()) < 1e-13
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    ce = F.cross_entropy(zt, y)
    assert float(student_loss(arm, zt, zt, y, CONFIG)) == pytest.approx(0.1 * float(ce), 1e-12)


def test_a_student_off_the_teacher_has_a_positive_distillation_loss():
    zt, zs = _logits(8), _logits(9)
    for arm in F_ARMS:
        assert float(distill.distillation_loss(arm, zs, zt, CONFIG)) > 1e-3


def test_nkd_arm_is_the_cross_entropy_plus_the_normalized_kd_formula():
    zs, zt, y = _logits(10), _logits(11), torch.tensor([2, 0, 9, 9, 4, 7])
    s, t, yy = zs.numpy(), zt.numpy(), y.numpy()
    rows = np.arange(6)
    ce = -log_softmax(s, axis=1)[rows, yy]
    p_y = softmax(t, axis=1)[rows, yy]
    nkd = -p_y * log_softmax(s, axis=1)[rows, yy]
    for i in rows:  # non-target parts, renormalized over the classes i != y
        keep = np.arange(10) != yy[i]
        p_hat, log_q_hat = softmax(t[i, keep]), log_softmax(s[i, keep])
        nkd[i] -= 1.5 * (p_hat * log_q_hat).sum()
    got = student_loss(BY_NAME["NKD"], zs, zt, y, CONFIG)
    assert float(got) == pytest.approx((ce + nkd).mean(), rel=1e-12)


def test_pskd_arm_is_the_soft_cross_entropy_of_its_targets():
    zs, y = _logits(12), torch.tensor([3, 3, 1, 0, 8, 2])
    prev = torch.softmax(_logits(13), 1)
    targets = 0.6 * F.one_hot(y, 10).double() + 0.4 * prev
    got = student_loss(BY_NAME["PS-KD (self)"], zs, None, y, CONFIG, targets)
    want = -(targets.numpy() * log_softmax(zs.numpy(), axis=1)).sum(1).mean()
    assert float(got) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="pskd_targets"):
        student_loss(BY_NAME["PS-KD (self)"], zs, None, y, CONFIG)
    with pytest.raises(ValueError, match="teacher_logits"):
        student_loss(BY_NAME["forward KL"], zs, None, y, CONFIG)


def test_seeds_give_deterministic_stratified_splits_that_test_every_digit_once():
    x_all, y_all, _, _ = distill.data.digits(test_fraction=0.0)
    total = torch.bincount(y_all, minlength=10)
    tested = Counter()
    for seed in range(5):
        xtr, ytr, xte, yte = distill.load_split(seed)
        again = distill.load_split(seed)
        assert all(torch.equal(a, b) for a, b in zip((xtr, ytr, xte, yte), again))
        assert Counter(_rows(xtr, ytr)) + Counter(_rows(xte, yte)) == Counter(_rows(x_all, y_all))
        counts = torch.bincount(yte, minlength=10)
        assert bool(((counts - total / 5).abs() <= 1).all())  # stratified
        tested += Counter(_rows(xte, yte))
    assert tested == Counter(_rows(x_all, y_all))  # the five test folds partition the digits
    assert all(torch.equal(a, b) for a, b in zip(distill.load_split(5), distill.load_split(0)))


def _rows(x, y):
    return [(*a, b) for a, b in zip(x.tolist(), y.tolist())]


def test_metrics_against_direct_computation():
    zs, zt = _logits(14, n=40), _logits(15, n=40)
    y = torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(0))
    m = distill.metrics(zs, zt, y)
    p, q = softmax(zt.numpy(), axis=1), softmax(zs.numpy(), axis=1)
    assert m["kl_to_teacher"] == pytest.approx(rel_entr(p, q).sum(1).mean(), rel=1e-10)
    ce = -np.log(q[np.arange(40), y.numpy()]).mean()
    ce_t = -np.log(p[np.arange(40), y.numpy()]).mean()
    assert m["test_ce"] == pytest.approx(ce, rel=1e-10)
    assert m["ce_gap"] == pytest.approx(ce - ce_t, rel=1e-9)
    assert m["agreement"] == np.mean(q.argmax(1) == p.argmax(1))
    assert m["test_acc"] == np.mean(q.argmax(1) == y.numpy())
    # ECE by a loop over the samples: bin b = (b/15, (b+1)/15]
    conf, right = q.max(1), q.argmax(1) == y.numpy()
    ece = 0.0
    for b in range(15):
        sel = [i for i in range(40) if b / 15 < conf[i] <= (b + 1) / 15]
        if sel:
            ece += len(sel) / 40 * abs(right[sel].mean() - conf[sel].mean())
    assert m["ece"] == pytest.approx(ece, rel=1e-10)
    same = distill.metrics(zt, zt, y)
    assert same["ce_gap"] == 0.0 and same["agreement"] == 1.0
    assert abs(same["kl_to_teacher"]) < 1e-14


TINY = Config(teacher_epochs=3, student_epochs=2, evals=2)


@pytest.fixture(scope="module")
def tiny():
    ticks = []
    runs = distill.run(Context(quick=False, seeds=[1], advance=lambda: ticks.append(1)), TINY)
    return runs, len(ticks)


def test_tiny_run_pairs_the_arms_and_shares_one_teacher(tiny):
    runs, ticks = tiny
    assert [r.method for r in runs] == ["teacher"] + [a.name for a in ARMS]
    assert ticks == len(runs) == get_suite("distill").units(False, [1])
    teacher, students = runs[0], runs[1:]
    assert teacher.final_metric > 0.8  # 3 epochs of Adam reach this on digits (chance 0.1)
    for r in students:
        assert r.seed == 1
        assert r.metric[0] == students[0].metric[0]  # one initialization for every arm
        assert r.loss[0] == students[0].loss[0]
        assert r.extra["teacher_test_acc"] == teacher.final_metric  # one teacher for all
        assert r.extra["test_acc"] == r.final_metric
        assert r.extra["train_ce"] == r.final_loss
    assert len({round(r.final_loss, 9) for r in students}) == len(students)  # the arms differ


def test_a_run_repeats_bitwise_whichever_arms_run_beside_it(tiny):
    arms = [BY_NAME["NKD"], BY_NAME["forward KL"]]
    again = {r.method: r for r in distill.run(Context(quick=False, seeds=[1]), TINY, arms)}
    for r in tiny[0]:
        if r.method in again:
            x = again[r.method]
            assert (x.steps, x.loss, x.metric, x.extra) == (r.steps, r.loss, r.metric, r.extra)


def test_pskd_in_its_first_epoch_is_labels_only():
    # in epoch 0 no sample has a previous prediction: PS-KD's targets are the one-hot labels,
    # so one epoch trains the same student as labels only (up to the two CE's rounding)
    one = dataclasses.replace(TINY, student_epochs=1, evals=1)
    arms = [BY_NAME["labels only"], BY_NAME["PS-KD (self)"]]
    labels, pskd = distill.run(Context(quick=False, seeds=[0]), one, arms)[1:]
    assert pskd.final_loss == pytest.approx(labels.final_loss, rel=1e-5)
    two = dataclasses.replace(TINY, student_epochs=2, evals=1)
    labels, pskd = distill.run(Context(quick=False, seeds=[0]), two, arms)[1:]
    assert not math.isclose(pskd.final_loss, labels.final_loss, rel_tol=1e-4)


def test_quick_runs_only_the_first_seed():
    suite = get_suite("distill")
    assert suite.units(True, [0, 1, 2]) == len(ARMS) + 1
    assert suite.units(False, [0, 1, 2]) == 3 * (len(ARMS) + 1)
    assert suite.baseline == ARMS[0].name


def test_sparse_arm_is_the_kl_between_the_softened_top_k_teacher_and_student():
    zs, zt = _logits(16), _logits(17)
    arm, t = BY_NAME["sparse top-3 KL"], CONFIG.temperature
    p = softmax(zt.numpy(), axis=1)
    want = []
    for i in range(6):
        top = np.argsort(-p[i])[:3]
        pt = p[i, top] ** (1 / t) / (p[i, top] ** (1 / t)).sum()  # probability-domain T
        qt = softmax(zs.numpy()[i, top] / t)
        want.append(rel_entr(pt, qt).sum())
    got = distill.distillation_loss(arm, zs, zt, CONFIG)
    assert float(got) == pytest.approx(t * t * np.mean(want), rel=1e-10)
    # with the whole vocabulary as the support it is the forward KL arm
    full = dataclasses.replace(arm, top_k=10)
    forward = distill.distillation_loss(BY_NAME["forward KL"], zs, zt, CONFIG)
    assert float(distill.distillation_loss(full, zs, zt, CONFIG)) == pytest.approx(
        float(forward), rel=1e-10
    )


def _entropic_ot(w, eps, iters=3000):
    """OT_eps(mu, nu) with uniform 1/B marginals over the cost w (numpy, float64): plain
    log-domain Sinkhorn from zero potentials, then the dual value <a, f> + <b, g>."""
    b = w.shape[0]
    la = np.full(b, -np.log(b))
    f, g = np.zeros(b), np.zeros(b)
    for _ in range(iters):
        f = -eps * np.logaddexp.reduce(la[None, :] + (g[None, :] - w) / eps, axis=1)
        g = -eps * np.logaddexp.reduce(la[:, None] + (f[:, None] - w) / eps, axis=0)
    return (f.mean() + g.mean()) - eps * (
        np.exp(la[:, None] + la[None, :] + (f[:, None] + g[None, :] - w) / eps).sum() - 1.0
    )


def test_sinkd_arm_is_the_batchwise_sinkhorn_divergence_with_uniform_marginals():
    zs, zt, y = _logits(18, n=8), _logits(19, n=8), torch.tensor([0, 3, 9, 1, 1, 5, 2, 7])
    arm, cfg = BY_NAME["SinKD"], CONFIG
    q, p = _soft(zs, cfg.sinkd_temperature), _soft(zt, cfg.sinkd_temperature)

    def l1(x, z):
        return np.abs(x[:, None, :] - z[None, :, :]).sum(-1)

    eps = cfg.sinkd_epsilon
    s = _entropic_ot(l1(q, p), eps) - 0.5 * _entropic_ot(l1(q, q), eps)
    s -= 0.5 * _entropic_ot(l1(p, p), eps)
    got = distill.distillation_loss(arm, zs, zt, cfg)
    assert float(got) == pytest.approx(s, rel=1e-6)
    assert s > 0.01  # a student off the teacher: a loss well above the solver's tolerance
    ce = -log_softmax(zs.numpy(), axis=1)[np.arange(8), y.numpy()].mean()
    total = student_loss(arm, zs, zt, y, cfg)
    assert float(total) == pytest.approx((1 - cfg.alpha) * ce + cfg.alpha * s, rel=1e-6)
    # the release's loss (no 1/B marginals) is about B times larger: not what the arm uses
    released = distill.sinkhorn_divergence(
        zs, zt, epsilon=eps, temperature=cfg.sinkd_temperature, batchwise=True, released=True
    )
    assert float(released) > 4 * float(got)


def test_sinkd_arm_gradient_matches_finite_differences():
    zs, zt = _logits(20, n=5), _logits(21, n=5)
    arm = BY_NAME["SinKD"]
    x = zs.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(distill.distillation_loss(arm, x, zt, CONFIG), x)
    d = torch.randn(zs.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = 1e-5

    def val(z):
        return float(distill.distillation_loss(arm, z, zt, CONFIG))

    fd = (val(zs + h * d) - val(zs - h * d)) / (2 * h)
    assert float((g * d).sum()) == pytest.approx(fd, rel=1e-4)
