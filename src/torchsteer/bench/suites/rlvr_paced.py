"""RLVR difficulty toy: PACED prompt weights and APO's difficulty-adaptive KL against uniform.

The task and policy are those of :mod:`~torchsteer.bench.suites.rlvr_diversity` (64 prompts
whose reference pass rates spread from ~0 to ~1, a shared-parameter policy, the verifiable
reward 1[a mod 16 = s_i]); each step samples G = 16 answers per prompt and the group
advantages are adv = (r - mean) / (std + 1e-6). With p_i = (correct in prompt i's group) / G:

- ``uniform``: loss = -mean_{i,g} adv_ig log pi(a_ig);
- ``PACED a=..,b=..``: loss = -mean_{i,g} w_i adv_ig log pi(a_ig), w_i = p_i^a (1 - p_i)^b
  normalized to mean 1 over the prompts (:class:`~torchsteer.objectives.PACEDWeights`);
- ``reverse KL beta=..``: uniform + beta mean_{i,g} KL_ig (the per-sample reverse-KL penalty
  of :func:`~torchsteer.objectives.divergence_penalty`);
- ``APO beta=..``: uniform + beta mean_{i,g} omega_ig KL_ig with APO's DADS weights
  omega = 1 - e^{-e p_i} for samples with adv > 0 (1 otherwise, and at p_i in {0, 1}):
  :class:`~torchsteer.objectives.DifficultyAdaptiveKL` over a fixed coefficient.

Every arm sees the same number of samples per step, so the training curve of the batch reward
is the reward per sample drawn. Metrics: the batch reward averaged over training
(``reward_avg``), the exact pass@1 / pass@256 and KL at the end, and the exact pass@1 along the
way (``Run.metric``).
"""

from __future__ import annotations

import dataclasses
import time

import torch

from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.bench.suites.rlvr_diversity import Config as TaskConfig
from torchsteer.bench.suites.rlvr_diversity import Policy, evaluate, make_task, reward
from torchsteer.control.kl import FixedKLController
from torchsteer.objectives import DifficultyAdaptiveKL, PACEDWeights, divergence_penalty

__all__ = ["Config", "arms", "run", "train_arm"]

NAME = "rlvr-paced"


@dataclasses.dataclass(kw_only=True)
class Config:
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    steps: int = 150
    eval_every: int = 10
    paced: tuple[tuple[float, float], ...] = ((1.0, 1.0), (0.5, 0.5))
    beta: float = 0.3


QUICK = Config(steps=60, paced=((1.0, 1.0),))
FULL = Config()


def arms(cfg: Config) -> list[str]:
    out = ["uniform"] + [f"PACED a={a:g},b={b:g}" for a, b in cfg.paced]
    return [*out, f"reverse KL beta={cfg.beta:g}", f"APO beta={cfg.beta:g}"]


def _weights(arm: str, p: torch.Tensor, paced: PACEDWeights | None) -> torch.Tensor:
    if paced is None:
        return torch.ones_like(p)
    return paced.update(pass_rate=p.double()).to(p.dtype)


def train_arm(arm: str, seed: int, cfg: Config) -> Run:
    tc = cfg.task
    task = make_task(seed, tc)
    policy = Policy(task, tc, seed)
    opt = torch.optim.Adam(policy.parameters(), lr=tc.lr)
    paced = ctl = None
    if arm.startswith("PACED"):
        a, b = (float(x.split("=")[1]) for x in arm[6:].split(","))
        paced = PACEDWeights(a=a, b=b)
    if arm.startswith("APO"):
        ctl = DifficultyAdaptiveKL(FixedKLController(cfg.beta))
    kl_on = arm.startswith(("APO", "reverse KL"))
    gen = torch.Generator().manual_seed(seed)
    ref_all = torch.log_softmax(task.ref, -1)
    run = Run(suite=NAME, method=arm, seed=seed)
    rewards, weights, cpu = [], [], 0.0
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0:
            m = evaluate(task, policy().detach())
            run.record(step, cpu, m["kl"], m["pass@1"])
        if step == cfg.steps:
            break
        t0 = time.process_time()
        logp_all = torch.log_softmax(policy(), -1)
        with torch.no_grad():
            ys = torch.multinomial(logp_all.exp(), tc.group, True, generator=gen)
            r = reward(task, torch.arange(tc.prompts)[:, None].expand_as(ys), ys)
            adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
            p = r.mean(1)
            w = _weights(arm, p, paced)
        lp = logp_all.gather(1, ys)
        loss = -(w[:, None] * adv * lp).mean()
        if kl_on:
            kl_i = divergence_penalty(lp, ref_all.gather(1, ys), "reverse_kl", reduction="none")
            if ctl is not None:
                omega = ctl.weights(pass_rate=p.repeat_interleave(tc.group),
                                    advantages=adv.flatten())  # fmt: skip
                loss = loss + ctl.penalty(kl_i.flatten(), omega)
                weights.append(ctl.mean_weight)
            else:
                loss = loss + cfg.beta * kl_i.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cpu += time.process_time() - t0
        rewards.append(float(r.mean()))
    run.step_time = cpu / cfg.steps
    run.extra.update(evaluate(task, policy().detach()))
    run.extra["reward_avg"] = sum(rewards) / len(rewards)
    run.extra["reward_curve"] = [round(x, 5) for x in rewards]
    if weights:
        run.extra["apo_mean_weight"] = sum(weights) / len(weights)
    return run


def run(ctx: Context, config: Config | None = None) -> list[Run]:
    cfg = config or (QUICK if ctx.quick else FULL)
    return ctx.grid(arms(cfg), lambda arm, seed: train_arm(arm, seed, cfg))


register(
    Suite(
        name=NAME,
        description="RLVR prompts of spread difficulty: PACED weights, APO's adaptive KL, uniform",
        run=run,
        units=lambda quick, seeds: len(arms(QUICK if quick else FULL)) * len(seeds),
        metric_name="pass@1 (exact)",
        loss_name="KL(pi || pi_ref)",
        baseline="uniform",
        higher_is_better=True,
        log_loss=False,
    )
)
