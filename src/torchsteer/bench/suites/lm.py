r"""Next-token prediction on a language whose best achievable loss is known exactly.

Data: :class:`torchsteer.bench.language.MarkovLanguage` (64 symbols in 4 groups, each context
8 successors with Dirichlet(1) weights, language seed 0): an order-2 chain whose entropy rate
$H$ (nats per token) is solved exactly from its stationary distribution. Windows of
``context + 1`` symbols start in the stationary distribution; the model predicts token
$t + 1$ from tokens $\le t$. The **metric** is the validation cross-entropy over the positions
$t \ge 1$ of a fixed validation set (their floor is exactly $H$; position 0 sees one symbol and
its floor is the larger $H(X_1 \mid X_0)$, so it is left out); the **target** is
$1.05\,H$, within 5 % of the floor. ``Run.extra`` keeps ``floor`` ($H$), ``val_true_nll`` (the
true chain's own loss on the same validation windows: the sampling noise of the metric) and
``tokens_per_step``. Each seed draws its own training stream (``seed + 1000``) and model
initialization; every arm of a seed sees the same stream.

Model: :class:`torchsteer.bench.gpt.GPT` (untied head), full mode 4 layers, width 128,
4 heads, context 32. ``Run.steps`` holds the **tokens** trained on (so the plots' left panels
are loss against tokens; ``Run.extra["step"]`` has the step numbers), ``cpu_time`` the
``process_time`` of the optimizer steps only (forward, backward, step and schedule; the
evaluations excluded), ``loss`` the mean training loss of the minibatches since the previous
point. An arm stops once the metric has met the target (``stop_at_target``), so the full run
spends its CPU time where the metric is decided.

Arms (full mode; :func:`methods`):

* ``AdamW lr=...``: a learning-rate grid, 20 warm-up steps then a cosine decay to 0 over the
  arm's step budget, weight decay 0.01 (the baseline of the step-cost ratio);
* ``AdamW+limiter``: the same AdamW at a larger lr, each update capped by
  :class:`~torchsteer.control.radius.RadiusLimiter` (``r_max = 1``, finite-difference
  measurement on the ``(B, T, V)`` logits, every token a sample);
* ``M-FAC``: :class:`~torchsteer.optim.MFAC` on the same cosine schedule;
* ``Sven``: :class:`~torchsteer.optim.Sven` on per-sequence losses (the mean cross-entropy of
  each window: B rows of the Jacobian), trust region ``max_step_norm``;
* ``RN``: :class:`~torchsteer.optim.RegularizedNewton`, Gauss-Newton curvature with CG on
  the logits (the closure returns ``(loss, logits)``).

Quick mode: 2 layers, width 64, context 16, one AdamW lr, every arm a few seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchsteer.bench.gpt import GPT, GPTConfig
from torchsteer.bench.language import MarkovLanguage
from torchsteer.bench.memory import peak_memory
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.bench.training import optimizer_state_bytes, time_to_target
from torchsteer.control.radius import RadiusLimiter
from torchsteer.optim import MFAC, RegularizedNewton, Sven

__all__ = ["Arm", "Config", "methods", "run", "run_arm", "validation_loss"]

NAME = "lm"
LANGUAGE_SEED, VAL_SEED, TOLERANCE = 0, 12345, 0.05
WARMUP = 20
GROUPS = 1  # order 1; see the module docstring for order 2 (GROUPS = 4)


@dataclasses.dataclass(kw_only=True)
class Config:
    """Sizes of one configuration of the suite."""

    n_layer: int
    width: int
    context: int
    batch_size: int
    steps: int  # step budget of the first-order arms
    eval_every: int
    val_windows: int
    adamw_lrs: tuple[float, ...]
    limiter_lr: float
    mfac_lr: float
    sven_lr: float
    second_order_steps: int  # Sven
    newton_steps: int
    stop_at_target: bool = True
    n_head: int = 4


QUICK = Config(
    n_layer=2, width=64, context=16, batch_size=16, steps=120, eval_every=20,
    val_windows=64, adamw_lrs=(3e-3,), limiter_lr=1e-2, mfac_lr=3e-2, sven_lr=0.2,
    second_order_steps=40, newton_steps=10,
)  # fmt: skip
FULL = Config(
    n_layer=4, width=128, context=32, batch_size=16, steps=600, eval_every=25,
    val_windows=128, adamw_lrs=(1e-3, 3e-3, 1e-2), limiter_lr=1e-2, mfac_lr=3e-2, sven_lr=0.2,
    second_order_steps=100, newton_steps=30,
)  # fmt: skip


@dataclasses.dataclass(kw_only=True)
class Arm:
    """One optimizer arm: ``make(model) -> state``, ``step(state, model, x, y) -> loss``.

    ``state`` is what the step needs (the optimizer, its scheduler, a limiter); ``steps`` the
    arm's budget. ``baseline`` marks the AdamW arms (the step-cost ratio's denominator).
    """

    name: str
    make: Callable
    step: Callable
    steps: int


def token_losses(model, x, y) -> torch.Tensor:
    """Per-token cross-entropy ``(B, T)`` of ``model(x)`` against ``y``."""
    logits = model(x)
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none")


def validation_loss(model, x, y) -> float:
    """Mean cross-entropy over positions ``t >= 1`` (floor exactly ``H``), under ``no_grad``."""
    was = model.training
    model.eval()
    with torch.no_grad():
        value = token_losses(model, x, y)[:, 1:].mean().item()
    model.train(was)
    return value


def _cosine(opt, steps: int):
    def factor(s):
        return min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _first_order(opt_fn, steps, limiter: bool = False):
    def make(model):
        opt = opt_fn(model)
        lim = RadiusLimiter(model, r_max=1.0, method="fd") if limiter else None
        return opt, _cosine(opt, steps), lim

    def step(state, model, x, y):
        opt, sched, lim = state
        opt.zero_grad(set_to_none=True)
        loss = token_losses(model, x, y).mean()
        loss.backward()
        if lim is None:
            opt.step()
        else:
            lim.step(opt, x)
        sched.step()
        return loss.item()

    return make, step


def _sven_step(state, model, x, y):
    (opt,) = state
    return float(opt.step(batch=(x, y)))


def sequence_losses(logits, y):
    """Per-sequence mean cross-entropy ``(B,)``: Sven's per-sample losses."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def _newton_step(state, model, x, y):
    (opt,) = state
    first: list[float] = []

    def closure():
        logits = model(x)
        loss = F.cross_entropy(logits.transpose(1, 2), y)
        if not first:
            first.append(loss.item())
        return loss, logits

    # Gauss-Newton products differentiate the backward: the fused CPU attention kernel has
    # no double backward, the math kernel (the same function) has
    with sdpa_kernel(SDPBackend.MATH):
        opt.step(closure)
    return first[0]


def _scalars(record: dict) -> dict:
    """The numbers of an optimizer's state record (0-d tensors as floats), JSON-able."""
    out = {}
    for key, value in record.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, dict):
            value = _scalars(value)
        if isinstance(value, int | float | bool | dict):
            out[key] = value
    return out


def adamw_arm(lr: float, steps: int, limiter: bool = False) -> Arm:
    """AdamW (weight decay 0.01) on the warm-up + cosine schedule, optionally limited."""
    make, step = _first_order(
        lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01), steps, limiter
    )
    name = f"AdamW+limiter lr={lr:g}" if limiter else f"AdamW lr={lr:g}"
    return Arm(name=name, make=make, step=step, steps=steps)


def mfac_arm(lr: float, steps: int, ngrads: int = 32, damp: float = 1e-3) -> Arm:
    """M-FAC (momentum 0.9) on the warm-up + cosine schedule."""
    make, step = _first_order(
        lambda m: MFAC(m.parameters(), lr=lr, ngrads=ngrads, damp=damp, momentum=0.9), steps
    )
    return Arm(name=f"M-FAC m={ngrads} lr={lr:g}", make=make, step=step, steps=steps)


def sven_arm(lr: float, steps: int, max_step_norm: float = 1.0, rank: int = 16) -> Arm:
    """Sven on per-sequence losses (functional path), trust region ``max_step_norm``."""

    def make(m):
        return (
            Sven(m.parameters(), lr=lr, rank=rank, max_step_norm=max_step_norm, seed=0,
                 model=m, loss_fn=sequence_losses),
        )  # fmt: skip

    return Arm(name=f"Sven lr={lr:g} cap={max_step_norm:g}", make=make, step=_sven_step,
               steps=steps)  # fmt: skip


def newton_arm(steps: int, cg_maxiter: int = 10) -> Arm:
    """RegularizedNewton, Gauss-Newton curvature on the logits, CG (at most ``cg_maxiter``)."""

    def make(m):
        return (RegularizedNewton(m.parameters(), curvature="gauss_newton", cg_maxiter=cg_maxiter),)

    return Arm(name=f"RN gauss-newton cg<={cg_maxiter}", make=make, step=_newton_step,
               steps=steps)  # fmt: skip


def methods(config: Config) -> list[Arm]:
    """The arms, in table order."""
    arms = [adamw_arm(lr, config.steps) for lr in config.adamw_lrs]
    arms.append(adamw_arm(config.limiter_lr, config.steps, limiter=True))
    arms.append(mfac_arm(config.mfac_lr, config.steps))
    arms.append(sven_arm(config.sven_lr, config.second_order_steps))
    arms.append(newton_arm(config.newton_steps))
    return arms


def language() -> MarkovLanguage:
    """The suite's language (fixed: language seed 0)."""
    return MarkovLanguage.random(64, groups=GROUPS, successors=8, alpha=1.0, seed=LANGUAGE_SEED)


def _windows(lang, n, config, seed):
    w = torch.as_tensor(lang.sample(n, config.context + 1, seed))
    return w[:, :-1], w[:, 1:]


def training_stream(lang, config: Config, seed: int, steps: int):
    """The batches of ``steps`` steps, ``(steps * B, T)`` inputs and targets; batch ``s`` is
    drawn from the seed sequence ``(1000 + seed, s)``, so every arm sees the same batches
    whatever its budget."""
    w = [lang.sample(config.batch_size, config.context + 1, [1000 + seed, s]) for s in range(steps)]
    w = torch.as_tensor(np.concatenate(w))
    return w[:, :-1], w[:, 1:]


def make_model(config: Config, seed: int) -> GPT:
    """The suite's GPT initialized from ``seed`` (the global RNG is left alone)."""
    cfg = GPTConfig(64, config.context, config.n_layer, config.n_head, config.width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg)


def run_arm(
    arm: Arm,
    config: Config,
    seed: int,
    lang: MarkovLanguage | None = None,
    clock: Callable[[], float] = time.process_time,
) -> Run:
    """One arm on one seed: the curve, time to target, step time and peak memory."""
    lang = lang or language()
    floor = lang.entropy_rate
    target = (1 + TOLERANCE) * floor
    xv, yv = _windows(lang, config.val_windows, config, VAL_SEED)
    true_nll = float(lang.nll(torch.cat([xv, yv[:, -1:]], 1).numpy())[:, 1:].mean())
    x, y = training_stream(lang, config, seed, max(arm.steps, 2))
    model = make_model(config, seed)
    state = arm.make(model)
    b, per_step = config.batch_size, config.batch_size * config.context
    run = Run(suite=NAME, method=arm.name, seed=seed)
    probe = copy.deepcopy(model)
    probe_state = arm.make(probe)
    run.peak_memory = peak_memory(
        lambda: [arm.step(probe_state, probe, x[i * b : (i + 1) * b], y[i * b : (i + 1) * b])
                 for i in range(2)]
    )  # fmt: skip
    run.extra.update(floor=floor, target=target, val_true_nll=true_nll, step=[0])
    run.extra["tokens_per_step"] = per_step
    run.record(0, 0.0, float("nan"), validation_loss(model, xv, yv))
    spent, losses, done = 0.0, [], 0
    every = max(1, round(config.eval_every * arm.steps / config.steps))
    for s in range(1, arm.steps + 1):
        xb, yb = x[(s - 1) * b : s * b], y[(s - 1) * b : s * b]
        start = clock()
        loss = arm.step(state, model, xb, yb)
        spent += clock() - start
        losses.append(loss)
        done = s
        if not math.isfinite(loss):
            run.extra["diverged"] = True
        if s % every == 0 or s == arm.steps or not math.isfinite(loss):
            metric = validation_loss(model, xv, yv)
            run.record(s * per_step, spent, sum(losses) / len(losses), metric)
            run.extra["step"].append(s)
            losses = []
            if run.extra.get("diverged") or (config.stop_at_target and metric <= target):
                break
    run.step_time = spent / done if done else None
    run.time_to_target = time_to_target(run.cpu_time, run.metric, target, False)
    opt = state[0] if isinstance(state, tuple) else None
    if isinstance(opt, torch.optim.Optimizer):
        run.extra["state_bytes"] = optimizer_state_bytes(opt)
    if isinstance(opt, Sven | RegularizedNewton):
        run.extra["optimizer_record"] = _scalars(opt.state[next(model.parameters())])
    return run


def run(ctx: Context, config: Config | None = None) -> list[Run]:
    """Every arm on every seed of ``ctx``, seeds outermost."""
    config = config or (QUICK if ctx.quick else FULL)
    lang = language()
    out = []
    for seed in ctx.seeds:
        for arm in methods(config):
            out.append(run_arm(arm, config, seed, lang))
            ctx.advance()
    return out


def _target() -> float:
    return (1 + TOLERANCE) * language().entropy_rate


register(
    Suite(
        name=NAME,
        description="GPT 4x128 on a Markov language of known entropy rate H: CPU s to 1.05 H",
        run=run,
        units=lambda quick, seeds: len(methods(QUICK if quick else FULL)) * len(seeds),
        metric_name="val CE (t>=1)",
        loss_name="train CE",
        baseline="AdamW",
        higher_is_better=False,
        target=_target(),
        quick_default=False,
        log_loss=False,
        step_name="tokens",
    )
)
