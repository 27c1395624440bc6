"""The Sven paper's toy regression: fit f(x) = exp(-10 x^2) sin(2 x) with a small MLP.

Setup (Bright-Thonney et al., 2026, Sec. on regression): x ~ U[-1, 1], inputs and targets
standardized with the training statistics (:func:`torchsteer.bench.data.regression_1d`), an
MLP 1-16-16-16-1 with GELU, mean squared error, minibatches of B = 128. The metric is the
validation MSE (lower is better); the target for ``time to target`` is 1e-4.

Arms: SGD, SGD + momentum 0.9 and Adam, each over a small learning-rate grid (every grid point
is reported; the table marks the best), full-batch L-BFGS with the strong-Wolfe line search,
and Sven at the issue's lr 0.1, rank 64 (its functional path ``step(batch=(x, y))``):

* ``Sven lr=0.1 rank=64``: the spec's defaults (kappa = 2, rtol = 1e-3, no safeguard);
* ``Sven lr=0.1 rank=64 kappa=1 cap=1 rtol=1e-5``: the same lr and rank with options chosen
  on ``benchmarks/regression.py`` (see ``benchmarks/results/regression.md``): residual
  ``|f - y|`` (``kappa=1``, the Gauss-Newton form for squared error), a trust region of 1 on
  the step norm (``max_step_norm=1.0``: at initialization the Jacobian is nearly degenerate
  and the unguarded first step is 2-5x the norm of all parameters), and ``rtol=1e-5`` with a
  float64 Gram matrix (``gram_dtype=torch.float64``; with rtol = 1e-3, which float32 cannot
  go below, the fit stalls once the residual lives in the truncated directions);
* ``Sven lr=0.1 rank=64 kappa=1 cap=1 rtol=1e-5 momentum=0.5``: the same with heavy-ball
  momentum 0.5 on the direction (an option of the issue's API; in steady state it doubles
  the effective step, so it is reported as its own arm, not as "Sven at lr 0.1").

Evaluation every 10 steps (the time to 1e-4 is resolved to 10 steps: about 15 ms of Adam,
50 ms of Sven). Quick mode: 2k/2k points, 60 epochs (960 steps; L-BFGS 40 full-batch steps),
seed 0 (see ``docs/bench.md`` for its measured CPU time). Full mode: 10k/10k points, 200
epochs, the seeds given (``--seeds 3`` = 0, 1, 2).

Adding a method: append a :class:`~torchsteer.bench.training.Method` to the list that
:func:`methods` returns. An optimizer with the Sven closure contract (the closure returns the
per-sample losses, shape ``(B,)``) takes three lines::

    from torchsteer.optim import Sven
    from torchsteer.bench.training import Method, per_sample_closure_step

    arms.append(Method(name="Sven", step=per_sample_closure_step,
                       make=lambda model: Sven(model.parameters(), lr=0.5, rank=64)))

``make`` receives the model, so an optimizer that needs it (``model=model``) gets it. If the
step needs something the three provided step functions do not do, pass your own
``step(optimizer, model, loss_fn, x, y) -> float`` (``loss_fn`` gives per-sample losses).

References:
    Bright-Thonney, Harvey, Lukas, Thaler, "Sven: Singular Value Descent as a Computationally
    Efficient Natural Gradient Method", arXiv:2604.01279 (2026).
"""

from __future__ import annotations

import dataclasses

import torch

from torchsteer.bench import data
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.bench.training import Method, lbfgs_method, mlp, sweep, torch_method
from torchsteer.optim.sven import Sven

__all__ = ["SAFEGUARDS", "SVEN_ARMS", "Config", "methods", "run"]

NAME = "regression"
TARGET = 1e-4


@dataclasses.dataclass(kw_only=True)
class Config:
    """Sizes of one configuration of the suite."""

    n_train: int
    n_val: int
    epochs: int
    lbfgs_steps: int
    batch_size: int = 128
    evals: int | None = None  # recorded points per curve (None: one every 10 steps)

    @property
    def steps(self) -> int:
        return self.epochs * -(-self.n_train // self.batch_size)


QUICK = Config(n_train=2_000, n_val=2_000, epochs=60, lbfgs_steps=40)
FULL = Config(n_train=10_000, n_val=10_000, epochs=200, lbfgs_steps=500)


def methods(config: Config) -> list[Method]:
    """The arms, in table order."""
    arms = [torch_method(f"SGD lr={lr:g}", torch.optim.SGD, lr=lr) for lr in (1e-2, 3e-2, 1e-1)]
    arms += [
        torch_method(f"SGD+momentum lr={lr:g}", torch.optim.SGD, lr=lr, momentum=0.9)
        for lr in (1e-3, 3e-3, 1e-2)
    ]
    arms += [torch_method(f"Adam lr={lr:g}", torch.optim.Adam, lr=lr) for lr in (1e-3, 3e-3, 1e-2)]
    arms.append(lbfgs_method(config.lbfgs_steps))
    for name, options in SVEN_ARMS.items():
        arms.append(
            Method(
                name=name,
                step=_sven_step,
                make=lambda model, options=options: Sven(
                    model.parameters(),
                    lr=0.1,
                    rank=64,
                    model=model,
                    loss_fn=squared_error,
                    **options,
                ),
            )
        )
    return arms


# The safeguards chosen on ``benchmarks/regression.py`` (which imports them from here).
SAFEGUARDS: dict = dict(max_step_norm=1.0, rtol=1e-5, gram_dtype=torch.float64)

# The lr and rank in every arm; the others add the options chosen on the benchmark.
SVEN_ARMS: dict[str, dict] = {
    "Sven lr=0.1 rank=64": {},
    "Sven lr=0.1 rank=64 kappa=1 cap=1 rtol=1e-5": dict(SAFEGUARDS, kappa=1.0),
    "Sven lr=0.1 rank=64 kappa=1 cap=1 rtol=1e-5 momentum=0.5": dict(
        SAFEGUARDS, kappa=1.0, momentum=0.5
    ),
}


def _sven_step(optimizer, model, loss_fn, x, y) -> float:
    """Sven's functional path: the per-sample Jacobian from the model (see ``Sven.step``)."""
    return float(optimizer.step(batch=(x, y)))


def squared_error(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error, shape ``(B,)``."""
    return (output - y).pow(2).flatten(1).sum(1)


def run(ctx: Context, config: Config | None = None) -> list[Run]:
    """Run every arm on every seed of ``ctx``."""
    config = config or (QUICK if ctx.quick else FULL)
    x, y, xv, yv = data.regression_1d(config.n_train, config.n_val, seed=0)

    def val_mse(model):
        return squared_error(model(xv), yv).mean().item()

    return sweep(
        ctx,
        lambda: methods(config),
        lambda seed: mlp([1, 16, 16, 16, 1], seed=seed),
        squared_error,
        x,
        y,
        suite=NAME,
        steps=config.steps,
        batch_size=config.batch_size,
        eval_every=10 if config.evals is None else max(1, config.steps // config.evals),
        metric_fn=val_mse,
        target=TARGET,
        higher_is_better=False,
    )


def _units(quick: bool, seeds: list[int]) -> int:
    return len(methods(QUICK if quick else FULL)) * len(seeds)


register(
    Suite(
        name=NAME,
        description="Sven paper's 1-D regression, MLP 1-16-16-16-1, val MSE",
        run=run,
        units=_units,
        metric_name="val MSE",
        loss_name="train MSE",
        baseline="SGD",
        higher_is_better=False,
        target=TARGET,
    )
)
