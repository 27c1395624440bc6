"""KL-DRO instance reweighting in PGD adversarial training on scikit-learn's digits.

Setup: :func:`torchsteer.bench.data.digits` (features / 16 in [0, 1], the first 20 % of the
rows as the test set), MLP 64-128-10 with ReLU, Adam (lr 3e-3), minibatches of 128.
Adversarial training (Madry et al.): each step replaces the batch by its l_inf PGD examples
(eps 0.1, 5 steps of 2.5 eps / 5, random start, clamped to [0, 1]) and descends the (weighted)
cross-entropy on them. Evaluation: clean accuracy, and PGD-20 (step 2.5 eps / 20, no random
start) robust accuracy overall and per class; the worst class is the one the suite is about.

Arms: uniform AT (the plain mean: the baseline), KL-DRO batch weights at r in {0.5, 1, 2},
streaming KL-DRO and KL-DRO with Group-DRO class weights (:class:`DROWeighting`).
``Run.metric`` is the robust accuracy (per evaluated epoch), ``Run.loss`` the mean adversarial
training loss of the epoch (unweighted), ``Run.extra`` holds ``clean_acc``, ``robust_acc``,
``worst_class_robust_acc``, ``worst_class``, ``per_class_robust_acc`` at the end, the
``tail_*`` averages and, with ``Config.diagnose``, the same on the training set and the ESS.
``Run.peak_memory``: two steps on a copy of the fresh model, optimizer and weighting, on the
first batch (torch's CPU allocations, :mod:`torchsteer.bench.memory`).
:func:`measure_overhead` times one training step of every arm against plain AT, interleaved.

Splits (``Config.split``): ``"legacy"``, the data loader's (the first 359 rows are the test
set, ~36 digits per class; the rows are not exchangeable: a logistic regression tells the
first 359 from the rest with cross-validated AUC 0.57, and its hard classes differ from the
training set's), and ``"cv5"``: seed ``s`` tests on fold ``s mod 5`` of a stratified 5-fold
partition (:func:`stratified_folds`) and trains on the rest: five seeds test every digit once.
Hyperparameters of a "selected" arm are chosen on a validation split carved from the training
part only (:func:`carve_validation`, :func:`select`), never on the test set.

Quick mode: 10 epochs, the first two seeds (~20 CPU s in all); full mode: 30 epochs, the seeds
given (``benchmarks/dro.py`` runs 5), evaluating every 5th epoch and each of the last 5, whose
average is kept as the ``tail_*`` metrics (less epoch-to-epoch noise than the last epoch).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchsteer.bench import data
from torchsteer.bench.attacks import pgd_attack
from torchsteer.bench.memory import peak_memory
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.bench.suites._dro_splits import (
    SPLITS,
    carve_validation,
    load_split,
    stratified_folds,
)
from torchsteer.bench.training import mlp
from torchsteer.control.dro import DROWeighting

__all__ = [
    "ARMS",
    "SPLITS",
    "CANDIDATES",
    "Arm",
    "Config",
    "carve_validation",
    "evaluate",
    "load_split",
    "measure_overhead",
    "run",
    "select",
    "stratified_folds",
    "train_arm",
]

NAME = "dro"
NUM_CLASSES = 10


@dataclasses.dataclass(kw_only=True)
class Config:
    """Sizes and hyperparameters of one configuration of the suite."""

    epochs: int
    batch_size: int = 128
    lr: float = 3e-3
    eps: float = 0.1
    train_steps: int = 5
    eval_steps: int = 20
    hidden: int = 128
    max_seeds: int | None = None  # quick mode runs only the first seeds
    split: str = "legacy"  # "legacy" (first 359 rows) or "cv5" (stratified fold seed % 5)
    eval_every: int = 1  # evaluate every k-th epoch, and each of the last `tail`
    tail: int = 1  # the last epochs averaged into the tail_* metrics
    diagnose: bool = False  # also: PGD robust accuracy per class on the training set, ESS


QUICK = Config(epochs=10, max_seeds=2)
FULL = Config(epochs=30, eval_every=5, tail=5)


@dataclasses.dataclass(frozen=True)
class Arm:
    """A method of the table: ``make()`` returns the weighting (``None``: the plain mean)."""

    name: str
    make: Callable[[], DROWeighting | None]


def _dro(**kwargs) -> Callable[[], DROWeighting]:
    return lambda: DROWeighting(**kwargs)


ARMS: list[Arm] = [
    Arm("uniform AT", lambda: None),
    Arm("KL-DRO batch r=0.5", _dro(temperature=0.5)),
    Arm("KL-DRO batch r=1", _dro(temperature=1.0)),
    Arm("KL-DRO batch r=2", _dro(temperature=2.0)),
    Arm("KL-DRO streaming r=1", _dro(temperature=1.0, mode="streaming", momentum=0.1)),
    Arm(
        "KL-DRO class level r=2",
        _dro(temperature=2.0, class_level=True, num_classes=NUM_CLASSES, class_step=0.002),
    ),
]


def _cls(r: float, eta: float, **kwargs) -> Arm:
    extra = "".join(f" {k}={v:g}" for k, v in kwargs.items())
    name = f"class level r={r:g} eta={eta:g}{extra}"
    return Arm(
        name,
        _dro(temperature=r, class_level=True, num_classes=NUM_CLASSES, class_step=eta, **kwargs),
    )


# The grid :func:`select` chooses from (with the spec's DRO arms).
CANDIDATES: list[Arm] = [
    _cls(2.0, 0.005),
    _cls(2.0, 0.01),
    _cls(2.0, 0.02),
    _cls(2.0, 0.01, class_momentum=0.1),
    _cls(2.0, 0.02, class_momentum=0.1),
    _cls(8.0, 0.01),
    _cls(8.0, 0.02),
    _cls(1.0, 0.01),
    _cls(2.0, 0.02, warmup_steps=60, max_weight=3.0),
]


ARMS_BY_NAME = {a.name: a for a in ARMS}


def arm_by_name(name: str) -> Arm:
    """The arm of ``ARMS`` or ``CANDIDATES`` with this name."""
    return next(a for a in ARMS + CANDIDATES if a.name == name)


def _attack(model, x, y, config: Config, steps: int, generator=None) -> torch.Tensor:
    return pgd_attack(
        model,
        x,
        y,
        eps=config.eps,
        steps=steps,
        norm="linf",
        bounds=(0.0, 1.0),
        random_start=generator is not None,
        generator=generator,
    )


def at_step(model, optimizer, weighting, x, y, config: Config, generator) -> torch.Tensor:
    """One adversarial-training step; returns the per-example adversarial losses (detached)."""
    x_adv = _attack(model, x, y, config, config.train_steps, generator)
    if weighting is None:
        losses = None
        loss = F.cross_entropy(model(x_adv), y)
    else:
        losses = F.cross_entropy(model(x_adv), y, reduction="none")
        loss = weighting(losses, y if weighting.class_level else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() if losses is None else losses.detach().mean()


def evaluate(model: nn.Module, x, y, config: Config) -> dict:
    """Clean and PGD-``eval_steps`` robust accuracy, overall and per class."""
    model.eval()
    x_adv = _attack(model, x, y, config, config.eval_steps)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double()
        logits = model(x_adv)
        robust = (logits.argmax(1) == y).double()
        loss = F.cross_entropy(logits, y, reduction="none").double()
    model.train()
    per_class = [float(robust[y == c].mean()) for c in range(NUM_CLASSES)]
    per_class_loss = [float(loss[y == c].mean()) for c in range(NUM_CLASSES)]
    worst = min(range(NUM_CLASSES), key=per_class.__getitem__)
    return {
        "clean_acc": float(clean.mean()),
        "robust_acc": float(robust.mean()),
        "worst_class_robust_acc": per_class[worst],
        "worst_class": worst,
        "per_class_robust_acc": per_class,
        "per_class_robust_loss": per_class_loss,
    }


def train_arm(arm: Arm, seed: int, config: Config, dataset=None) -> Run:
    """Adversarially train one arm on one seed; evaluate on the test part (see :class:`Config`)."""
    xtr, ytr, xte, yte = dataset if dataset is not None else load_split(config, seed)
    model = mlp([64, config.hidden, NUM_CLASSES], nn.ReLU, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    weighting = arm.make()
    generator = torch.Generator().manual_seed(seed)
    run = Run(suite=NAME, method=arm.name, seed=seed)
    probe = copy.deepcopy((model, optimizer, weighting))
    probe_gen = torch.Generator().set_state(generator.get_state())
    xb, yb = xtr[: config.batch_size], ytr[: config.batch_size]
    run.peak_memory = peak_memory(
        lambda: [at_step(*probe, xb, yb, config, probe_gen) for _ in range(2)]
    )
    cpu, steps = 0.0, 0
    tail: list[dict] = []
    ess: list[float] = []
    for epoch in range(config.epochs):
        perm = torch.randperm(len(ytr), generator=generator)
        epoch_loss = 0.0
        t0 = time.process_time()
        for i in range(0, len(ytr), config.batch_size):
            idx = perm[i : i + config.batch_size]
            epoch_loss += float(
                at_step(model, optimizer, weighting, xtr[idx], ytr[idx], config, generator)
            ) * len(idx)
            steps += 1
            if config.diagnose and weighting is not None:
                ess.append(weighting.signals()["ess_fraction"])
        cpu += time.process_time() - t0
        if (epoch + 1) % config.eval_every == 0 or epoch >= config.epochs - config.tail:
            metrics = evaluate(model, xte, yte, config)
            run.record(steps, cpu, epoch_loss / len(ytr), metrics["robust_acc"])
            if epoch >= config.epochs - config.tail:
                tail.append(metrics)
    run.step_time = cpu / max(steps, 1)
    run.extra.update(metrics)
    per_class = np.mean([m["per_class_robust_acc"] for m in tail], axis=0).tolist()
    run.extra["tail_per_class_robust_acc"] = per_class
    run.extra["tail_robust_acc"] = float(np.mean([m["robust_acc"] for m in tail]))
    run.extra["tail_worst_class_robust_acc"] = min(per_class)
    run.extra["per_class_count"] = torch.bincount(yte, minlength=NUM_CLASSES).tolist()
    if weighting is not None:
        run.extra["signals"] = weighting.signals()
        if weighting.class_level:
            run.extra["class_weights"] = weighting.class_weights.tolist()
    if config.diagnose:  # are the test set's hard classes hard on the training set?
        on_train = evaluate(model, xtr, ytr, config)
        run.extra["train_per_class_robust_acc"] = on_train["per_class_robust_acc"]
        run.extra["train_robust_acc"] = on_train["robust_acc"]
        run.extra["train_per_class_robust_loss"] = on_train["per_class_robust_loss"]
        run.extra["mean_ess_fraction"] = float(np.mean(ess)) if ess else 1.0
    return run


def select(
    candidates: list[Arm],
    dataset,
    config: Config,
    seeds: list[int],
    val_fraction: float = 0.25,
    max_drop: float = 0.01,
    match_steps: bool = True,
) -> dict:
    """Choose the arm with the best validation worst-class robust accuracy.

    Carves a stratified validation split (``val_fraction``) from the training part of
    ``dataset`` (the test part is not touched) and trains uniform AT and every candidate on
    the rest for each seed. Scores: the validation ``tail_*`` per-class robust accuracy
    averaged over the seeds, its worst class and its mean (the worst class of the average is
    less noisy than the average of per-seed worst classes). Among the candidates whose
    robust accuracy is within ``max_drop`` of uniform AT's it picks the largest worst-class
    gain (all candidates if none qualifies). With ``match_steps`` the validation runs take as
    many optimizer steps as training on the whole training part (more epochs on the smaller
    fit split): the class weights accumulate ``eta`` per step, so fewer steps would be a
    weaker setting than the one the test runs get.
    """
    xtr, ytr, _, _ = dataset
    fit_val = carve_validation(xtr, ytr, val_fraction)
    if match_steps:
        per_epoch = [math.ceil(len(t) / config.batch_size) for t in (ytr, fit_val[1])]
        epochs = round(config.epochs * per_epoch[0] / per_epoch[1])
        config = dataclasses.replace(config, epochs=epochs, eval_every=epochs)
    table = {}
    for arm in [ARMS[0], *candidates]:
        rows = [train_arm(arm, s, config, fit_val).extra for s in seeds]
        per_class = np.mean([r["tail_per_class_robust_acc"] for r in rows], axis=0)
        table[arm.name] = {
            "val_per_class_robust_acc": per_class.tolist(),
            "val_worst_class_robust_acc": float(per_class.min()),
            "val_robust_acc": float(np.mean([r["tail_robust_acc"] for r in rows])),
        }
    base = table[ARMS[0].name]
    for row in table.values():
        for key in ("robust_acc", "worst_class_robust_acc"):
            row["delta_" + key] = row["val_" + key] - base["val_" + key]
    names = [a.name for a in candidates]
    eligible = [n for n in names if table[n]["delta_robust_acc"] >= -max_drop] or names
    best = max(eligible, key=lambda n: table[n]["delta_worst_class_robust_acc"])
    return {"selected": best, "eligible": eligible, "scores": table, "seeds": seeds}


def measure_overhead(
    config: Config, arms: list[Arm] = ARMS, steps: int = 10, repeats: int = 30, seed: int = 0
) -> dict[str, dict[str, float]]:
    """CPU time of one AT step of each arm next to plain AT (``arms[0]``), in pairs.

    Each arm (plain AT included, as an A/A control of the method) is paired with a plain-AT
    twin of its own. Every repeat visits the pairs in random order and times ``steps``
    single steps of both, alternating in random order (own model and optimizer each; the
    same batch of ``batch_size`` digits; ``time.process_time``). Figures are medians over
    the repeats: ``step`` (s per step), ``ratio`` (paired ratio to the twin: drift of a
    shared machine cancels in each pair) and ``weighting`` (s per call of the weighting
    alone minus a plain ``mean`` on the same losses: the reweighting's own cost, free of the
    noise of the whole step).
    """
    xtr, ytr, _, _ = data.digits()
    x, y = xtr[: config.batch_size], ytr[: config.batch_size]

    def state(arm: Arm):
        model = mlp([64, config.hidden, NUM_CLASSES], nn.ReLU, seed=seed)
        opt = torch.optim.Adam(model.parameters(), lr=config.lr)
        return model, opt, arm.make(), torch.Generator().manual_seed(seed)

    def one_step(st) -> float:
        model, opt, weighting, gen = st
        t0 = time.process_time()
        at_step(model, opt, weighting, x, y, config, gen)
        return time.process_time() - t0

    pairs = {arm.name: (state(arm), state(arms[0])) for arm in arms}
    times = {arm.name: [] for arm in arms}
    ratios = {arm.name: [] for arm in arms}
    own = {arm.name: [] for arm in arms}
    losses = F.cross_entropy(pairs[arms[0].name][0][0](x), y, reduction="none").detach()
    shuffler = random.Random(seed)
    order = list(arms)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for arm in order:
            t = [0.0, 0.0]  # arm, twin
            for _ in range(steps):
                sides = [0, 1]
                shuffler.shuffle(sides)
                for side in sides:
                    t[side] += one_step(pairs[arm.name][side]) / steps
            times[arm.name].append(t[0])
            ratios[arm.name].append(t[0] / t[1])
            own[arm.name].append(_weighting_cost(arm, losses, y, 20 * steps))
    return {
        name: {
            "step": statistics.median(times[name]),
            "ratio": statistics.median(ratios[name]),
            "weighting": statistics.median(own[name]),
        }
        for name in times
    }


def _weighting_cost(arm: Arm, losses: torch.Tensor, y: torch.Tensor, calls: int) -> float:
    """Seconds per call of the arm's weighting minus a plain mean (0 for uniform AT)."""
    weighting = arm.make()
    if weighting is None:
        return 0.0
    labels = y if weighting.class_level else None
    t0 = time.process_time()
    for _ in range(calls):
        losses.mean()
    t_mean = time.process_time() - t0
    t0 = time.process_time()
    for _ in range(calls):
        weighting(losses, labels)
    return (time.process_time() - t0 - t_mean) / calls


def run(ctx: Context, config: Config | None = None) -> list[Run]:
    """Every arm on every seed (quick: the first two), one progress unit per run."""
    config = config or (QUICK if ctx.quick else FULL)
    seeds = ctx.seeds[: config.max_seeds] if config.max_seeds else ctx.seeds
    runs = []
    for seed in seeds:
        dataset = load_split(config, seed)
        for arm in ARMS:
            runs.append(train_arm(arm, seed, config, dataset))
            ctx.advance()
    return runs


def _units(quick: bool, seeds: list[int]) -> int:
    config = QUICK if quick else FULL
    return len(ARMS) * len(seeds[: config.max_seeds] if config.max_seeds else seeds)


register(
    Suite(
        name=NAME,
        description="KL-DRO reweighting in PGD adversarial training (digits MLP, worst class)",
        run=run,
        units=_units,
        metric_name="robust acc (PGD-20)",
        loss_name="adv. train loss",
        baseline="uniform AT",
        higher_is_better=True,
        log_loss=False,
    )
)
