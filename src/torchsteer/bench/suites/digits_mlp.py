"""An MLP on scikit-learn's bundled digits (1797 images of 8 x 8 pixels, 10 classes).

Setup: features / 16, the first 20 % of the rows as the test set
(:func:`torchsteer.bench.data.digits`); MLP 64-64-64-10 with GELU, cross-entropy, minibatches
of 64. The metric is the test accuracy (higher is better); the target is 0.93.

Arms: SGD (the step-cost baseline), SGD + momentum 0.9, Adam and M-FAC (windows of 32 and 128
gradients, damp 1e-4) over small learning-rate grids, and full-batch L-BFGS with the
strong-Wolfe line search. Quick mode: 40 epochs, seed 0 (a few CPU seconds per arm). Full
mode: 150 epochs, the seeds given.

Adding a method: append a :class:`~torchsteer.bench.training.Method` to the list that
:func:`methods` returns. An optimizer used like ``torch.optim`` (M-FAC) takes one line::

    from torchsteer.optim import MFAC
    from torchsteer.bench.training import torch_method

    arms.append(torch_method("M-FAC lr=1e-3", MFAC, lr=1e-3, ngrads=32, damp=1e-4))

For an optimizer that needs a closure, build a ``Method`` with ``step=closure_step`` (scalar
loss after ``backward``) or ``step=per_sample_closure_step`` (per-sample losses).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from torchsteer.bench import data
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.bench.training import Method, lbfgs_method, mlp, sweep, torch_method
from torchsteer.optim.mfac import MFAC

__all__ = ["Config", "methods", "run"]

NAME = "digits-mlp"
TARGET = 0.93


@dataclasses.dataclass(kw_only=True)
class Config:
    """Sizes of one configuration of the suite."""

    epochs: int
    lbfgs_steps: int
    batch_size: int = 64
    hidden: tuple[int, ...] = (64, 64)
    evals: int = 40  # recorded points per curve


QUICK = Config(epochs=40, lbfgs_steps=60)
FULL = Config(epochs=150, lbfgs_steps=200)


def methods(config: Config) -> list[Method]:
    """The arms, in table order."""
    arms = [torch_method("SGD lr=0.1", torch.optim.SGD, lr=0.1)]
    arms += [
        torch_method(f"SGD+momentum lr={lr:g}", torch.optim.SGD, lr=lr, momentum=0.9)
        for lr in (1e-2, 3e-2)
    ]
    arms += [torch_method(f"Adam lr={lr:g}", torch.optim.Adam, lr=lr) for lr in (1e-3, 3e-3)]
    arms += [
        torch_method(f"M-FAC m={m} lr={lr:g}", MFAC, lr=lr, ngrads=m, damp=1e-4)
        for m in (32, 128)
        for lr in (1e-3, 3e-3)
    ]
    arms.append(lbfgs_method(config.lbfgs_steps))
    return arms


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy, shape ``(B,)``."""
    return nn.functional.cross_entropy(logits, y, reduction="none")


def run(ctx: Context, config: Config | None = None) -> list[Run]:
    """Run every arm on every seed of ``ctx``."""
    config = config or (QUICK if ctx.quick else FULL)
    x, y, xt, yt = data.digits()
    steps = config.epochs * -(-x.shape[0] // config.batch_size)

    def accuracy(model):
        return (model(xt).argmax(1) == yt).double().mean().item()

    return sweep(
        ctx,
        lambda: methods(config),
        lambda seed: mlp([x.shape[1], *config.hidden, 10], seed=seed),
        cross_entropy,
        x,
        y,
        suite=NAME,
        steps=steps,
        batch_size=config.batch_size,
        eval_every=max(1, steps // config.evals),
        metric_fn=accuracy,
        target=TARGET,
        higher_is_better=True,
    )


def _units(quick: bool, seeds: list[int]) -> int:
    return len(methods(QUICK if quick else FULL)) * len(seeds)


register(
    Suite(
        name=NAME,
        description="MLP 64-64-64-10 on scikit-learn digits, test accuracy",
        run=run,
        units=_units,
        metric_name="test acc",
        loss_name="train CE",
        baseline="SGD",
        higher_is_better=True,
        target=TARGET,
        log_loss=True,
    )
)
