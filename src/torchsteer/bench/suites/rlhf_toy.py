"""RLHF toy: KL control against reward hacking on a small autoregressive policy.

The policy is a table of next-token logits per (position, previous token): vocabulary V = 32,
length L = 8, so KL(pi || pi_ref) and the entropy are exact per visited prefix. The reference
pi_ref is random (logits ~ N(0, 1)), with the "spike" token s* made rarer (logit - 1). The
gold reward is the mean per-token quality, q ~ U[0, 1] per token, q(s*) = 0.1; the proxy adds
``spike`` x (fraction of s* tokens): the proxy calls s* the best token, the gold calls it one
of the worst. Along the proxy's gradient the gold first rises (mass moves to good tokens),
then falls as s* takes over: the classic over-optimization hump. Without KL control the policy
finds s*, its entropy collapses and the gold reward crashes.

Training: PPO (clip 0.2, 2 epochs per batch of 128 sampled sequences, sequence-level
advantages normalized in the batch, Adam lr 0.01). The policy's logits are
ref + table[position, previous token] + a bias shared by all contexts (so a discovered
exploit spreads at once). Loss = PPO loss + KL term, the KL being the exact per-token KL
averaged over the visited prefixes (differentiable). Every arm gets the same per-token KL
target d = 0.3 nats (SAFE's released base threshold; not tuned):

- no KL;
- fixed beta = 0.2 (TRL's initial coefficient);
- adaptive (Ziegler / TRL: beta0 0.2, horizon 10000, n_steps = batch size);
- PID Lagrangian (Kp 2, Ki 0.1, Kd 4, beta0 0.2);
- SAFE released (base threshold d; the penalty value without its gradient);
- SAFE differentiable (the same rule with the gradient).

Gains were chosen on tuning seeds 100-102, never on the reported seeds: PID from
(1, 0.05, 0), (2, 0.1, 4), (4, 0.2, 8); SAFE's ``penalty_scale`` from 30, 100, 300, 1000 (both
SAFE arms use 100). The released 0.1 is far too weak for any task whose advantages are
normalized: its gradient 0.02 g (KL_s - tau) needs KL_s - tau of order 10 nats to matter.
Full mode adds sensitivity rows: fixed 0.1 and 0.5, SAFE differentiable at the released
scale 0.1.

Metrics per run (``Run.extra``): KL tracking error after warm-up (mean |KL - d| / d over the
steps after ``warmup``), mean KL after warm-up / d, training-average proxy and gold reward,
gold in the last 50 steps, crashes (the 20-step moving average of the gold reward falls more
than 20 % below its running max within 50 steps; counted per onset), mean and final entropy.
``Run.loss`` is the per-token KL, ``Run.metric`` the gold reward, one point per step.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable

import torch

from torchsteer.bench.memory import peak_memory
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.control.kl import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    PIDKLController,
    SAFEController,
    kl_exact,
)

__all__ = [
    "ARMS",
    "EXTRA_ARMS",
    "Config",
    "arms",
    "Task",
    "crashes",
    "make_task",
    "run",
    "train_arm",
]

NAME = "rlhf-toy"


@dataclasses.dataclass(kw_only=True)
class Config:
    vocab: int = 32
    length: int = 8
    batch_size: int = 128
    steps: int = 400
    lr: float = 0.01
    epochs: int = 2
    clip: float = 0.2
    spike: float = 2.0
    spike_shift: float = -1.0
    spike_power: float = 1.0
    shared: float = 1.0
    target: float = 0.3  # per-token KL target, every arm
    warmup: int = 100
    safe_penalty_scale: float = 100.0
    extra_arms: bool = False  # the sensitivity rows (fixed 0.1 / 0.5, SAFE at scale 0.1)


QUICK = Config()
FULL = Config(extra_arms=True)


@dataclasses.dataclass
class Task:
    ref: torch.Tensor  # (L, V + 1, V) logits of pi_ref; row V is the start token
    quality: torch.Tensor  # (V,) gold per-token quality
    star: int  # the spike token


def make_task(seed: int, cfg: Config) -> Task:
    g = torch.Generator().manual_seed(10_000 + seed)
    ref = torch.randn(cfg.length, cfg.vocab + 1, cfg.vocab, generator=g)
    q = torch.rand(cfg.vocab, generator=g)
    star = int(torch.argmin(q))
    q[star] = 0.1
    ref[:, :, star] += cfg.spike_shift
    return Task(ref=ref, quality=q, star=star)


ARMS: dict[str, Callable[[Config], KLController | None]] = {
    "no KL": lambda c: None,
    "fixed": lambda c: FixedKLController(beta=0.2),
    "adaptive": lambda c: AdaptiveKLController(beta0=0.2, target=c.target, horizon=10_000),
    "PID": lambda c: PIDKLController(target=c.target, kp=2.0, ki=0.1, kd=4.0, beta0=0.2),
    "SAFE released": lambda c: SAFEController(
        base_threshold=c.target, penalty_scale=c.safe_penalty_scale, differentiable=False
    ),
    "SAFE differentiable": lambda c: SAFEController(
        base_threshold=c.target, penalty_scale=c.safe_penalty_scale, differentiable=True
    ),
}
EXTRA_ARMS: dict[str, Callable[[Config], KLController | None]] = {
    "fixed 0.1": lambda c: FixedKLController(beta=0.1),
    "fixed 0.5": lambda c: FixedKLController(beta=0.5),
    "SAFE differentiable, scale 0.1": lambda c: SAFEController(
        base_threshold=c.target, penalty_scale=0.1, differentiable=True
    ),
}


def arms(cfg: Config) -> list[str]:
    """The arm names of a configuration, in table order."""
    return list(ARMS) + (list(EXTRA_ARMS) if cfg.extra_arms else [])


def _sample(theta, cfg, gen):
    """Sample B sequences; returns tokens x and previous tokens (both (B, L))."""
    prev = torch.full((cfg.batch_size,), cfg.vocab, dtype=torch.long)
    xs, prevs = [], []
    for t in range(cfg.length):
        x = torch.multinomial(torch.softmax(theta[t, prev], -1), 1, generator=gen).squeeze(1)
        prevs.append(prev)
        xs.append(x)
        prev = x
    return torch.stack(xs, 1), torch.stack(prevs, 1)


def crashes(series: list[float], ma: int = 20, drop: float = 0.2, within: int = 50) -> int:
    """Number of crash onsets: the ``ma``-step moving average falls more than ``drop`` below
    its maximum over the preceding ``within`` steps (a new onset needs the condition to clear).
    """
    n = len(series)
    if n < ma:
        return 0
    avg = [sum(series[i - ma + 1 : i + 1]) / ma for i in range(ma - 1, n)]
    count, active = 0, False
    for i, a in enumerate(avg):
        peak = max(avg[max(0, i - within) : i + 1])
        hit = a < (1.0 - drop) * peak
        count += hit and not active
        active = hit
    return count


def _ppo_step(task, cfg, table, bias, opt, controller, gen, pos):
    """One PPO step (sample, ``cfg.epochs`` epochs, controller update); returns the batch's
    proxy and gold rewards, the per-token KL and the entropy of the first epoch."""
    with torch.no_grad():
        theta = task.ref + table + cfg.shared * bias
        x, prev = _sample(theta, cfg, gen)
        gold = task.quality[x].mean(1)
        frac = (x == task.star).to(gold.dtype).mean(1)
        proxy = gold + cfg.spike * frac**cfg.spike_power
        adv = ((proxy - proxy.mean()) / (proxy.std() + 1e-8))[:, None]
        lp_old = torch.log_softmax(theta[pos, prev], -1).gather(-1, x[..., None])[..., 0]
    for epoch in range(cfg.epochs):
        logits = task.ref[pos, prev] + table[pos, prev] + cfg.shared * bias
        logp = torch.log_softmax(logits, -1)
        ratio = (logp.gather(-1, x[..., None])[..., 0] - lp_old).exp()
        loss = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
        kl = kl_exact(logits, task.ref[pos, prev]).mean()
        if epoch == 0:
            kl_step = kl.detach()
            entropy = -(logp.exp() * logp).sum(-1).mean().detach()
        if controller is not None:
            loss = loss + controller.penalty(kl)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if controller is not None:
        controller.update(kl=kl_step, entropy=entropy, reward=proxy.mean(), n_steps=cfg.batch_size)
    return proxy, gold, kl_step, entropy


def train_arm(arm: str, seed: int, cfg: Config) -> Run:
    """Train one arm on one seed's task; returns the Run with curves and metrics."""
    task = make_task(seed, cfg)
    controller = {**ARMS, **EXTRA_ARMS}[arm](cfg)
    table = torch.zeros_like(task.ref, requires_grad=True)
    bias = torch.zeros(cfg.vocab, requires_grad=True)
    opt = torch.optim.Adam([table, bias], lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(cfg.length)
    run = Run(suite=NAME, method=arm, seed=seed)
    curves = {"proxy": [], "entropy": [], "coef": [], "threshold": []}
    cpu = 0.0
    state = (table, bias, opt, controller)
    probe = copy.deepcopy(state)
    probe_gen = torch.Generator().set_state(gen.get_state())
    run.peak_memory = peak_memory(
        lambda: [_ppo_step(task, cfg, *probe, probe_gen, pos) for _ in range(2)]
    )
    for step in range(cfg.steps):
        t0 = time.process_time()
        proxy, gold, kl_step, entropy = _ppo_step(task, cfg, *state, gen, pos)
        cpu += time.process_time() - t0
        run.record(step + 1, cpu, kl_step.item(), gold.mean().item())
        curves["proxy"].append(proxy.mean().item())
        curves["entropy"].append(entropy.item())
        curves["coef"].append(float(controller.coef) if controller is not None else 0.0)
        curves["threshold"].append(getattr(controller, "threshold", cfg.target))
    run.step_time = cpu / cfg.steps
    run.extra.update(_metrics(run, curves, cfg))
    run.extra["curves"] = {k: [round(v, 5) for v in vs] for k, vs in curves.items()}
    return run


def _metrics(run: Run, curves: dict, cfg: Config) -> dict:
    kl_after = run.loss[cfg.warmup :]
    d = cfg.target
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "target": d,
        "warmup": cfg.warmup,
        "kl_tracking_error": mean([abs(k - d) / d for k in kl_after]),
        "kl_ratio": mean(kl_after) / d,
        "kl_threshold_error": mean(
            [abs(k - t) / t for k, t in zip(kl_after, curves["threshold"][cfg.warmup - 1 : -1])]
        ),
        "kl_max": max(run.loss),
        "proxy_avg": mean(curves["proxy"]),
        "gold_avg": mean(run.metric),
        "gold_final": mean(run.metric[-50:]),
        "gold_crashes": crashes(run.metric),
        "proxy_crashes": crashes(curves["proxy"]),
        "entropy_avg": mean(curves["entropy"]),
        "entropy_final": mean(curves["entropy"][-50:]),
    }


def run(ctx: Context, config: Config | None = None) -> list[Run]:
    cfg = config or (QUICK if ctx.quick else FULL)
    return ctx.grid(arms(cfg), lambda arm, seed: train_arm(arm, seed, cfg))


register(
    Suite(
        name=NAME,
        description="KL control vs reward hacking: toy RLHF policy (V=32, L=8), 6 controllers",
        run=run,
        units=lambda quick, seeds: len(arms(QUICK if quick else FULL)) * len(seeds),
        metric_name="gold reward",
        loss_name="KL per token",
        baseline="fixed",
        higher_is_better=True,
        log_loss=False,
    )
)
