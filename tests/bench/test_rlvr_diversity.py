"""The rlvr-diversity and rlvr-paced toys: pass@k, the reward, determinism, and that the
reported numbers are the formulas' (float64 references computed here independently)."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from torchsteer.bench.registry import Context, get_suite
from torchsteer.bench.suites import rlvr_diversity as rd
from torchsteer.bench.suites import rlvr_paced as rp

TINY = dataclasses.replace(rd.QUICK, steps=12, eval_every=4, betas=(0.3,), n_eval=64)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_estimator_equals_enumeration_of_k_subsets(n):
    for c in range(n + 1):
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            hit = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            closed = 1.0 - math.comb(n - c, k) / math.comb(n, k)
            est = float(rd.pass_at_k(n, c, k))
            assert est == pytest.approx(hit, abs=1e-12)
            assert est == pytest.approx(closed, abs=1e-12)


def test_pass_at_k_estimator_is_unbiased_for_the_exact_pass_at_k():
    # E_{c ~ Bin(n, p)} [1 - C(n - c, k) / C(n, k)] = 1 - (1 - p)^k, summed exactly over c
    n = 40
    c = torch.arange(n + 1)
    for p in (0.0, 0.013, 0.2, 0.77, 1.0):
        pmf = [math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(n + 1)]
        pmf = torch.tensor(pmf, dtype=torch.float64)
        for k in (1, 8, 32, 40):
            expect = float((pmf * rd.pass_at_k(n, c, k)).sum())
            assert expect == pytest.approx(1 - (1 - p) ** k, abs=1e-12)
            assert float(
                rd.pass_at_k_exact(torch.tensor(p, dtype=torch.float64), k)
            ) == pytest.approx(1 - (1 - p) ** k, abs=1e-14)


def test_pass_at_k_exact_matches_enumerating_bernoulli_outcomes():
    p, k = 0.3, 6
    hit = sum(
        math.prod(p if b else 1 - p for b in bits)
        for bits in itertools.product([0, 1], repeat=k)
        if any(bits)
    )
    got = float(rd.pass_at_k_exact(torch.tensor(p, dtype=torch.float64), k))
    assert got == pytest.approx(hit, abs=1e-14)


def test_pass_at_k_rejects_bad_counts():
    for n, c, k in ((4, 5, 1), (4, -1, 1), (3, 1, 4), (3, 1, 0)):
        with pytest.raises(ValueError, match="Invalid n / c / k"):
            rd.pass_at_k(n, c, k)


def test_the_correct_answers_are_the_residue_class_of_each_prompt():
    cfg = rd.FULL
    task = rd.make_task(3, cfg)
    for i in range(cfg.prompts):
        s = int(task.residue[i])
        answers = torch.arange(cfg.answers)
        r = rd.reward(task, torch.full_like(answers, i), answers)
        got = {int(a) for a in answers[r == 1]}
        assert got == set(range(s, cfg.answers, cfg.modulus))
        assert len(got) == cfg.answers // cfg.modulus == 4
        assert got == {int(a) for a in torch.nonzero(task.correct[i]).flatten()}
    assert set(r.unique().tolist()) <= {0.0, 1.0}


def test_reference_and_policy_at_start_are_the_same_and_difficulty_is_spread():
    cfg = rd.FULL
    task = rd.make_task(0, cfg)
    policy = rd.Policy(task, cfg, 0)
    assert torch.equal(policy().detach(), task.ref)  # W_2 = c_2 = 0
    p = torch.where(task.correct, torch.softmax(task.ref.double(), -1), 0).sum(-1)
    assert p.min() < 0.01 and p.max() > 0.99  # from nearly never to nearly always solved


def _numpy_metrics(task, logits):
    z = logits.double().numpy()
    ref = task.ref.double().numpy()
    pi = np.exp(z - z.max(1, keepdims=True))
    pi /= pi.sum(1, keepdims=True)
    q = np.exp(ref - ref.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    ok = task.correct.numpy()
    p = (pi * ok).sum(1)
    out = {f"pass@{k}": float(np.mean(1 - (1 - p) ** k)) for k in rd.KS}
    out["distinct@256"] = float(np.mean((ok * (1 - (1 - pi) ** 256)).sum(1)))
    out["kl"] = float(np.mean((pi * (np.log(pi) - np.log(q))).sum(1)))
    out["kl_forward"] = float(np.mean((q * (np.log(q) - np.log(pi))).sum(1)))
    return out


def test_evaluate_is_the_formulas_on_a_random_policy():
    task = rd.make_task(1, rd.FULL)
    logits = task.ref + torch.randn(task.ref.shape, generator=torch.Generator().manual_seed(0))
    got = rd.evaluate(task, logits)
    for key, v in _numpy_metrics(task, logits).items():
        assert got[key] == pytest.approx(v, rel=1e-10, abs=1e-12), key


@pytest.mark.parametrize("arm", ["no penalty", "forward KL beta=0.3", "DPH-RL beta=0.3"])
def test_a_quick_run_reports_the_formulas_of_its_trained_policy(arm):
    run, policy = rd.fit(arm, 0, TINY)
    task = policy.task
    expect = _numpy_metrics(task, policy().detach())
    for key, v in expect.items():
        assert run.extra[key] == pytest.approx(v, rel=1e-9, abs=1e-12), key
    assert run.metric[-1] == run.extra["pass@1"] and run.loss[-1] == run.extra["kl"]
    ref = _numpy_metrics(task, task.ref)
    assert run.metric[0] == pytest.approx(ref["pass@1"], rel=1e-9) and run.loss[0] == 0.0
    assert run.steps == list(range(0, TINY.steps + 1, TINY.eval_every))
    # the sampled unbiased estimate agrees with the exact value within sampling error
    for key, est in run.extra["estimated"].items():
        assert abs(est - run.extra[key]) < 0.05, key
    if arm.startswith("DPH"):
        ys, pef = rd._rehearsal(task, TINY, 0)
        pids = torch.arange(TINY.prompts)[:, None].expand_as(ys)
        assert torch.equal(pef, (rd.reward(task, pids, ys) == 1).all(1))
        assert run.extra["dph_pef"] == int(pef.sum()) > 0


def test_training_is_deterministic_by_seed():
    a = rd.train_arm("JS beta=0.3", 2, TINY)
    b = rd.train_arm("JS beta=0.3", 2, TINY)
    c = rd.train_arm("JS beta=0.3", 3, TINY)
    assert a.metric == b.metric and a.loss == b.loss and a.extra["curves"] == b.extra["curves"]
    assert a.metric[1:] != c.metric[1:]


def test_a_pid_arm_with_zero_gains_is_the_fixed_coefficient_arm():
    fixed = dataclasses.replace(TINY, pid_gains=(0.0, 0.0, 0.0), pid_beta0=0.25)
    for kind, beta in (("forward KL", 0.25), ("JS", 1.0)):  # JS's PID coefficient is x 4
        pid = rd.train_arm(f"PID {kind}", 1, fixed)
        ref = rd.train_arm(f"{kind} beta={beta:g}", 1, fixed)
        assert pid.metric == ref.metric and pid.loss == ref.loss
        assert pid.extra["curves"]["coef"] == [0.25] * len(pid.steps)


def test_penalties_pull_toward_the_reference():
    none = rd.train_arm("no penalty", 0, TINY)
    strong = rd.train_arm("reverse KL beta=10", 0, dataclasses.replace(TINY, betas=(10.0,)))
    assert strong.extra["kl"] < 0.5 * none.extra["kl"]


def test_suite_units_and_names():
    suite = get_suite("rlvr-diversity")
    assert suite.units(True, [0, 1]) == 2 * len(rd.arms(rd.QUICK))
    names = rd.arms(rd.FULL)
    assert len(set(names)) == len(names) == 1 + 4 * len(rd.FULL.betas) + 3
    runs = rd.run(Context(quick=True, seeds=[5]), TINY, names=["no penalty"])
    assert [(r.method, r.seed, r.suite) for r in runs] == [("no penalty", 5, "rlvr-diversity")]


def test_paced_with_flat_kernel_is_uniform_bit_for_bit():
    cfg = dataclasses.replace(rp.QUICK, steps=10, paced=((0.0, 0.0), (1.0, 1.0)))
    uniform = rp.train_arm("uniform", 0, cfg)
    flat = rp.train_arm("PACED a=0,b=0", 0, cfg)
    paced = rp.train_arm("PACED a=1,b=1", 0, cfg)
    assert flat.extra["reward_curve"] == uniform.extra["reward_curve"]
    assert flat.metric == uniform.metric
    assert paced.metric[1:] != uniform.metric[1:]
    curve = uniform.extra["reward_curve"]
    assert uniform.extra["reward_avg"] == pytest.approx(sum(curve) / len(curve), abs=1e-5)
    assert uniform.extra["pass@1"] == uniform.metric[-1] and uniform.steps == [0, 10]
    assert get_suite("rlvr-paced").units(True, [0]) == len(rp.arms(rp.QUICK))


def test_apo_weights_are_at_most_one_and_reduce_the_kl_pull():
    cfg = dataclasses.replace(rp.QUICK, steps=10, beta=3.0)
    apo = rp.train_arm("APO beta=3", 0, cfg)
    kl = rp.train_arm("reverse KL beta=3", 0, cfg)
    assert 0.0 < apo.extra["apo_mean_weight"] < 1.0
    assert apo.extra["kl"] > kl.extra["kl"]  # down-weighted KL: the policy moves further
