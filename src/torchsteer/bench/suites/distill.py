"""Knowledge distillation on scikit-learn's digits: which divergence teaches a small student best.

Setup. Split ``cv5`` (as the ``dro`` suite's): seed ``s`` tests on fold ``s mod 5`` of a
stratified 5-fold partition of all 1797 digits and trains on the other four, so five seeds test
every digit once. Per seed a **teacher**, MLP 64-256-256-10 (ReLU, 85,002 parameters), is
trained on the training part with cross-entropy (Adam, lr 1e-3, batches of 64); its logits
``z_t`` on the training rows are computed once (eval mode) and frozen. A **student**, MLP
64-4-10 (310 parameters, 274x smaller), is then trained by every arm from the same
initialization, on the same batch order (Adam, lr 3e-3, batches of 64), with the loss of its arm.
The width 4 was chosen on labels-only accuracy, for a capacity gap: a first quick run at width
16 had the labels-only student at the teacher's accuracy (96.7 % against 97.0 % on fold 0; the
distilled arms 95.6-96.4 %), leaving nothing to distill; on a validation carve (25 %) of seed
0's training part, labels-only students of width 2 / 3 / 4 / 6 / 8 then reached
34 / 81 / 91 / 92 / 97 % against the teacher's 98 %.

Arms (``q = softmax(z_s / T)``, ``p = softmax(z_t / T)``, ``CE`` the label cross-entropy of
the student at temperature 1, ``a = 0.9``, ``T = 4``, Hinton et al.'s KD mixture)::

    labels only      L = CE
    divergence D     L = (1 - a) CE + a T^2 D(p || q) / f''(1)
    NKD              L = CE + NKD(z_s, z_t, y; gamma = 1.5, T = 1)          (Yang et al. 2023)
    PS-KD            L = -sum_i [(1 - alpha_t) onehot(y) + alpha_t q_{t-1}]_i log q_i
                     alpha_t = 0.8 (t + 1) / epochs, q_{t-1} the student's own prediction
                     of the sample in the previous epoch (Kim et al. 2021; no teacher)

with ``D`` one of :func:`~torchsteer.divergence.f_divergence`'s kinds: ``kl`` (forward KL,
KL(p||q), mass-covering), ``reverse_kl`` (KL(q||p), mode-seeking), ``js`` and
``generalized_js`` with ``normalized=True`` at beta 0.1 and 0.9 (GKD; beta -> 0 is forward,
beta -> 1 reverse KL). Every divergence is divided by its curvature at ``p = q``,
``f''(1)`` (the generator's ``weight`` at ``log r = 0``: 1 for the KLs and the normalized
generalized JS, 1/4 for JS), so that all agree to second order near the teacher and differ
only in shape, not in scale (JS divided by 1/4 equals normalized generalized JS at beta 0.5).

Metrics on the test fold: accuracy (``Run.metric``, per evaluation), test cross-entropy and
its gap to the teacher's (``ce_gap``, student minus teacher), the forward KL from the teacher
to the student at T = 1 (``kl_to_teacher``), top-1 agreement with the teacher, and the expected
calibration error (15 equal-width confidence bins). ``Run.loss`` is the training-set label
cross-entropy (comparable across arms; each arm descends its own objective). The teacher is
a ``Run`` of its own (method ``teacher``), so its accuracy stands in the table.

``sparse top-3 KL`` (Sparse KD; :func:`~torchsteer.divergence.sparse_kd`): the same mixture
with the teacher stored as its top 3 classes and their log probabilities at T = 1, softened in
the probability domain and renormalized on that support, the student restricted to it.

``SinKD`` (Cui et al. 2024; :func:`~torchsteer.divergence.sinkhorn_divergence` with
``batchwise=True``): the same mixture with D the batch-wise Sinkhorn divergence between the
batch's B student and B teacher distributions at SinKD's released settings (T_s = 2,
eps = 0.1, cost W_ij = ||q_i - p_j||_1), uniform 1/B marginals, debiased::

    SinKD            L = (1 - a) CE + a S_eps(q_{T_s}, p_{T_s}),
                     S_eps = OT_eps(mu_q, mu_p) - OT_eps(mu_q, mu_q) / 2 - OT_eps(mu_p, mu_p) / 2

with no T^2 and no curvature factor (the L1 cost has no second-order term at p = q). The
release's loss has no 1/B marginals (its value is about B x the transport cost) and weights
it by 0.002; the 1/B form here is the proper OT_eps, and its weight a is the other arms'.

Quick mode: teacher 30 epochs, students 40 epochs, the first seed only. Full mode
(``benchmarks/distill.py``): teacher 60 epochs, students 150 epochs, the seeds given.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from torchsteer.bench import data
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.bench.suites._dro_splits import stratified_folds
from torchsteer.bench.training import mlp
from torchsteer.divergence import (
    PSKDTargets,
    f_divergence,
    generator,
    nkd_loss,
    ps_kd_alpha,
    sinkhorn_divergence,
    soft_cross_entropy,
    sparse_kd,
)

__all__ = [
    "ARMS",
    "Arm",
    "Config",
    "curvature",
    "distillation_loss",
    "load_split",
    "metrics",
    "run",
    "student_loss",
    "train_student",
    "train_teacher",
]

NAME = "distill"
NUM_CLASSES = 10
TEACHER = "teacher"


@dataclasses.dataclass(kw_only=True)
class Config:
    """Sizes and hyperparameters of one configuration of the suite."""

    teacher_epochs: int
    student_epochs: int
    teacher_hidden: tuple[int, ...] = (256, 256)
    student_hidden: tuple[int, ...] = (4,)
    batch_size: int = 64
    teacher_lr: float = 1e-3
    student_lr: float = 3e-3
    temperature: float = 4.0  # T of the divergence arms
    alpha: float = 0.9  # weight of the divergence against the label CE
    nkd_gamma: float = 1.5
    nkd_temperature: float = 1.0
    pskd_alpha_T: float = 0.8
    sinkd_temperature: float = 2.0  # SinKD's released T
    sinkd_epsilon: float = 0.1  # SinKD's released eps
    evals: int = 10  # recorded points per student curve
    max_seeds: int | None = None  # quick mode runs only the first seeds


QUICK = Config(teacher_epochs=30, student_epochs=40, max_seeds=1)
FULL = Config(teacher_epochs=60, student_epochs=150)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: ``family`` is ``"labels"``, ``"f"`` (an f-divergence ``kind``), ``"sparse"``
    (top-k), ``"sinkhorn"`` (SinKD), ``"nkd"`` or ``"pskd"``; ``kind_args`` are the kind's
    arguments as ``(name, value)`` pairs."""

    name: str
    family: str
    kind: str | None = None
    kind_args: tuple[tuple[str, object], ...] = ()
    top_k: int | None = None  # family "sparse": the teacher's k most likely classes


ARMS: list[Arm] = [
    Arm("labels only", "labels"),
    Arm("forward KL", "f", "kl"),
    Arm("reverse KL", "f", "reverse_kl"),
    Arm("JS", "f", "js"),
    Arm("GJS beta=0.1", "f", "generalized_js", (("beta", 0.1), ("normalized", True))),
    Arm("GJS beta=0.9", "f", "generalized_js", (("beta", 0.9), ("normalized", True))),
    Arm("NKD", "nkd"),
    Arm("PS-KD (self)", "pskd"),
    Arm("sparse top-3 KL", "sparse", "kl", top_k=3),
    Arm("SinKD", "sinkhorn"),
]


def curvature(arm: Arm) -> float:
    """``f''(1)`` of the arm's generator: ``D(p || q) ~ f''(1) / 2 chi^2(p, q)`` near ``p = q``."""
    gen = generator(arm.kind, **dict(arm.kind_args))
    return float(gen.weight(torch.zeros((), dtype=torch.float64)))


def distillation_loss(
    arm: Arm, student_logits: torch.Tensor, teacher_logits: torch.Tensor, config: Config
) -> torch.Tensor:
    """The divergence term of a ``"f"`` arm: ``T^2 D(p_T || q_T) / f''(1)``, batch mean; of
    the ``"sinkhorn"`` arm, the batch-wise S_eps (module docstring)."""
    if arm.family not in ("f", "sparse", "sinkhorn"):
        raise ValueError(f"Invalid arm: {arm.name!r} has no divergence term")
    if arm.family == "sinkhorn":
        return sinkhorn_divergence(
            student_logits,
            teacher_logits.detach(),
            epsilon=config.sinkd_epsilon,
            temperature=config.sinkd_temperature,
            batchwise=True,
        )
    t = config.temperature
    if arm.family == "sparse":  # the teacher as an offline top-k: indices, log p at T = 1
        top = torch.log_softmax(teacher_logits.detach().double(), -1).topk(arm.top_k, -1)
        d = sparse_kd(
            student_logits,
            top.indices,
            top.values.to(student_logits.dtype),
            arm.kind,
            tail="renormalize",
            temperature=t,
            reduction="batchmean",
            **dict(arm.kind_args),
        )
        return d * (t * t / curvature(arm))
    d = f_divergence(
        student_logits,
        teacher_logits.detach(),
        arm.kind,
        temperature=t,
        reduction="batchmean",
        **dict(arm.kind_args),
    )
    return d * (t * t / curvature(arm))


def student_loss(
    arm: Arm,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    y: torch.Tensor,
    config: Config,
    pskd_targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The arm's training loss on one batch (module docstring); ``pskd_targets`` for PS-KD."""
    if arm.family == "labels":
        return F.cross_entropy(student_logits, y)
    if arm.family == "pskd":
        if pskd_targets is None:
            raise ValueError("Invalid call: the PS-KD arm needs pskd_targets")
        return soft_cross_entropy(student_logits, pskd_targets)
    if teacher_logits is None:
        raise ValueError(f"Invalid call: the arm {arm.name!r} needs teacher_logits")
    ce = F.cross_entropy(student_logits, y)
    if arm.family == "nkd":
        kd = nkd_loss(
            student_logits,
            teacher_logits.detach(),
            y,
            gamma=config.nkd_gamma,
            temperature=config.nkd_temperature,
        )
        return ce + kd
    if arm.family in ("f", "sparse", "sinkhorn"):
        kd = distillation_loss(arm, student_logits, teacher_logits, config)
        return (1 - config.alpha) * ce + config.alpha * kd
    raise ValueError(f"Invalid arm family: {arm.family!r}")


def load_split(seed: int):
    """``(x_train, y_train, x_test, y_test)``: test = fold ``seed mod 5`` of the stratified
    5-fold partition of all 1797 digits (features / 16), train = the rest."""
    x, y, _, _ = data.digits(test_fraction=0.0)
    test = stratified_folds(y, 5) == seed % 5
    return x[~test], y[~test], x[test], y[test]


def expected_calibration_error(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """``sum_b |B_b| / N |acc(B_b) - conf(B_b)|`` over equal-width confidence bins."""
    probs = torch.softmax(logits.double(), 1)
    conf, pred = probs.max(1)
    correct = (pred == y).double()
    # bin b holds confidences in (b / bins, (b + 1) / bins]
    which = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if bool(sel.any()):
            ece += float(sel.double().mean() * (correct[sel].mean() - conf[sel].mean()).abs())
    return ece


def metrics(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor
) -> dict[str, float]:
    """Test metrics of a student next to its teacher (float64)."""
    zs, zt = student_logits.double(), teacher_logits.double()
    ce_s, ce_t = F.cross_entropy(zs, y), F.cross_entropy(zt, y)
    lp, lq = torch.log_softmax(zt, 1), torch.log_softmax(zs, 1)
    return {
        "test_acc": float((zs.argmax(1) == y).double().mean()),
        "test_ce": float(ce_s),
        "teacher_test_acc": float((zt.argmax(1) == y).double().mean()),
        "teacher_test_ce": float(ce_t),
        "ce_gap": float(ce_s - ce_t),
        "kl_to_teacher": float((lp.exp() * (lp - lq)).sum(1).mean()),
        "agreement": float((zs.argmax(1) == zt.argmax(1)).double().mean()),
        "ece": expected_calibration_error(zs, y),
    }


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out


def train_teacher(seed: int, config: Config, dataset) -> tuple[nn.Module, Run]:
    """The seed's teacher, trained on the training part with label cross-entropy."""
    xtr, ytr, xte, yte = dataset
    model = mlp([64, *config.teacher_hidden, NUM_CLASSES], nn.ReLU, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.teacher_lr)
    gen = torch.Generator().manual_seed(10_000 + seed)
    run = Run(suite=NAME, method=TEACHER, seed=seed)
    cpu, steps = 0.0, 0
    for _ in range(config.teacher_epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        t0 = time.process_time()
        for i in range(0, len(ytr), config.batch_size):
            idx = perm[i : i + config.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
            steps += 1
        cpu += time.process_time() - t0
    zte = _logits(model, xte)
    train_ce = float(F.cross_entropy(_logits(model, xtr), ytr))
    run.record(steps, cpu, train_ce, float((zte.argmax(1) == yte).double().mean()))
    run.step_time = cpu / max(steps, 1)
    run.extra.update(metrics(zte, zte, yte))
    run.extra["train_ce"] = train_ce
    return model, run


def train_student(arm: Arm, seed: int, config: Config, dataset, teacher: nn.Module | None) -> Run:
    """Train the seed's student with the arm's loss; same init and batch order for all arms."""
    xtr, ytr, xte, yte = dataset
    zt_train = _logits(teacher, xtr) if teacher is not None else None
    zt_test = _logits(teacher, xte) if teacher is not None else None
    model = mlp([64, *config.student_hidden, NUM_CLASSES], nn.ReLU, seed=20_000 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.student_lr)
    gen = torch.Generator().manual_seed(30_000 + seed)
    memory = PSKDTargets(len(ytr), NUM_CLASSES) if arm.family == "pskd" else None
    run = Run(suite=NAME, method=arm.name, seed=seed)
    every = max(1, config.student_epochs // config.evals)
    cpu, steps = 0.0, 0

    def record():
        z = _logits(model, xte)
        run.record(steps, cpu, float(F.cross_entropy(_logits(model, xtr), ytr)), _acc(z, yte))

    record()
    for epoch in range(config.student_epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        alpha_t = ps_kd_alpha(epoch + 1, config.student_epochs, config.pskd_alpha_T)
        t0 = time.process_time()
        for i in range(0, len(ytr), config.batch_size):
            idx = perm[i : i + config.batch_size]
            z = model(xtr[idx])
            targets = memory.targets(idx, ytr[idx], alpha_t) if memory is not None else None
            zt = zt_train[idx] if zt_train is not None else None
            loss = student_loss(arm, z, zt, ytr[idx], config, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if memory is not None:
                memory.update(idx, z.detach())
            steps += 1
        cpu += time.process_time() - t0
        if (epoch + 1) % every == 0 or epoch + 1 == config.student_epochs:
            record()
    run.step_time = cpu / max(steps, 1)
    zs_test = _logits(model, xte)
    run.extra.update(metrics(zs_test, zt_test if zt_test is not None else zs_test, yte))
    run.extra["train_ce"] = run.final_loss
    return run


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def _seeds(ctx_seeds: list[int], config: Config) -> list[int]:
    return ctx_seeds[: config.max_seeds] if config.max_seeds else list(ctx_seeds)


def run(ctx: Context, config: Config | None = None, arms: list[Arm] | None = None) -> list[Run]:
    """Per seed: the teacher, then every arm's student; one progress unit per run."""
    config = config or (QUICK if ctx.quick else FULL)
    arms = ARMS if arms is None else arms
    runs = []
    for seed in _seeds(ctx.seeds, config):
        dataset = load_split(seed)
        teacher, teacher_run = train_teacher(seed, config, dataset)
        runs.append(teacher_run)
        ctx.advance()
        for arm in arms:
            runs.append(train_student(arm, seed, config, dataset, teacher))
            ctx.advance()
    return runs


def _units(quick: bool, seeds: list[int]) -> int:
    return (len(ARMS) + 1) * len(_seeds(seeds, QUICK if quick else FULL))


register(
    Suite(
        name=NAME,
        description="digits: teacher MLP 64-256-256-10 distilled into 64-4-10, 10 arms",
        run=run,
        units=_units,
        metric_name="test acc",
        loss_name="train CE",
        baseline="labels only",
        higher_is_better=True,
        log_loss=True,
    )
)
