"""Bad-input cases of the controllers, the functions and the CLI (every other ``__all__``).

A pure function given NaN/Inf may raise a clear error or propagate it (a non-finite
result, as torch does); a finite result from non-finite input is a defect (laundered). A
stateful object (controller, window, PSKDTargets) must leave its ``state_dict`` bit for bit
unchanged when it refuses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import torch
from _attack_common import add, defect, documented, expect_reject, held

import torchsteer.control as control
import torchsteer.control.kl as kl
import torchsteer.divergence as div
import torchsteer.jacobian as jac
import torchsteer.linalg as la
import torchsteer.objectives as obj

KIND = "bad input"
NAN, INF = float("nan"), float("inf")
G = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=G, dtype=dtype)


def _finite_result(out) -> bool:
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all()) if out.is_floating_point() else True
    if isinstance(out, tuple | list):
        return all(_finite_result(o) for o in out)
    if isinstance(out, dict):
        return all(_finite_result(o) for o in out.values())
    if hasattr(out, "__dataclass_fields__"):
        return all(_finite_result(getattr(out, f)) for f in out.__dataclass_fields__)
    if isinstance(out, float):
        return out == out and abs(out) != INF
    return True


def propagates(out):
    """Judge for non-finite input: a non-finite result is held, a finite one laundered."""
    if _finite_result(out):
        return defect("non-finite input gave a finite result (laundered)")
    return held("non-finite input propagates to the result, as torch does")


def fn(group, name, call, names=(), nonfinite=False, state=lambda: ()):
    add(
        KIND,
        group,
        name,
        lambda: expect_reject(
            call, state=state, names=names, accepted=propagates if nonfinite else None
        ),
        f"{group}: {name}",
    )


def empty(group, name, call):
    """An empty batch: a clear error, or 0 / NaN (nothing to average), never another number."""

    def judge(out):
        v = float(out)
        return (
            held(f"an empty batch gives {v}")
            if v == 0.0 or v != v
            else defect(f"an empty batch gives {v}")
        )

    add(
        KIND,
        group,
        name,
        lambda: expect_reject(call, names=("empty", "batch"), accepted=judge),
        f"{group}: {name}",
    )


def nanify(t):
    t = t.clone()
    t.reshape(-1)[0] = NAN
    return t


# ---- divergences --------------------------------------------------------------------------


def divergences():
    s, t = r(4, 7), r(4, 7)
    for kind in ("kl", "reverse_kl", "js", "tv"):
        g = f"f_divergence({kind})"
        fn(
            g,
            "shape mismatch",
            lambda k=kind: div.f_divergence(s, r(4, 6), k),
            ("shape", "vocabulary"),
        )
        fn(
            g,
            "NaN student logits",
            lambda k=kind: div.f_divergence(nanify(s), t, k),
            ("nan", "finite"),
            nonfinite=True,
        )
        fn(
            g,
            "int logits",
            lambda k=kind: div.f_divergence(s.long(), t.long(), k),
            ("dtype", "float"),
        )
        fn(
            g,
            "temperature 0",
            lambda k=kind: div.f_divergence(s, t, k, temperature=0.0),
            ("temperature",),
        )
        fn(
            g,
            "temperature nan",
            lambda k=kind: div.f_divergence(s, t, k, temperature=NAN),
            ("temperature",),
        )
        fn(
            g,
            "mask of wrong shape",
            lambda k=kind: div.f_divergence(s, t, k, mask=torch.ones(3, dtype=torch.bool)),
            ("mask",),
        )
        fn(g, "chunk_size 0", lambda k=kind: div.f_divergence(s, t, k, chunk_size=0), ("chunk",))
        empty(g, "empty batch", lambda k=kind: div.f_divergence(s[:0], t[:0], k))
    fn("f_divergence", "bogus kind", lambda: div.f_divergence(s, t, "bogus"), ("kind", "bogus"))
    fn(
        "f_divergence",
        "bogus reduction",
        lambda: div.f_divergence(s, t, reduction="bogus"),
        ("reduction",),
    )
    fn(
        "f_divergence",
        "alpha kind with alpha nan",
        lambda: div.f_divergence(s, t, "alpha", alpha=NAN),
        ("alpha",),
    )
    fn(
        "f_divergence",
        "1-d logits (no class dim)",
        lambda: div.f_divergence(s[0][:0], t[0][:0]),
        ("shape", "empty", "dim"),
    )
    fn(
        "f_divergence",
        "complex logits",
        lambda: div.f_divergence(s.to(torch.complex64), t.to(torch.complex64)),
        ("complex", "dtype"),
    )
    fn("generator", "bogus kind", lambda: div.generator("bogus"), ("bogus", "kind"))
    h, w = r(4, 5), r(7, 5)
    g = "fused_linear_divergence"
    fn(
        g,
        "head of wrong width",
        lambda: div.fused_linear_divergence(h, r(7, 6), h, w),
        ("shape", "head", "hidden"),
    )
    fn(
        g,
        "NaN hidden",
        lambda: div.fused_linear_divergence(nanify(h), w, h, w),
        ("nan", "finite"),
        nonfinite=True,
    )
    fn(
        g,
        "bias of wrong size",
        lambda: div.fused_linear_divergence(h, w, h, w, student_bias=r(3)),
        ("bias",),
    )
    fn(
        g,
        "temperature -1",
        lambda: div.fused_linear_divergence(h, w, h, w, temperature=-1.0),
        ("temperature",),
    )
    idx = torch.topk(t, 3).indices
    lp = torch.log_softmax(t, -1).gather(-1, idx)
    g = "sparse_kd"
    fn(g, "indices out of range", lambda: div.sparse_kd(s, idx + 100, lp), ("indices", "range"))
    fn(g, "indices/logprobs shape mismatch", lambda: div.sparse_kd(s, idx, lp[:, :2]), ("shape",))
    fn(g, "positive logprobs", lambda: div.sparse_kd(s, idx, lp + 5.0), ("logprob", "prob"))
    fn(
        g,
        "float indices",
        lambda: div.sparse_kd(s, idx.float(), lp),
        ("indices", "dtype", "integer"),
    )
    fn(g, "bogus tail", lambda: div.sparse_kd(s, idx, lp, tail="bogus"), ("tail",))
    nan_row = s.clone()
    nan_row[0] = NAN  # a NaN among the teacher's top-k (renormalize reads only those)
    fn(
        g,
        "NaN student row",
        lambda: div.sparse_kd(nan_row, idx, lp),
        ("nan", "finite"),
        nonfinite=True,
    )
    y = torch.randint(0, 7, (4,), generator=G)
    fn("nkd_loss", "target out of range", lambda: div.nkd_loss(s, t, y + 7), ("target", "range"))
    fn("nkd_loss", "target shape mismatch", lambda: div.nkd_loss(s, t, y[:2]), ("target", "shape"))
    fn("nkd_loss", "gamma nan", lambda: div.nkd_loss(s, t, y, gamma=NAN), ("gamma",))
    p = torch.softmax(t, -1)
    fn(
        "soft_cross_entropy",
        "shape mismatch",
        lambda: div.soft_cross_entropy(s, p[:, :3]),
        ("shape", "target_probs"),
    )
    fn(
        "soft_cross_entropy",
        "bogus reduction",
        lambda: div.soft_cross_entropy(s, p, reduction="bogus"),
        ("reduction",),
    )
    fn(
        "soft_cross_entropy",
        "NaN logits",
        lambda: div.soft_cross_entropy(nanify(s), p),
        ("nan", "finite"),
        nonfinite=True,
    )
    fn("z_loss", "a nan", lambda: div.z_loss(s, y, a=NAN, b=1.0), ("a",))
    fn(
        "z_loss",
        "target shape mismatch",
        lambda: div.z_loss(s, y[:2], a=1.0, b=1.0),
        ("target", "shape"),
    )
    fn(
        "logz_penalty",
        "bogus reduction",
        lambda: div.logz_penalty(s, reduction="bogus"),
        ("reduction",),
    )
    fn(
        "logz_penalty",
        "mask of wrong shape",
        lambda: div.logz_penalty(s, mask=torch.ones(3, dtype=torch.bool)),
        ("mask",),
    )
    fn("ps_kd_alpha", "total_epochs 0", lambda: div.ps_kd_alpha(0, 0), ("total_epochs",))
    fn("ps_kd_alpha", "epoch > total", lambda: div.ps_kd_alpha(5, 3), ("epoch",))
    fn("ps_kd_alpha", "alpha_T nan", lambda: div.ps_kd_alpha(1, 3, alpha_T=NAN), ("alpha",))
    g = "sinkhorn_divergence"
    fn(g, "epsilon 0", lambda: div.sinkhorn_divergence(s, t, epsilon=0.0), ("epsilon",))
    fn(g, "n_iters 0", lambda: div.sinkhorn_divergence(s, t, n_iters=0), ("n_iters",))
    fn(g, "cost of wrong shape", lambda: div.sinkhorn_divergence(s, t, cost=r(3, 3)), ("cost",))
    fn(g, "shape mismatch", lambda: div.sinkhorn_divergence(s, r(4, 6)), ("shape", "bins"))
    fn(g, "bogus domain", lambda: div.sinkhorn_divergence(s, t, domain="bogus"), ("domain",))
    fn(
        g,
        "NaN logits",
        lambda: div.sinkhorn_divergence(nanify(s), t),
        ("nan", "finite"),
        nonfinite=True,
    )
    targets = div.PSKDTargets(6, 7)
    st = lambda: (targets,)  # noqa: E731
    fn("PSKDTargets", "n_classes 0", lambda: div.PSKDTargets(6, 0), ("n_classes",))
    fn(
        "PSKDTargets",
        "update with index out of range",
        lambda: targets.update(torch.tensor([0, 9, 1, 2]), s),
        ("ind",),
        state=st,
    )
    fn(
        "PSKDTargets",
        "update with logits of wrong width",
        lambda: targets.update(torch.arange(4), r(4, 5)),
        ("logits", "shape"),
        state=st,
    )
    fn(
        "PSKDTargets",
        "update with NaN logits",
        lambda: targets.update(torch.arange(4), nanify(s)),
        ("nan", "finite"),
        state=st,
    )
    fn(
        "PSKDTargets",
        "load_state_dict of wrong shape",
        lambda: targets.load_state_dict({"targets": torch.zeros(3, 3)}),
        ("shape", "state"),
        state=st,
    )


# ---- objectives ---------------------------------------------------------------------------


def objectives():
    a, b, c, d = r(5), r(5), r(5), r(5)
    g = "f_dpo_loss"
    fn(g, "beta 0", lambda: obj.f_dpo_loss(a, b, c, d, beta=0.0), ("beta",))
    fn(g, "beta nan", lambda: obj.f_dpo_loss(a, b, c, d, beta=NAN), ("beta",))
    fn(g, "shape mismatch", lambda: obj.f_dpo_loss(a, b[:3], c, d, beta=0.1), ("shape",))
    fn(
        g,
        "bogus divergence",
        lambda: obj.f_dpo_loss(a, b, c, d, beta=0.1, divergence="bogus"),
        ("divergence",),
    )
    fn(
        g,
        "alpha nan",
        lambda: obj.f_dpo_loss(a, b, c, d, beta=0.1, divergence="alpha", alpha=NAN),
        ("alpha",),
    )
    fn(
        g,
        "label_smoothing 0.7",
        lambda: obj.f_dpo_loss(a, b, c, d, beta=0.1, label_smoothing=0.7),
        ("label_smoothing",),
    )
    fn(
        g,
        "NaN logps",
        lambda: obj.f_dpo_loss(nanify(a), b, c, d, beta=0.1),
        ("nan", "finite"),
        nonfinite=True,
    )
    fn(
        g,
        "bogus reduction",
        lambda: obj.f_dpo_loss(a, b, c, d, beta=0.1, reduction="bogus"),
        ("reduction",),
    )
    fn(
        "f_dpo_logits",
        "int logps",
        lambda: obj.f_dpo_logits(*(x.long() for x in (a, b, c, d))),
        ("dtype", "float"),
    )
    ref = torch.log_softmax(r(3, 6), -1)
    rew = r(3, 6)
    g = "kl_regularized_target"
    fn(g, "beta 0", lambda: obj.kl_regularized_target(ref, rew, 0.0), ("beta",))
    fn(g, "beta -1", lambda: obj.kl_regularized_target(ref, rew, -1.0), ("beta",))
    fn(g, "shape mismatch", lambda: obj.kl_regularized_target(ref, rew[:, :3], 0.1), ("shape",))
    fn(
        g,
        "NaN rewards",
        lambda: obj.kl_regularized_target(ref, nanify(rew), 0.1),
        ("nan", "finite"),
        nonfinite=True,
    )
    fn(
        "kl_regularized_value",
        "beta inf",
        lambda: obj.kl_regularized_value(ref, rew, INF),
        ("beta",),
    )
    g = "pass_rates"
    fn(g, "n_samples 0", lambda: obj.pass_rates(torch.tensor([1, 2]), 0), ("n_samples",))
    fn(g, "n_correct > n_samples", lambda: obj.pass_rates(torch.tensor([5, 2]), 4), ("n_correct",))
    fn(g, "negative n_correct", lambda: obj.pass_rates(torch.tensor([-1, 2]), 4), ("n_correct",))
    fn(
        g,
        "NaN n_correct",
        lambda: obj.pass_rates(torch.tensor([NAN, 2.0]), 4),
        ("n_correct", "nan"),
    )
    fn(
        "rehearsal_prompts",
        "n_samples 0",
        lambda: obj.rehearsal_prompts(torch.tensor([1, 2]), 0),
        ("n_samples",),
    )
    fn(
        "rehearsal_prompts",
        "float n_correct",
        lambda: obj.rehearsal_prompts(torch.tensor([0.5, 2.0]), 4),
        ("n_correct",),
    )
    adv, lengths = r(6), torch.tensor([3, 4, 5, 6, 7, 8])
    correct = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    g = "stcr_advantages"
    fn(
        g,
        "lengths shape mismatch",
        lambda: obj.stcr_advantages(adv, lengths[:3], correct),
        ("length", "shape"),
    )
    fn(g, "zero length", lambda: obj.stcr_advantages(adv, lengths * 0, correct), ("length",))
    fn(
        g,
        "NaN advantages",
        lambda: obj.stcr_advantages(nanify(adv), lengths, correct),
        ("nan", "finite", "advantages"),
        nonfinite=True,
    )
    g = "apo_kl_weight"
    fn(g, "shape mismatch", lambda: obj.apo_kl_weight(r(4).sigmoid(), r(3)), ("shape",))
    fn(
        g,
        "difficulty 2 (not in [0, 1])",
        lambda: obj.apo_kl_weight(torch.full((4,), 2.0), r(4)),
        ("difficulty",),
    )
    lp, rlp = -r(4, 5).abs(), -r(4, 5).abs()
    g = "divergence_penalty"
    fn(g, "bogus kind", lambda: obj.divergence_penalty(lp, rlp, "bogus"), ("kind",))
    fn(g, "bogus samples", lambda: obj.divergence_penalty(lp, rlp, samples="bogus"), ("samples",))
    fn(g, "shape mismatch", lambda: obj.divergence_penalty(lp, rlp[:, :2]), ("shape",))
    fn(
        g,
        "mask of wrong shape",
        lambda: obj.divergence_penalty(lp, rlp, mask=torch.ones(2, 2, dtype=torch.bool)),
        ("mask",),
    )
    fn(
        g,
        "NaN logp",
        lambda: obj.divergence_penalty(nanify(lp), rlp),
        ("nan", "finite"),
        nonfinite=True,
    )
    m1, m2 = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
    g = "soup_reference"
    fn(g, "no models", lambda: obj.soup_reference([]), ("model",))
    fn(g, "models of different shapes", lambda: obj.soup_reference([m1, m2]), ("shape", "model"))
    fn(g, "weights of wrong length", lambda: obj.soup_reference([m1, m1], [1.0]), ("weights",))
    fn(g, "negative weights", lambda: obj.soup_reference([m1, m1], [2.0, -1.0]), ("weights",))
    fn(g, "NaN weights", lambda: obj.soup_reference([m1, m1], [NAN, 1.0]), ("weights",))
    paced = obj.PACEDWeights()
    st = lambda: (paced,)  # noqa: E731
    for hp, v in (("a", -1.0), ("a", NAN), ("b", -1.0), ("normalize", "bogus"), ("a", "x")):
        fn(
            "PACEDWeights constructor",
            f"{hp}={v!r}",
            lambda hp=hp, v=v: obj.PACEDWeights(**{hp: v}),
            (hp,),
        )
    fn(
        "PACEDWeights",
        "update with pass_rate 1.5",
        lambda: paced.update(torch.tensor([0.2, 1.5])),
        ("pass_rate",),
        state=st,
    )
    fn(
        "PACEDWeights",
        "update with NaN pass_rate",
        lambda: paced.update(torch.tensor([0.2, NAN])),
        ("pass_rate", "nan"),
        state=st,
    )
    fn(
        "PACEDWeights",
        "update with nothing",
        lambda: paced.update(),
        ("pass_rate", "n_correct"),
        state=st,
    )
    add(
        KIND,
        "PACEDWeights",
        "update with empty pass_rate",
        lambda: expect_reject(
            lambda: paced.update(torch.tensor([])),
            state=st,
            names=("pass_rate", "empty"),
            accepted=lambda out: (
                held("an empty batch gets empty weights")
                if out.numel() == 0
                else defect(f"empty batch gave {out}")
            ),
        ),
    )
    fn(
        "PACEDWeights",
        "load_state_dict junk",
        lambda: paced.load_state_dict({"x": 1}),
        ("state",),
        state=st,
    )
    dak = obj.DifficultyAdaptiveKL(0.1)
    st = lambda: (dak,)  # noqa: E731
    fn(
        "DifficultyAdaptiveKL constructor",
        "base -1",
        lambda: obj.DifficultyAdaptiveKL(-1.0),
        ("base",),
    )
    fn(
        "DifficultyAdaptiveKL constructor",
        "base nan",
        lambda: obj.DifficultyAdaptiveKL(NAN),
        ("base",),
    )
    fn(
        "DifficultyAdaptiveKL",
        "weights shape mismatch",
        lambda: dak.weights(torch.tensor([0.5, 0.2]), r(3)),
        ("shape",),
        state=st,
    )
    fn(
        "DifficultyAdaptiveKL",
        "penalty with NaN kl",
        lambda: dak.penalty(torch.tensor([NAN])),
        ("kl", "nan", "finite"),
        nonfinite=True,
        state=st,
    )
    fn(
        "DifficultyAdaptiveKL",
        "load_state_dict junk",
        lambda: dak.load_state_dict({"x": 1}),
        ("state",),
        state=st,
    )


# ---- control: KL controllers, estimators, DRO ---------------------------------------------

KL_DOMAINS = {
    "FixedKLController": (lambda **k: control.FixedKLController(**k), {"beta": "nonneg"}),
    "AdaptiveKLController": (
        lambda **k: control.AdaptiveKLController(**k),
        {"beta0": "pos", "target": "pos", "horizon": "pos", "clip": "pos"},
    ),
    "PIDKLController": (
        lambda **k: control.PIDKLController(**{"target": 0.1, **k}),
        {
            "target": "pos",
            "kp": "nonneg",
            "ki": "nonneg",
            "kd": "nonneg",
            "ema": "unit",
            "d_ema": "unit",
            "delay": "nonnegint",
            "entropy_floor": "pos",
            "beta0": "nonneg",
        },
    ),
    "SAFEController": (
        lambda **k: control.SAFEController(**k),
        {
            "base_threshold": "nonneg",
            "penalty_scale": "nonneg",
            "entropy_floor": "nonneg",
            "window": "posint",
            "target_velocity": "real",
        },
    ),
}


def bad_numbers(domain):
    out = [
        ("nan", NAN),
        ("inf", INF),
        ("str", "x"),
        ("bool", True),
        ("tensor (2,)", torch.tensor([1.0, 2.0])),
    ]
    return (
        out
        + {
            "pos": [("0", 0.0), ("-1", -1.0)],
            "nonneg": [("-1", -1.0)],
            "unit": [("-0.5", -0.5), ("1.5", 1.5)],
            "real": [],
            "posint": [("0", 0), ("2.5", 2.5)],
            "nonnegint": [("-1", -1), ("2.5", 2.5)],
        }[domain]
    )


def kl_controllers():
    for name, (make, domains) in KL_DOMAINS.items():
        for hp, domain in domains.items():
            for label, v in bad_numbers(domain):
                fn(
                    f"{name} constructor",
                    f"{hp}={label}",
                    lambda make=make, hp=hp, v=v: make(**{hp: v}),
                    (hp,),
                )
        ctrl = make()
        ctrl.update(kl=0.05, entropy=1.0, reward=0.5)
        st = lambda c=ctrl: (c,)  # noqa: E731
        g = f"{name}.update"
        for label, kw in (
            ("kl NaN", {"kl": NAN}),
            ("kl inf", {"kl": INF}),
            ("kl str", {"kl": "x"}),
            ("kl tensor (3,)", {"kl": torch.ones(3)}),
            ("entropy NaN", {"kl": 0.1, "entropy": NAN}),
            ("reward inf", {"kl": 0.1, "reward": INF}),
            ("n_steps 0", {"kl": 0.1, "n_steps": 0}),
            ("n_steps -3", {"kl": 0.1, "n_steps": -3}),
            ("n_steps 2.5", {"kl": 0.1, "n_steps": 2.5}),
            ("no kl", {}),
        ):
            names = (label.split()[0],) if kw else ("kl",)
            if name == "FixedKLController" and label == "no kl":
                add(
                    KIND,
                    g,
                    label,
                    lambda c=ctrl: expect_reject(
                        lambda: c.update(entropy=1.0, reward=0.5),
                        state=lambda: (c,),
                        accepted=lambda out: (
                            held("a fixed coefficient needs no statistics")
                            if out == 0.1
                            else defect(f"beta became {out}")
                        ),
                    ),
                )
                continue
            fn(
                g,
                label,
                lambda c=ctrl, kw=kw: c.update(**{"entropy": 1.0, "reward": 0.5, **kw}),
                names,
                state=st,
            )
        fn(
            f"{name}.load_state_dict",
            "junk",
            lambda c=ctrl: c.load_state_dict({"bogus": 1}),
            ("state",),
            state=st,
        )
        sd = ctrl.state_dict()
        k0 = next(
            k for k, v in sd.items() if isinstance(v, float | int) and not isinstance(v, bool)
        )
        fn(
            f"{name}.load_state_dict",
            f"{k0}=NaN",
            lambda c=ctrl, k0=k0, sd=sd: c.load_state_dict({**sd, k0: NAN}),
            (k0,),
            state=st,
        )
        fn(
            f"{name}.load_state_dict",
            f"{k0}='x'",
            lambda c=ctrl, k0=k0, sd=sd: c.load_state_dict({**sd, k0: "x"}),
            (k0,),
            state=st,
        )
        fn(
            f"{name}.penalty",
            "NaN kl",
            lambda c=ctrl: c.penalty(torch.tensor([0.1, NAN])),
            ("kl", "nan", "finite"),
            nonfinite=True,
            state=st,
        )
    fn(
        "AdaptiveKLController constructor",
        "beta_bounds reversed",
        lambda: control.AdaptiveKLController(beta_bounds=(10.0, 1.0)),
        ("beta_bounds",),
    )
    fn(
        "SAFEController constructor",
        "threshold_bounds reversed",
        lambda: control.SAFEController(threshold_bounds=(0.6, 0.1)),
        ("threshold_bounds",),
    )
    stats = control.KLStatistics()
    st = lambda: (stats,)  # noqa: E731
    add(
        KIND,
        "KLStatistics.add",
        "kl NaN",
        lambda: expect_reject(
            lambda: control.KLStatistics().add(kl=NAN),
            accepted=lambda _: documented(
                "not validated at add: controller.update checks the reduced values, so every rank "
                "raises together (control/kl/statistics.py docstring)"
            ),
        ),
    )
    for label, kw in (
        ("kl str", {"kl": "x"}),
        ("n_steps 0", {"n_steps": 0, "kl": 0.1}),
        ("kl tensor (3,)", {"kl": torch.ones(3)}),
    ):
        fn("KLStatistics.add", label, lambda kw=kw: stats.add(**kw), (next(iter(kw)),), state=st)
    fn(
        "KLStatistics.load_state_dict",
        "junk",
        lambda: stats.load_state_dict({"x": 1}),
        ("state",),
        state=st,
    )
    lp, lq = -r(4, 6).abs(), -r(4, 6).abs()
    g = "kl_estimate"
    fn(g, "bogus kind", lambda: control.kl_estimate(lp, lq, kind="bogus"), ("kind",))
    fn(g, "shape mismatch", lambda: control.kl_estimate(lp, lq[:, :3]), ("shape",))
    fn(
        g,
        "mask of wrong shape",
        lambda: control.kl_estimate(lp, lq, mask=torch.ones(3, dtype=torch.bool)),
        ("mask",),
    )
    fn(g, "bogus reduction", lambda: control.kl_estimate(lp, lq, reduction="bogus"), ("reduction",))
    add(
        KIND,
        g,
        "all-false mask",
        lambda: expect_reject(
            lambda: control.kl_estimate(lp, lq, mask=torch.zeros(4, 6, dtype=torch.bool)),
            names=("mask",),
            accepted=lambda out: (
                documented(
                    "an empty mask gives 0 (masked_mean's docstring: positions with an "
                    "empty mask give 0)"
                )
                if float(out) == 0.0
                else defect(f"all-false mask gave {float(out)}")
            ),
        ),
    )
    fn(
        g,
        "NaN logp",
        lambda: control.kl_estimate(nanify(lp), lq),
        ("nan", "finite"),
        nonfinite=True,
    )
    fn("kl_exact", "shape mismatch", lambda: control.kl_exact(r(4, 6), r(4, 5)), ("shape",))
    fn(
        "kl_exact",
        "int logits",
        lambda: control.kl_exact(r(4, 6).long(), r(4, 6).long()),
        ("dtype", "float"),
    )
    fn(
        "masked_mean",
        "mask of wrong shape",
        lambda: kl.masked_mean(r(4), torch.ones(3, dtype=torch.bool)),
        ("mask",),
    )
    fn(
        "double_softmin",
        "alpha nan",
        lambda: control.double_softmin(r(3), r(3), alpha=NAN),
        ("alpha",),
    )
    fn("double_softmin", "shape mismatch", lambda: control.double_softmin(r(3), r(2)), ("shape",))
    fn("finite_hparam", "str", lambda: kl.finite_hparam("beta", "x"), ("beta",))
    fn("as_statistic", "NaN required", lambda: kl.as_statistic("kl", NAN, required=True), ("kl",))
    g = "kl_dro_weights"
    fn(g, "temperature 0", lambda: control.kl_dro_weights(r(5), 0.0), ("temperature",))
    fn(g, "2-d losses", lambda: control.kl_dro_weights(r(5, 2), 1.0), ("losses",))
    fn(g, "empty losses", lambda: control.kl_dro_weights(r(0), 1.0), ("losses",))
    fn(g, "NaN losses", lambda: control.kl_dro_weights(nanify(r(5)), 1.0), ("losses",))
    fn(
        "kl_dro_value",
        "int losses",
        lambda: control.kl_dro_value(torch.arange(5), 1.0),
        ("losses",),
    )
    dro_domains = {
        "temperature": "pos",
        "momentum": "unit",
        "class_step": "nonneg",
        "max_weight": "pos",
        "warmup_steps": "nonnegint",
        "max_growth": "pos",
    }
    for hp, domain in dro_domains.items():
        for label, v in bad_numbers(domain):
            if hp == "momentum" and label == "-0.5":
                continue
            fn(
                "DROWeighting constructor",
                f"{hp}={label}",
                lambda hp=hp, v=v: control.DROWeighting(**{hp: v}),
                (hp,),
            )
    fn(
        "DROWeighting constructor",
        "mode bogus",
        lambda: control.DROWeighting(mode="bogus"),
        ("mode",),
    )
    fn(
        "DROWeighting constructor",
        "class_level without num_classes",
        lambda: control.DROWeighting(class_level=True),
        ("num_classes",),
    )
    for mode in ("batch", "streaming"):
        w = control.DROWeighting(mode=mode)
        w.weights(r(6).abs())
        st = lambda w=w: (w,)  # noqa: E731
        g = f"DROWeighting({mode}).weights"
        fn(g, "NaN losses", lambda w=w: w.weights(nanify(r(6))), ("losses", "nan"), state=st)
        fn(g, "empty losses", lambda w=w: w.weights(r(0)), ("losses", "empty"), state=st)
        fn(g, "2-d losses", lambda w=w: w.weights(r(6, 2)), ("losses",), state=st)
        fn(g, "int losses", lambda w=w: w.weights(torch.arange(6)), ("losses", "dtype"), state=st)
        fn(
            f"DROWeighting({mode}).load_state_dict",
            "junk",
            lambda w=w: w.load_state_dict({"x": 1}),
            ("state",),
            state=st,
        )
        add(
            KIND,
            f"DROWeighting({mode}).load_state_dict",
            "half a state",
            lambda w=w: expect_reject(
                lambda: w.load_state_dict(dict(list(w.state_dict().items())[:1])),
                state=lambda: (w,),
                accepted=lambda _: documented(
                    "missing keys keep their current values (DROWeighting.load_state_dict "
                    "docstring)"
                ),
            ),
        )
    wc = control.DROWeighting(class_level=True, num_classes=3)
    wc.weights(r(6).abs(), torch.tensor([0, 1, 2, 0, 1, 2]))
    st = lambda: (wc,)  # noqa: E731
    g = "DROWeighting(class_level).weights"
    fn(
        g,
        "labels out of range",
        lambda: wc.weights(r(6).abs(), torch.tensor([0, 1, 5, 0, 1, 2])),
        ("labels",),
        state=st,
    )
    fn(g, "float labels", lambda: wc.weights(r(6).abs(), torch.zeros(6)), ("labels",), state=st)
    fn(
        g,
        "labels shape mismatch",
        lambda: wc.weights(r(6).abs(), torch.tensor([0, 1])),
        ("labels",),
        state=st,
    )
    fn(g, "no labels", lambda: wc.weights(r(6).abs()), ("labels",), state=st)
    fn(
        g,
        "negative labels",
        lambda: wc.weights(r(6).abs(), torch.tensor([0, -1, 2, 0, 1, 2])),
        ("labels",),
        state=st,
    )


# ---- linalg, jacobian ---------------------------------------------------------------------


def linalg_jacobian():
    A = r(6, 6, dtype=torch.float64)
    H = A @ A.T + torch.eye(6, dtype=torch.float64)
    b = r(6, dtype=torch.float64)
    g = "conjugate_gradient"
    fn(
        g,
        "b 2-d",
        lambda: la.conjugate_gradient(lambda v: H @ v, b[:, None].repeat(1, 2).T),
        ("b", "shape"),
    )
    fn(
        g,
        "NaN b",
        lambda: la.conjugate_gradient(lambda v: H @ v, nanify(b)),
        ("b", "nan", "finite"),
        nonfinite=True,
    )
    fn(g, "tol -1", lambda: la.conjugate_gradient(lambda v: H @ v, b, tol=-1.0), ("tol",))
    fn(g, "maxiter 0", lambda: la.conjugate_gradient(lambda v: H @ v, b, maxiter=0), ("maxiter",))
    fn(
        g,
        "check_every 0",
        lambda: la.conjugate_gradient(lambda v: H @ v, b, check_every=0),
        ("check_every",),
    )
    fn(
        g,
        "matvec of wrong size",
        lambda: la.conjugate_gradient(lambda v: v[:3], b),
        ("matvec", "shape"),
    )
    fn(g, "x0 of wrong size", lambda: la.conjugate_gradient(lambda v: H @ v, b, x0=b[:3]), ("x0",))
    J, R = r(8, 6, dtype=torch.float64), r(8, dtype=torch.float64)
    g = "gram_solve"
    fn(g, "rank 0", lambda: la.gram_solve(J, R, rank=0, rtol=0.0), ("rank",))
    fn(g, "rtol -1", lambda: la.gram_solve(J, R, rank=4, rtol=-1.0), ("rtol",))
    fn(g, "R of wrong length", lambda: la.gram_solve(J, R[:5], rank=4, rtol=0.0), ("R", "shape"))
    fn(
        g,
        "NaN M",
        lambda: la.gram_solve(nanify(J), R, rank=4, rtol=0.0),
        ("nan", "finite"),
        nonfinite=True,
    )
    fn(g, "damping -1", lambda: la.gram_solve(J, R, rank=4, rtol=0.0, damping=-1.0), ("damping",))
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    V = Vh.T
    g = "truncated_solve"
    fn(g, "R of wrong length", lambda: la.truncated_solve(U, S, V, R[:3]), ("R", "shape"))
    fn(g, "S of wrong length", lambda: la.truncated_solve(U, S[:2], V, R), ("S", "shape"))
    fn(g, "rtol nan", lambda: la.truncated_solve(U, S, V, R, rtol=NAN), ("rtol",))
    fn(g, "negative S", lambda: la.truncated_solve(U, -S, V, R), ("S", "singular"))
    fn(
        "truncated_pinv_apply",
        "r of wrong length",
        lambda: la.truncated_pinv_apply(U, S, V, R[:3]),
        ("r", "shape"),
    )
    g = "randomized_svd"
    fn(g, "rank 0", lambda: la.randomized_svd(J, 0), ("rank",))
    fn(g, "rank -1", lambda: la.randomized_svd(J, -1), ("rank",))
    fn(g, "oversample -1", lambda: la.randomized_svd(J, 2, oversample=-1), ("oversample",))
    fn(g, "power_iters -1", lambda: la.randomized_svd(J, 2, power_iters=-1), ("power_iters",))
    fn(g, "1-d input", lambda: la.randomized_svd(R, 2), ("shape", "matrix", "2-d"))
    fn(g, "NaN matrix", lambda: la.randomized_svd(nanify(J), 2), ("nan", "finite"), nonfinite=True)
    fn("svd_small", "1-d input", lambda: la.svd_small(R), ("shape", "matrix", "2-d"))
    fn("svd_small", "NaN input", lambda: la.svd_small(nanify(J)), ("nan", "finite"), nonfinite=True)
    params = {"w": r(3, 2), "b": r(3)}
    g = "jacobian products"
    fn_lin = lambda p: p["w"].sum(1) + p["b"]  # noqa: E731
    fn(
        g,
        "jvp with v of wrong size",
        lambda: jac.jvp(fn_lin, params, torch.ones(4)),
        ("v", "size", "shape"),
    )
    fn(
        g,
        "vjp with u of wrong size",
        lambda: jac.vjp(fn_lin, params, torch.ones(5)),
        ("u", "size", "shape"),
    )
    fn(
        g,
        "hvp with v of wrong size",
        lambda: jac.hvp(lambda p: (fn_lin(p) ** 2).sum(), params, torch.ones(2)),
        ("v", "size", "shape"),
    )
    fn(
        g,
        "hvp of a non-scalar function",
        lambda: jac.hvp(fn_lin, params, torch.ones(9)),
        ("scalar",),
    )
    fn(g, "jacobian chunk_size 0", lambda: jac.jacobian(fn_lin, params, chunk_size=0), ("chunk",))
    fn(
        "unflatten",
        "vector of wrong size",
        lambda: jac.unflatten(torch.ones(5), params),
        ("size", "numel", "length", "shape"),
    )
    fn(
        "flatten_like",
        "length mismatch",
        lambda: jac.flatten_like([torch.ones(3)], list(params.values()), torch.float32),
        ("length", "like", "number"),
    )
    fn("check_finite", "NaN", lambda: jac.check_finite("grads", torch.tensor([NAN])), ("grads",))
    model = torch.nn.Linear(4, 3)
    x, y = r(5, 4), torch.randint(0, 3, (5,), generator=G)
    ce = lambda out, t: torch.nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    g = "per_sample_jacobian"
    fn(
        g,
        "inputs/targets batch mismatch",
        lambda: jac.per_sample_jacobian(model, ce, x, y[:3]),
        ("batch", "targets", "size"),
    )
    fn(
        g,
        "bogus method",
        lambda: jac.per_sample_jacobian(model, ce, x, y, method="bogus"),
        ("method",),
    )
    fn(
        g,
        "out of wrong shape",
        lambda: jac.per_sample_jacobian(model, ce, x, y, out=torch.empty(2, 2)),
        ("out",),
    )
    fn(
        g,
        "empty batch",
        lambda: jac.per_sample_jacobian(model, ce, x[:0], y[:0]),
        ("empty", "batch"),
        nonfinite=False,
    )
    fn(
        g,
        "chunk_size 0",
        lambda: jac.per_sample_jacobian(model, ce, x, y, chunk_size=0),
        ("chunk",),
    )
    out = model(x)
    g = "graph products"
    fn(
        g,
        "graph_jvp v of wrong shape",
        lambda: jac.graph_jvp(out, list(model.parameters()), [torch.ones(2)]),
        ("shape", "v"),
    )
    fn(
        g,
        "graph_vjp u of wrong shape",
        lambda: jac.graph_vjp(out, list(model.parameters()), torch.ones(2)),
        ("shape", "u"),
    )
    fn(
        g,
        "graph_hvp v count mismatch",
        lambda: jac.graph_hvp(out.sum(), list(model.parameters()), [torch.ones(3, 4)]),
        ("v", "length", "number"),
    )
    fn(
        g,
        "graph_jacobian of a detached output",
        lambda: jac.graph_jacobian(out.detach(), list(model.parameters())),
        ("grad", "graph"),
    )
    fn(
        "JacobianOperator",
        "matmat of wrong shape",
        lambda: jac.JacobianOperator(
            (3, 4), torch.float32, torch.device("cpu"), lambda V: V, lambda U: U
        ).matmat(torch.ones(5, 2)),
        ("shape", "V"),
    )
    win = la.GradientWindow(4, 5)
    st = lambda: (win,)  # noqa: E731
    g = "GradientWindow"
    fn(g, "ngrads 0", lambda: la.GradientWindow(0, 5), ("ngrads",))
    fn(g, "dim 0", lambda: la.GradientWindow(4, 0), ("dim",))
    fn(g, "damp nan", lambda: la.GradientWindow(4, 5, damp=NAN), ("damp",))
    fn(g, "add of wrong size", lambda: win.add(torch.ones(3)), ("size", "shape", "dim"), state=st)
    fn(
        g,
        "add NaN",
        lambda: win.add(torch.tensor([NAN, 1, 1, 1, 1.0])),
        ("nan", "finite"),
        state=st,
    )
    fn(
        g,
        "solve of wrong size",
        lambda: win.solve(torch.ones(3)),
        ("size", "shape", "dim"),
        state=st,
    )
    fn(
        g,
        "load_state_dict junk",
        lambda: win.load_state_dict({"x": torch.ones(1)}),
        ("state",),
        state=st,
    )
    fn(
        "BlockedGradientWindow",
        "block_size 0",
        lambda: la.BlockedGradientWindow(4, 6, 0),
        ("block_size",),
    )


# ---- radius limiter, the CLI --------------------------------------------------------------


def radius():
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    for hp, v in (
        ("r_max", 0.0),
        ("r_max", NAN),
        ("r_max", True),
        ("r_max", "x"),
        ("temperature", "x"),
        ("temperature", -1.0),
        ("fd_eps", 0.0),
        ("mode", "bogus"),
        ("direction", "bogus"),
        ("method", "bogus"),
        ("nonfinite", "bogus"),
        ("eval_mode", "yes"),
    ):
        fn(
            "RadiusLimiter constructor",
            f"{hp}={v!r}",
            lambda hp=hp, v=v: control.RadiusLimiter(model, **{hp: v}).remove_hooks(),
            (hp,),
        )
    x = r(8, 4)
    d = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    g = "logit_derivative"
    fn(
        g,
        "inputs of wrong width",
        lambda: control.logit_derivative(model, r(8, 5), d),
        ("input", "shape"),
    )
    fn(
        g,
        "direction missing a parameter",
        lambda: control.logit_derivative(model, x, dict(list(d.items())[:2])),
        ("direction",),
    )
    fn(
        g,
        "direction of wrong shape",
        lambda: control.logit_derivative(model, x, {**d, "0.weight": torch.ones(2, 2)}),
        ("direction", "shape"),
    )
    fn(
        g,
        "bogus method",
        lambda: control.logit_derivative(model, x, d, method="bogus"),
        ("method",),
    )
    fn(
        g,
        "NaN direction",
        lambda: control.logit_derivative(model, x, {k: nanify(v) for k, v in d.items()}),
        ("nan", "finite"),
        nonfinite=True,
    )
    fn(
        "logit_spread",
        "empty inputs",
        lambda: control.logit_spread(model, x[:0], d),
        ("empty", "input", "batch"),
        nonfinite=False,
    )
    fn(
        "normalized_step",
        "temperature 0",
        lambda: control.normalized_step(model, x, d, temperature=0.0),
        ("temperature",),
    )
    fn(
        "normalized_step",
        "NaN update",
        lambda: control.normalized_step(model, x, {k: nanify(v) for k, v in d.items()}),
        ("nan", "finite"),
        nonfinite=True,
    )

    def limiter_case(inputs, names):
        def run():
            m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
            lim = control.RadiusLimiter(m, r_max=0.5)
            opt = torch.optim.Adam(m.parameters(), lr=0.1)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), torch.zeros(8, dtype=torch.long)).backward()
            v = expect_reject(
                lambda: lim.step(opt, inputs), state=lambda: (m, opt, lim), names=names
            )
            lim.remove_hooks()
            return v

        return run

    add(
        KIND,
        "RadiusLimiter.step",
        "inputs of wrong width",
        limiter_case(r(8, 5), ("input", "shape")),
    )
    add(
        KIND,
        "RadiusLimiter.step",
        "NaN inputs",
        limiter_case(nanify(x), ("nan", "finite", "input")),
    )
    add(
        KIND, "RadiusLimiter.step", "empty inputs", limiter_case(x[:0], ("empty", "input", "batch"))
    )


def cli():
    def run(args, expect_rc, must_say):
        def go():
            with tempfile.TemporaryDirectory() as tmp:
                argv = [a.replace("TMP", tmp) for a in args]
                if "FILE" in argv:
                    path = os.path.join(tmp, "afile")
                    open(path, "w").close()
                    argv = [path if a == "FILE" else a for a in argv]
                exe = os.path.join(os.path.dirname(sys.executable), "torchsteer")
                p = subprocess.run(
                    [exe, *argv],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
                err = (p.stderr.strip().splitlines() or [""])[-1]
                if p.returncode != expect_rc:
                    return defect(f"exit {p.returncode} (expected {expect_rc}): {err[:120]}")
                if "Traceback" in p.stderr:
                    return defect(f"a traceback instead of a message: {err[:120]}")
                if must_say and not any(m in p.stderr.lower() for m in must_say):
                    return defect(f"message does not say {must_say[0]!r}: {err[:120]}")
                return held(f"exit {p.returncode}: {err[:100]}")

        return go

    for label, args, rc, say in (
        ("unknown suite", ["bench", "bogus-suite", "--out", "TMP/o"], 2, ("bogus",)),
        ("--seeds 0", ["bench", "--seeds", "0"], 2, ("seeds",)),
        ("--seeds x", ["bench", "--seeds", "x"], 2, ("seeds",)),
        (
            "--suite of a missing file",
            ["bench", "--suite", "TMP/none.py", "--out", "TMP/o"],
            2,
            ("none.py", "not found", "no such"),
        ),
        (
            "--out is an existing file",
            ["bench", "convex", "--quick", "--out", "FILE"],
            2,
            ("file", "exists", "director"),
        ),
        ("bogus flag", ["bench", "--bogus"], 2, ("bogus",)),
        ("no command", [], 2, ("command", "required")),
    ):
        add(KIND, "torchsteer CLI", label, run(args, rc, say), "torchsteer " + " ".join(args))


def register() -> None:
    divergences()
    objectives()
    kl_controllers()
    linalg_jacobian()
    radius()
    cli()
    _ = documented
