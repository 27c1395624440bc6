"""KL-DRO instance reweighting in PGD adversarial training on scikit-learn's digits.

Setup: :func:`torchsteer.bench.data.digits` (features / 16 in [0, 1], the first 20 % of the
rows as the test set), MLP 64-128-10 with ReLU, Adam (lr 3e-3), minibatches of 128.
Adversarial training (Madry et al.): each step replaces the batch by its l_inf PGD examples
(eps 0.1, 5 steps of 2.5 eps / 5, random start, clamped to [0, 1]) and descends the (weighted)
cross-entropy on them. Evaluation: clean accuracy, and PGD-20 (step 2.5 eps / 20, no random
start) robust accuracy overall and per class; the worst class is the one the suite is about.

Arms: uniform AT (the plain mean: the baseline), KL-DRO batch weights at r in {0.5, 1, 2},
streaming KL-DRO and KL-DRO with Group-DRO class weights (:class:`DROWeighting`).
``Run.metric`` is the robust accuracy (per epoch), ``Run.loss`` the mean adversarial training
loss of the epoch (unweighted), ``Run.extra`` holds ``clean_acc``, ``robust_acc``,
``worst_class_robust_acc``, ``worst_class`` and ``per_class_robust_acc`` at the end.
:func:`measure_overhead` times one training step of every arm against plain AT, interleaved.

Quick mode: 10 epochs, the first two seeds (~20 CPU s in all); full mode: 30 epochs, the seeds
given (``benchmarks/dro.py`` runs 5).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from torchsteer.bench import data
from torchsteer.bench.attacks import pgd_attack
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.bench.training import mlp
from torchsteer.control.dro import DROWeighting

__all__ = ["ARMS", "Arm", "Config", "evaluate", "measure_overhead", "run", "train_arm"]

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


QUICK = Config(epochs=10, max_seeds=2)
FULL = Config(epochs=30)


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
        robust = (model(x_adv).argmax(1) == y).double()
    model.train()
    per_class = [float(robust[y == c].mean()) for c in range(NUM_CLASSES)]
    worst = min(range(NUM_CLASSES), key=per_class.__getitem__)
    return {
        "clean_acc": float(clean.mean()),
        "robust_acc": float(robust.mean()),
        "worst_class_robust_acc": per_class[worst],
        "worst_class": worst,
        "per_class_robust_acc": per_class,
    }


def train_arm(arm: Arm, seed: int, config: Config, dataset=None) -> Run:
    """Adversarially train one arm on one seed; evaluate after every epoch."""
    xtr, ytr, xte, yte = dataset if dataset is not None else data.digits()
    model = mlp([64, config.hidden, NUM_CLASSES], nn.ReLU, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    weighting = arm.make()
    generator = torch.Generator().manual_seed(seed)
    run = Run(suite=NAME, method=arm.name, seed=seed)
    cpu, steps = 0.0, 0
    for _ in range(config.epochs):
        perm = torch.randperm(len(ytr), generator=generator)
        epoch_loss = 0.0
        t0 = time.process_time()
        for i in range(0, len(ytr), config.batch_size):
            idx = perm[i : i + config.batch_size]
            epoch_loss += float(
                at_step(model, optimizer, weighting, xtr[idx], ytr[idx], config, generator)
            ) * len(idx)
            steps += 1
        cpu += time.process_time() - t0
        metrics = evaluate(model, xte, yte, config)
        run.record(steps, cpu, epoch_loss / len(ytr), metrics["robust_acc"])
    run.step_time = cpu / max(steps, 1)
    run.extra.update(metrics)
    if weighting is not None:
        run.extra["signals"] = weighting.signals()
    return run


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
    dataset = data.digits()
    runs = []
    for seed in seeds:
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
