"""One-step learning-rate spikes on digits: plain Adam, clipping, and the softmax radius limiter.

Setup (the "ghosts of softmax" experiment): scikit-learn digits, features / 16, the first
20 % of the rows as the test set; full-batch Adam (0.9, 0.999, 1e-8) at lr 0.015 for 200
steps, the learning rate multiplied by ``spike`` for the single step 50. Models: a small
Transformer (8 row tokens of 8 pixels, d = 32, 4 heads, attention written out by hand: the
fused eval path of ``nn.MultiheadAttention`` has no forward-mode derivative), an MLP with
LayerNorm (3 x 64, GELU) and a CNN with BatchNorm on the 8 x 8 images (16 and 32 channels). Arms:

* ``plain``: Adam;
* ``clip``: Adam after ``clip_grad_norm_(1.0)``;
* ``limiter``: :class:`~torchsteer.control.radius.RadiusLimiter` on the actual update (the
  paper's method, ``r_max = 1``);
* ``limiter -g``: the released code's variant (radius along -g, limiting ``lr |g|``).

The metric is the final test accuracy; ``Run.extra`` keeps ``spike``, ``model``, ``arm`` and,
for the limiter arms, the per-step ``r`` (before limiting) and ``scale``. Each run trains the
50 steps before the spike once and branches for every spike size (the trajectories are
identical up to the spike). Quick mode: the 10,000x spike, seed 0, the MLP and the
Transformer, 100 steps (50 after the spike) on the first 720 training rows (the test set is
the same). Full mode: 200 steps on all the training rows, spikes 1x (none), 10x, 100x,
1,000x, 10,000x and all three models. ``peak_memory``: two steps on a copy of the fresh
state, torch's CPU allocations (:mod:`torchsteer.bench.memory`).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from torchsteer.bench import data
from torchsteer.bench.memory import peak_memory
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.control.radius import RadiusLimiter

__all__ = ["ARMS", "MODELS", "make_model", "run", "run_branches"]

NAME = "lr-spike"
LR, STEPS, SPIKE_AT = 0.015, 200, 50
FULL_SPIKES = (1, 10, 100, 1_000, 10_000)
QUICK_SPIKES = (10_000,)
QUICK_STEPS, QUICK_TRAIN = 100, 720  # quick: 50 steps after the spike, half the training rows
ARMS = ("plain", "clip", "limiter", "limiter -g")


class Transformer(nn.Module):
    """One pre-norm block over 8 row tokens, mean-pooled; attention written out by hand."""

    def __init__(self, d: int = 32, heads: int = 4, tokens: int = 8):
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.embed = nn.Linear(64 // tokens, d)
        self.pos = nn.Parameter(0.02 * torch.randn(tokens, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn1, self.ffn2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        b = x.shape[0]
        h = self.embed(x.reshape(b, self.tokens, -1)) + self.pos
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, self.tokens, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        h = h + self.out((att @ v).transpose(1, 2).reshape(b, self.tokens, -1))
        h = h + self.ffn2(F.gelu(self.ffn1(self.norm2(h))))
        return self.head(h.mean(1))


class MLPLN(nn.Module):
    """64 -> 3 x (Linear 64, LayerNorm, GELU) -> 10."""

    def __init__(self, d: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Linear(64 if i == 0 else d, d), nn.LayerNorm(d), nn.GELU()]
        self.body, self.head = nn.Sequential(*layers), nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.body(x))


class CNNBN(nn.Module):
    """The 8 x 8 image: 2 x (Conv2d 3x3, BatchNorm, ReLU), 2x2 max-pool, flatten, Linear."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, d, 3, padding=1), nn.BatchNorm2d(d)
        self.conv2, self.bn2 = nn.Conv2d(d, 2 * d, 3, padding=1), nn.BatchNorm2d(2 * d)
        self.head = nn.Linear(2 * d * 4 * 4, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x.reshape(-1, 1, 8, 8))))
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        return self.head(h.flatten(1))


MODELS = {"Transformer": Transformer, "MLP+LN": MLPLN, "CNN+BN": CNNBN}


def make_model(name: str, seed: int) -> nn.Module:
    """The model ``name`` initialized from ``seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def _accuracy(model, x, y) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).double().mean().item()
    model.train(was)
    return acc


def _step(arm, model, opt, limiter, x, y) -> float:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if arm == "clip":
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if limiter is None:
        opt.step()
    else:
        limiter.step(opt, x)
    return loss.item()


def _train(state, arm, steps, spike, x, y, xt, yt, run, clock_state):
    model, opt, limiter = state
    for t in steps:
        for g in opt.param_groups:
            g["lr"] = LR * (spike if t == SPIKE_AT else 1)
        start = time.process_time()
        loss = _step(arm, model, opt, limiter, x, y)
        clock_state[0] += time.process_time() - start
        clock_state[1] += 1
        if limiter is not None:
            run.extra["r"].append(limiter.signals["r"])
            run.extra["scale"].append(limiter.signals["scale"])
        if t % 5 == 4 or SPIKE_AT - 2 <= t <= SPIKE_AT + 10 or t == STEPS - 1:
            run.record(t + 1, clock_state[0], loss, _accuracy(model, xt, yt))


def run_branches(
    model_name: str, arm: str, seed: int, spikes, steps: int = STEPS, n_train: int | None = None
) -> list[Run]:
    """One (model, arm, seed): the steps before the spike once, then one branch per spike.

    ``n_train`` keeps the first rows of the training set (``None``: all); ``peak_memory`` is
    measured on two steps of a copy of the fresh model, optimizer and limiter
    (:func:`torchsteer.bench.memory.peak_memory`, torch's CPU allocations).
    """
    x, y, xt, yt = data.digits()
    x, y = x[:n_train], y[:n_train]
    model = make_model(model_name, seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    limiter = None
    if arm.startswith("limiter"):
        limiter = RadiusLimiter(model, direction="neg_grad" if arm.endswith("-g") else "update")
    method = f"{model_name} | {arm}"
    head = Run(suite=NAME, method=method, seed=seed, extra={"r": [], "scale": []})
    probe = copy.deepcopy((model, opt, limiter))
    head.peak_memory = peak_memory(lambda: [_step(arm, *probe, x, y) for _ in range(2)])
    head.record(0, 0.0, float("nan"), _accuracy(model, xt, yt))
    clock = [0.0, 0]
    _train((model, opt, limiter), arm, range(SPIKE_AT), 1, x, y, xt, yt, head, clock)
    runs = []
    for spike in spikes:
        state = copy.deepcopy((model, opt, limiter))
        run = copy.deepcopy(head)
        run.method = f"{method} | {spike:g}x"
        branch_clock = list(clock)
        _train(state, arm, range(SPIKE_AT, steps), spike, x, y, xt, yt, run, branch_clock)
        run.step_time = branch_clock[0] / branch_clock[1]
        run.extra.update(model=model_name, arm=arm, spike=spike)
        if arm == "plain":
            run.extra["baseline"] = True
        runs.append(run)
    return runs


def jobs(quick: bool, seeds) -> list[tuple[str, str, int]]:
    """The (model, arm, seed) units of a configuration."""
    models = ("MLP+LN", "Transformer") if quick else tuple(MODELS)
    return [(m, a, s) for s in seeds for m in models for a in ARMS]


def run(ctx: Context) -> list[Run]:
    spikes = QUICK_SPIKES if ctx.quick else FULL_SPIKES
    steps, n_train = (QUICK_STEPS, QUICK_TRAIN) if ctx.quick else (STEPS, None)
    out = []
    for model_name, arm, seed in jobs(ctx.quick, ctx.seeds):
        out += run_branches(model_name, arm, seed, spikes, steps, n_train)
        ctx.advance()
    return out


register(
    Suite(
        name=NAME,
        description="digits, full-batch Adam with a one-step lr spike: plain, clip, radius limiter",
        run=run,
        units=lambda quick, seeds: len(jobs(quick, seeds)),
        metric_name="test acc",
        loss_name="train CE",
        baseline=None,
        higher_is_better=True,
        log_loss=True,
    )
)
