"""RLVR diversity toy: which KL penalty keeps pass@k from collapsing (DPH-RL's question).

**Task.** P prompts, A answers. Prompt i carries a residue s_i in {0, ..., M - 1}; the
verifiable reward is r(i, a) = 1[a mod M = s_i], so every prompt has A / M correct answers
(A = 64, M = 16: four). The reference pi_ref(a | i) = softmax(z_i + b_i 1[a correct])_a with
z_i ~ sigma N(0, I) (sigma = 2) and a per-prompt skill b_i spread evenly over
[``skill_lo``, ``skill_hi``] (shuffled): some prompts the reference nearly always solves,
some it solves once in thousands of tries.

**Policy (shared parameters).** logits_i = ref_i + W_2 tanh(W_1 phi_i + c_1) + c_2 with fixed
random prompt features phi_i in R^d (d = 8, hidden 32). W_2 = c_2 = 0 at the start, so
pi_0 = pi_ref exactly. Every parameter is shared by all prompts: an update made for one prompt
moves every other prompt's distribution, which is what erodes the rare correct answers of hard
prompts (with a separate table per prompt, prompts with no correct sample get no gradient and
keep their reference distribution, and the collapse disappears).

**Training** (GRPO without clipping: one on-policy update per batch). Each step samples G
answers for every prompt, the advantage is (r - mean_group) / (std_group + 1e-6), and

    loss = -mean(adv * log pi(a)) + beta * divergence_penalty(log pi(a), log pi_ref(a), kind)

on the policy's samples (:func:`torchsteer.objectives.divergence_penalty`: the expected gradient
is that of ``kind``). DPH-RL: k = 8 answers per prompt pre-sampled once from pi_ref; the prompts
the reference solves on all 8 (:func:`~torchsteer.objectives.rehearsal_prompts`, D_pef) get
only eta * forward KL on those reference samples, the others (D_exp) the policy-gradient loss
with no KL. Adam, lr 0.01. Arms: no penalty; reverse KL, forward KL, JS and DPH-RL at each
coefficient of ``betas``; and reverse KL, forward KL, JS with the coefficient set by a
:class:`~torchsteer.control.kl.PIDKLController` driving the exact KL(pi || pi_ref) to
``pid_target``.

**Metrics**, all exact from the policy's probabilities (no sampling noise): with
p_i = sum_{a correct} pi(a | i), pass@k = mean_i 1 - (1 - p_i)^k (k independent samples),
pass@1 = mean_i p_i, the expected number of distinct correct answers in 256 samples
mean_i sum_{a correct} 1 - (1 - pi(a | i))^256, KL(pi || pi_ref) and KL(pi_ref || pi) averaged
over prompts; plus the batch reward during training. At the end pass@k is also estimated from
``n_eval`` fresh samples per prompt with the unbiased estimator 1 - C(n - c, k) / C(n, k)
(:func:`pass_at_k`), a check on the exact value.

References:
    Li et al., "The Choice of Divergence: A Neglected Key to Mitigating Diversity Collapse in
    RLVR" (DPH-RL), arXiv 2509.07430 (2025). Chen et al., "Evaluating Large Language Models
    Trained on Code", arXiv 2107.03374 (2021): the unbiased pass@k estimator.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from torchsteer.bench.memory import peak_memory
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.control.kl import PIDKLController, kl_exact
from torchsteer.objectives import divergence_penalty, rehearsal_prompts

__all__ = [
    "KS",
    "Config",
    "Task",
    "Policy",
    "arms",
    "evaluate",
    "fit",
    "make_task",
    "pass_at_k",
    "pass_at_k_exact",
    "reference_metrics",
    "reward",
    "run",
    "train_arm",
]

NAME = "rlvr-diversity"
KS = (1, 8, 32, 256)  # the k of pass@k
KINDS = ("reverse_kl", "forward_kl", "js")
# the PID arms multiply the coefficient by this: near pi_ref, JS ~ KL / 4 (both ~ chi^2 / 8, / 2)
PID_SCALE = {"reverse_kl": 1.0, "forward_kl": 1.0, "js": 4.0}
LABEL = {"reverse_kl": "reverse KL", "forward_kl": "forward KL", "js": "JS", "dph": "DPH-RL"}


@dataclasses.dataclass(kw_only=True)
class Config:
    prompts: int = 64
    answers: int = 64
    modulus: int = 16  # answers / modulus correct answers per prompt
    features: int = 8
    hidden: int = 32
    sigma: float = 2.0  # scale of the reference's random logits
    skill_lo: float = -4.0  # per-prompt boost of the correct answers, spread over [lo, hi]
    skill_hi: float = 8.0
    group: int = 16  # samples per prompt per step
    steps: int = 300
    lr: float = 0.01
    betas: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 3.0, 5.0, 10.0)
    pid_target: float = 0.5  # nats, exact KL(pi || pi_ref) averaged over prompts
    pid_gains: tuple[float, float, float] = (1.0, 0.02, 0.0)  # kp, ki, kd
    pid_beta0: float = 1.0
    dph_k: int = 8  # DPH-RL's reference samples per prompt
    eval_every: int = 10
    n_eval: int = 512  # samples per prompt for the final unbiased pass@k estimate


QUICK = Config(steps=120, betas=(0.3, 3.0), eval_every=20)
FULL = Config()


@dataclasses.dataclass
class Task:
    residue: torch.Tensor  # (P,) s_i
    correct: torch.Tensor  # (P, A) bool, r(i, a) = 1
    ref: torch.Tensor  # (P, A) reference logits
    features: torch.Tensor  # (P, d)
    modulus: int


def make_task(seed: int, cfg: Config) -> Task:
    """The seed's prompts, reference and features (the initial weights: :class:`Policy`)."""
    if cfg.answers % cfg.modulus:
        raise ValueError(f"Invalid answers: {cfg.answers} (a multiple of modulus {cfg.modulus})")
    g = torch.Generator().manual_seed(20_000 + seed)
    residue = torch.randint(cfg.modulus, (cfg.prompts,), generator=g)
    a = torch.arange(cfg.answers)
    correct = (a[None, :] % cfg.modulus) == residue[:, None]
    skill = torch.linspace(cfg.skill_lo, cfg.skill_hi, cfg.prompts, dtype=torch.float64)
    skill = skill[torch.randperm(cfg.prompts, generator=g)]
    z = cfg.sigma * torch.randn(cfg.prompts, cfg.answers, generator=g, dtype=torch.float64)
    ref = (z + skill[:, None] * correct).float()
    features = torch.randn(cfg.prompts, cfg.features, generator=g)
    return Task(residue=residue, correct=correct, ref=ref, features=features, modulus=cfg.modulus)


def reward(task: Task, prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """The verifiable reward 1[answer mod M = s_prompt] (float)."""
    return (answers % task.modulus == task.residue[prompts]).float()


class Policy(torch.nn.Module):
    """logits = ref + W_2 tanh(W_1 phi + c_1) + c_2, all of W, c shared by the prompts."""

    def __init__(self, task: Task, cfg: Config, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(30_000 + seed)
        d, h = cfg.features, cfg.hidden
        self.w1 = torch.nn.Parameter(torch.randn(d, h, generator=g) / math.sqrt(d))
        self.c1 = torch.nn.Parameter(0.5 * torch.randn(h, generator=g))
        self.w2 = torch.nn.Parameter(torch.zeros(h, cfg.answers))
        self.c2 = torch.nn.Parameter(torch.zeros(cfg.answers))
        self.task = task

    def forward(self) -> torch.Tensor:
        t = self.task
        return t.ref + torch.tanh(t.features @ self.w1 + self.c1) @ self.w2 + self.c2


def pass_at_k(n: int | torch.Tensor, c: int | torch.Tensor, k: int) -> torch.Tensor:
    """The unbiased estimator 1 - C(n - c, k) / C(n, k) of pass@k from c correct of n samples.

    Computed as 1 - prod_{j = n - c + 1}^{n} (1 - k / j) in float64 (Chen et al., 2021), which
    avoids the huge binomials; exactly 1 when n - c < k. Elementwise over tensors n, c.
    """
    n = torch.as_tensor(n, dtype=torch.float64)
    c = torch.as_tensor(c, dtype=torch.float64)
    n, c = torch.broadcast_tensors(n, c)
    if (n < k).any() or (c < 0).any() or (c > n).any() or k < 1:
        raise ValueError(f"Invalid n / c / k: need 1 <= k <= n and 0 <= c <= n (k = {k})")
    out = torch.empty_like(n)
    for idx in range(n.numel()):
        ni, ci = int(n.view(-1)[idx]), int(c.view(-1)[idx])
        if ni - ci < k:
            out.view(-1)[idx] = 1.0
        else:
            j = torch.arange(ni - ci + 1, ni + 1, dtype=torch.float64)
            out.view(-1)[idx] = 1.0 - torch.prod(1.0 - k / j)
    return out


def pass_at_k_exact(p: torch.Tensor, k: int) -> torch.Tensor:
    """pass@k of a prompt whose samples are correct with probability p: 1 - (1 - p)^k."""
    p = torch.as_tensor(p, dtype=torch.float64)
    return -torch.expm1(k * torch.log1p(-p.clamp(max=1.0)))


@torch.no_grad()
def evaluate(task: Task, logits: torch.Tensor) -> dict[str, float]:
    """The exact metrics of a policy given its (P, A) logits (module docstring)."""
    logits = logits.double()
    ref = task.ref.double()
    pi = torch.softmax(logits, -1)
    pc = torch.where(task.correct, pi, 0.0)
    p = pc.sum(-1)
    out = {f"pass@{k}": float(pass_at_k_exact(p, k).mean()) for k in KS}
    out["distinct@256"] = float((-torch.expm1(256 * torch.log1p(-pc))).sum(-1).mean())
    out["kl"] = float(kl_exact(logits, ref).mean())
    out["kl_forward"] = float(kl_exact(ref, logits).mean())
    out["entropy"] = float(-(pi * torch.log_softmax(logits, -1)).sum(-1).mean())
    return out


def arms(cfg: Config) -> list[str]:
    """Arm names in table order: ``"no penalty"``, ``"<kind> beta=<b>"``, ``"PID <kind>"``."""
    out = ["no penalty"]
    for kind in (*KINDS, "dph"):
        out += [f"{LABEL[kind]} beta={b:g}" for b in cfg.betas]
    return out + [f"PID {LABEL[k]}" for k in KINDS]


def _parse(arm: str) -> tuple[str | None, float | None, bool]:
    """(kind, beta, pid) of an arm name."""
    if arm == "no penalty":
        return None, 0.0, False
    by_label = {v: k for k, v in LABEL.items()}
    if arm.startswith("PID "):
        return by_label[arm[4:]], None, True
    label, beta = arm.rsplit(" beta=", 1)
    return by_label[label], float(beta), False


def _rehearsal(task: Task, cfg: Config, seed: int):
    """DPH-RL's fixed reference samples (P, k) and the D_pef mask (P,)."""
    g = torch.Generator().manual_seed(40_000 + seed)
    ys = torch.multinomial(torch.softmax(task.ref, -1), cfg.dph_k, True, generator=g)
    pids = torch.arange(cfg.prompts)[:, None].expand_as(ys)
    n_correct = reward(task, pids, ys).sum(1)
    return ys, rehearsal_prompts(n_correct, cfg.dph_k)


def _step(task, cfg, policy, opt, kind, beta, ctl, gen, dph):
    """One GRPO step; returns the batch's mean reward and the exact KL before the update."""
    logits = policy()
    logp_all = torch.log_softmax(logits, -1)
    ref_all = torch.log_softmax(task.ref, -1)
    with torch.no_grad():
        ys = torch.multinomial(logp_all.exp(), cfg.group, True, generator=gen)
        pids = torch.arange(cfg.prompts)[:, None].expand_as(ys)
        r = reward(task, pids, ys)
        adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
        kl = kl_exact(logits, task.ref).mean()
    lp = logp_all.gather(1, ys)
    coef = PID_SCALE[kind] * ctl.coef if ctl is not None else beta
    if kind == "dph":
        ry, pef = dph
        keep = (~pef)[:, None].expand_as(ys)
        loss = -(adv * lp * keep).sum() / keep.sum().clamp(min=1)
        if pef.any():
            rl, rref = logp_all.gather(1, ry)[pef], ref_all.gather(1, ry)[pef]
            loss = loss + coef * divergence_penalty(rl, rref, "forward_kl", samples="reference")
    else:
        loss = -(adv * lp).mean()
        if kind is not None and coef > 0:
            loss = loss + coef * divergence_penalty(lp, ref_all.gather(1, ys), kind)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if ctl is not None:
        ctl.update(kl=kl, n_steps=ys.numel())
    return r.mean(), kl, coef


def train_arm(arm: str, seed: int, cfg: Config) -> Run:
    """Train one arm on one seed's task; the Run's curve is the exact pass@1 and KL."""
    return fit(arm, seed, cfg)[0]


def fit(arm: str, seed: int, cfg: Config) -> tuple[Run, Policy]:
    """:func:`train_arm`, also returning the trained policy."""
    kind, beta, pid = _parse(arm)
    task = make_task(seed, cfg)
    policy = Policy(task, cfg, seed)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    ctl = None
    if pid:
        kp, ki, kd = cfg.pid_gains
        ctl = PIDKLController(target=cfg.pid_target, kp=kp, ki=ki, kd=kd, beta0=cfg.pid_beta0)
    dph = _rehearsal(task, cfg, seed) if kind == "dph" else None
    gen = torch.Generator().manual_seed(seed)
    run = Run(suite=NAME, method=arm, seed=seed)
    state = (policy, opt, kind, beta, ctl)
    probe = copy.deepcopy(state)
    probe_gen = torch.Generator().set_state(gen.get_state())
    run.peak_memory = peak_memory(
        lambda: [_step(task, cfg, *probe, probe_gen, dph) for _ in range(2)]
    )
    curves = {k: [] for k in ("step", "reward", "coef", *evaluate(task, task.ref))}
    cpu, rewards = 0.0, []
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = evaluate(task, policy().detach())
            run.record(step, cpu, metrics["kl"], metrics["pass@1"])
            curves["step"].append(step)
            for key, v in metrics.items():
                curves[key].append(v)
            window = rewards[-cfg.eval_every :]
            curves["reward"].append(sum(window) / len(window) if window else metrics["pass@1"])
            curves["coef"].append(float(ctl.coef) if ctl is not None else beta)
        if step == cfg.steps:
            break
        t0 = time.process_time()
        r, _, _ = _step(task, cfg, *state, gen, dph)
        cpu += time.process_time() - t0
        rewards.append(float(r))
    run.step_time = cpu / cfg.steps
    final = evaluate(task, policy().detach())
    run.extra.update(final)
    run.extra["reward_avg"] = sum(rewards) / len(rewards)
    run.extra["estimated"] = _estimate(task, cfg, policy, seed)
    if dph is not None:
        run.extra["dph_pef"] = int(dph[1].sum())
    run.extra["curves"] = {k: [round(v, 6) for v in vs] for k, vs in curves.items()}
    return run, policy


@torch.no_grad()
def _estimate(task: Task, cfg: Config, policy: Policy, seed: int) -> dict[str, float]:
    """pass@k by the unbiased estimator from ``n_eval`` fresh samples per prompt."""
    g = torch.Generator().manual_seed(50_000 + seed)
    ys = torch.multinomial(torch.softmax(policy(), -1), cfg.n_eval, True, generator=g)
    pids = torch.arange(cfg.prompts)[:, None].expand_as(ys)
    c = reward(task, pids, ys).sum(1)
    return {f"pass@{k}": float(pass_at_k(cfg.n_eval, c, k).mean()) for k in KS if k <= cfg.n_eval}


def reference_metrics(seed: int, cfg: Config) -> dict[str, float]:
    """The exact metrics of pi_ref (the limit beta -> inf of every penalty)."""
    task = make_task(seed, cfg)
    return evaluate(task, task.ref)


def run(ctx: Context, config: Config | None = None, names: Sequence[str] | None = None):
    cfg = config or (QUICK if ctx.quick else FULL)
    return ctx.grid(names or arms(cfg), lambda arm, seed: train_arm(arm, seed, cfg))


register(
    Suite(
        name=NAME,
        description="RLVR pass@k collapse: shared-parameter policy, reverse/forward KL, JS, DPH-RL",
        run=run,
        units=lambda quick, seeds: len(arms(QUICK if quick else FULL)) * len(seeds),
        metric_name="pass@1 (exact)",
        loss_name="KL(pi || pi_ref)",
        baseline="no",
        higher_is_better=True,
        log_loss=False,
    )
)
