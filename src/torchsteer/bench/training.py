"""Small training loops shared by the benchmark suites.

A suite describes each arm as a :class:`Method`: a display name, a factory that builds the
optimizer from the model, and a *step function* that performs one optimizer step on one batch.
:func:`train` runs one method on one seed and returns a :class:`~torchsteer.bench.registry.Run`:

* ``cpu_time`` is cumulative ``time.process_time()`` spent in optimizer steps only
  (evaluation, data shuffling and recording are excluded);
* the recorded ``loss`` is the full training-set loss and ``metric`` the suite's held-out
  metric, both evaluated every ``eval_every`` steps (and at step 0);
* ``step_time`` is the training CPU time divided by the number of steps taken;
* ``time_to_target`` is the CPU time of the first recorded point whose metric meets the target;
* ``peak_memory`` is the peak of bytes allocated by torch during training steps, above what
  was allocated before them: gradients, optimizer state, activations and the temporaries of
  the step (per-sample Jacobians, line searches). On CUDA it is read from the allocator over
  the whole run; on CPU it is measured by :func:`peak_step_memory` with the profiler's
  memory events over two steps on a copy of the fresh model (outside the timed training);
  ``extra["state_bytes"]`` holds the optimizer state kept at the end of training.

Step functions have the signature ``step(optimizer, model, loss_fn, x, y) -> float`` where
``loss_fn(output, y)`` returns the *per-sample* losses, shape ``(B,)``; they return the batch's
mean loss before the step. Three are provided: :func:`gradient_step` (backward, then
``optimizer.step()``), :func:`closure_step` (``optimizer.step(closure)`` with a closure that
returns the scalar loss after ``backward``: L-BFGS and other line-search methods) and
:func:`per_sample_closure_step` (the closure returns the per-sample loss vector and does not
call ``backward``: Sven's contract).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from torchsteer.bench.memory import peak_memory
from torchsteer.bench.registry import Context, Run

__all__ = [
    "Method",
    "closure_step",
    "gradient_step",
    "lbfgs_method",
    "mlp",
    "optimizer_state_bytes",
    "peak_step_memory",
    "per_sample_closure_step",
    "sweep",
    "time_to_target",
    "torch_method",
    "train",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepFn = Callable[[torch.optim.Optimizer, nn.Module, LossFn, torch.Tensor, torch.Tensor], float]
MetricFn = Callable[[nn.Module], float]


def gradient_step(optimizer, model, loss_fn, x, y) -> float:
    """One plain step: ``zero_grad``, mean loss, ``backward``, ``optimizer.step()``."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def closure_step(optimizer, model, loss_fn, x, y) -> float:
    """``optimizer.step(closure)``; the closure zeroes grads, returns the mean loss after backward.

    Returns the loss of the first closure evaluation (the loss before the step).
    """
    first: list[float] = []

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y).mean()
        loss.backward()
        if not first:
            first.append(loss.item())
        return loss

    optimizer.step(closure)
    return first[0] if first else float("nan")


def per_sample_closure_step(optimizer, model, loss_fn, x, y) -> float:
    """``optimizer.step(closure)`` whose closure returns the per-sample losses ``(B,)``.

    The closure zeroes gradients and does not call ``backward`` (Sven-style optimizers
    differentiate the per-sample losses themselves). Returns the first evaluation's mean.
    """
    first: list[float] = []

    def closure():
        optimizer.zero_grad(set_to_none=True)
        losses = loss_fn(model(x), y)
        if not first:
            first.append(losses.detach().mean().item())
        return losses

    optimizer.step(closure)
    return first[0] if first else float("nan")


@dataclasses.dataclass(kw_only=True)
class Method:
    """One arm of a suite.

    Attributes:
        name: display name (``"Adam lr=1e-3"``); unique within a suite.
        make: ``make(model) -> optimizer``; gets the model so that optimizers needing a
            functional forward can take it.
        step: the step function (see the module docstring).
        full_batch: every step sees the whole training set (L-BFGS) instead of minibatches.
        steps: number of optimizer steps for this arm; ``None`` = the suite's budget.
    """

    name: str
    make: Callable[[nn.Module], torch.optim.Optimizer]
    step: StepFn = gradient_step
    full_batch: bool = False
    steps: int | None = None


def torch_method(name: str, cls: type[torch.optim.Optimizer], **hyper) -> Method:
    """A minibatch arm for a ``torch.optim`` class, e.g. ``torch_method("Adam", Adam, lr=1e-3)``."""
    return Method(name=name, make=lambda model: cls(model.parameters(), **hyper))


def lbfgs_method(
    steps: int, *, name: str = "L-BFGS", max_iter: int = 20, history_size: int = 10, **options
) -> Method:
    """Full-batch ``torch.optim.LBFGS`` with the strong-Wolfe line search.

    ``options`` go to ``torch.optim.LBFGS`` (``tolerance_grad``, ``tolerance_change``, ...).
    """

    def make(model):
        return torch.optim.LBFGS(
            model.parameters(),
            lr=1.0,
            max_iter=max_iter,
            history_size=history_size,
            line_search_fn="strong_wolfe",
            **options,
        )

    return Method(name=name, make=make, step=closure_step, full_batch=True, steps=steps)


def mlp(
    sizes: Sequence[int],
    activation: type[nn.Module] = nn.GELU,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]`` with PyTorch's default init.

    The initialization is drawn with the global RNG seeded by ``seed`` inside
    ``torch.random.fork_rng``, so the caller's RNG state is left as it was.
    """
    if len(sizes) < 2:
        raise ValueError(f"Invalid sizes: {list(sizes)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b, dtype=dtype))
            if i < len(sizes) - 2:
                layers.append(activation())
        model = nn.Sequential(*layers)
    return model


def time_to_target(
    cpu_time: Sequence[float], metric: Sequence[float], target: float, higher_is_better: bool
) -> float | None:
    """CPU time of the first recorded point whose metric reaches ``target`` (else ``None``).

    Reaching means ``metric >= target`` when higher is better, ``metric <= target`` otherwise;
    NaN never reaches.
    """
    for t, m in zip(cpu_time, metric):
        if (m >= target) if higher_is_better else (m <= target):
            return float(t)
    return None


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of all tensors held (also inside lists/dicts) in ``optimizer.state``."""

    def size(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(size(v) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(size(v) for v in obj)
        return 0

    return sum(size(s) for s in optimizer.state.values())


def peak_step_memory(
    method: Method,
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int = 2,
) -> int | None:
    """Peak CPU bytes torch allocates during ``steps`` steps of ``method`` on ``(x, y)``.

    Runs on a deep copy of ``model`` with a fresh optimizer (the RNG state is restored after),
    measured by :func:`torchsteer.bench.memory.peak_memory` (torch's allocations only): the
    peak of the running sum of the profiler's allocation events, above the start. Returns
    ``None`` when the profiler does not expose its memory events.
    """
    probe = copy.deepcopy(model)
    optimizer = method.make(probe)

    def steps_on_probe():
        for _ in range(steps):
            method.step(optimizer, probe, loss_fn, x, y)

    return peak_memory(steps_on_probe)


def _evaluate(model, loss_fn, x, y, metric_fn) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = loss_fn(model(x), y).mean().item()
        metric = float(metric_fn(model)) if metric_fn is not None else float("nan")
    model.train(was_training)
    return loss, metric


def train(
    method: Method,
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    suite: str,
    seed: int,
    steps: int,
    batch_size: int,
    eval_every: int,
    metric_fn: MetricFn | None = None,
    target: float | None = None,
    higher_is_better: bool = True,
    clock: Callable[[], float] = time.process_time,
    measure_memory: bool = True,
) -> Run:
    """Train ``model`` with ``method`` and record the curve as a :class:`Run`.

    Args:
        method: the arm; ``method.steps`` overrides ``steps``.
        model: the freshly initialized model (trained in place).
        loss_fn: per-sample loss, ``loss_fn(model(x), y)`` of shape ``(B,)``.
        x: the training inputs.
        y: the training targets.
        suite: the suite's name, stored in the Run.
        seed: stored in the Run; also seeds the minibatch order.
        steps: optimizer steps (minibatch arms draw epochs of shuffled batches of
            ``batch_size``, the last smaller batch of an epoch kept).
        eval_every: record the full training loss and metric every this many steps (a
            full-batch arm records every ``max(1, eval_every * steps_m / steps)`` steps, so
            every arm has about the same number of points).
        metric_fn: ``metric_fn(model) -> float`` on held-out data (under ``no_grad``).
        target: metric value for ``time_to_target``; direction from ``higher_is_better``.
        clock: CPU clock (tests pass a fake one).
        measure_memory: set ``Run.peak_memory`` (on CPU: :func:`peak_step_memory` on the
            first batch, before training).

    Training stops early, marking ``extra["diverged"]``, when a loss is NaN or infinite.
    """
    n = x.shape[0]
    total = method.steps if method.steps is not None else steps
    every = max(1, round(eval_every * total / steps)) if method.steps is not None else eval_every
    optimizer = method.make(model)
    gen = torch.Generator().manual_seed(seed)
    run = Run(suite=suite, method=method.name, seed=seed)
    cuda = x.is_cuda and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats(x.device)
        base_memory = torch.cuda.memory_allocated(x.device)
    elif measure_memory:
        probe = (x, y) if method.full_batch else (x[:batch_size], y[:batch_size])
        run.peak_memory = peak_step_memory(method, model, loss_fn, *probe)
    run.record(0, 0.0, *_evaluate(model, loss_fn, x, y, metric_fn))
    order = torch.empty(0, dtype=torch.long)
    pos, spent, diverged, done = 0, 0.0, False, 0
    for step in range(1, total + 1):
        if method.full_batch:
            xb, yb = x, y
        else:
            if pos >= len(order):
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + batch_size]
            pos += batch_size
            xb, yb = x[idx], y[idx]
        start = clock()
        batch_loss = method.step(optimizer, model, loss_fn, xb, yb)
        spent += clock() - start
        done = step
        diverged = not math.isfinite(batch_loss)
        if diverged or step % every == 0 or step == total:
            loss, metric = _evaluate(model, loss_fn, x, y, metric_fn)
            run.record(step, spent, loss, metric)
            if diverged or not math.isfinite(loss):
                diverged = True
                break
    run.step_time = spent / done if done else None
    if target is not None:
        run.time_to_target = time_to_target(run.cpu_time, run.metric, target, higher_is_better)
    if cuda:
        run.peak_memory = torch.cuda.max_memory_allocated(x.device) - base_memory
    run.extra["state_bytes"] = optimizer_state_bytes(optimizer)
    if diverged:
        run.extra["diverged"] = True
    if isinstance(optimizer, torch.optim.LBFGS):
        state = optimizer.state[next(iter(model.parameters()))]
        run.extra["func_evals"] = int(state.get("func_evals", 0))
    return run


def sweep(
    ctx: Context,
    arms: Callable[[], Sequence[Method]],
    make_model: Callable[[int], nn.Module],
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    **train_kwargs,
) -> list[Run]:
    """:func:`train` for every arm on every seed of ``ctx``, seeds outermost.

    ``arms()`` is called once per seed and ``make_model(seed)`` once per run, so every arm
    starts from the same fresh model of its seed; ``ctx.advance()`` follows each run.
    ``train_kwargs`` go to :func:`train` as they are (``suite``, ``steps``, ``metric_fn`` ...).
    """
    runs = []
    for seed in ctx.seeds:
        for method in arms():
            runs.append(train(method, make_model(seed), loss_fn, x, y, seed=seed, **train_kwargs))
            ctx.advance()
    return runs
