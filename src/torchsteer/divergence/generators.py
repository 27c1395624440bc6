"""f-divergence generators evaluated on the log density ratio.

Convention: q is the student, p the teacher, r = p / q, and

    D_f(p || q) = sum_v q_v f(p_v / q_v).

Each generator exposes, as functions of log r:

    f(log r)                      the generator, f(1) = 0
    psi(log r) = f(r) - r f'(r)   dD/dq_v, so dD/dz_s = q * (psi - E_q psi) / T
    weight(log r) = f''(r) r^2    the f-distill weight h(r) (Xu et al. 2025)

and ``terms(lp, lq)``: per-entry q f(p/q) and q * (psi + c) (c a constant, which cancels in
the gradient), written in log space so that entries where p or q is 0 take the limits of
the definition and entries where both are 0 contribute nothing.

Kinds: kl (f = r log r, KL(p||q), forward, mass-covering), reverse_kl (f = -log r,
KL(q||p), mode-seeking), js (1/2 [r log r - (r+1) log((r+1)/2)]), tv (|r-1|/2), hellinger
((sqrt r - 1)^2), chi2 ((r-1)^2, Pearson), alpha ((r^a - a r - (1-a)) / (a (a-1)); a = 1 is
KL(p||q), a = 0 is KL(q||p)), generalized_js (TRL: M = (1-beta) q + beta p,
beta KL(p||M) + (1-beta) KL(q||M); beta = 0 is KL(p||q), beta = 1 is KL(q||p); with
``normalized=True`` divided by beta (1-beta), continuous at both ends), skew_kl
(KL(p || lam p + (1-lam) q)) and skew_reverse_kl (KL(q || (1-lam) p + lam q)) of DistiLLM.
"""

from __future__ import annotations

import math

import torch

__all__ = ["KINDS", "Generator", "generator"]

LOG2 = math.log(2.0)
INF = math.inf


def _mul0(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a * x with 0 wherever a == 0 (0 log 0 = 0, also for x = +-inf or NaN)."""
    return torch.where(a > 0, a * x, torch.zeros_like(x))


class Generator:
    """A generator f of an f-divergence, its psi and f-distill weight, on log r."""

    kind = ""

    def __init__(self, **args):
        self.args = args

    def f(self, lr):
        raise NotImplementedError

    def psi(self, lr):
        raise NotImplementedError

    def weight(self, lr):
        raise NotImplementedError

    def terms(self, lp, lq, p, q):
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        return f"generator({self.kind!r}{', ' if args else ''}{args})"


class KL(Generator):
    kind = "kl"

    def f(self, lr):
        return torch.exp(lr) * lr

    def psi(self, lr):
        return -torch.exp(lr)

    def weight(self, lr):
        return torch.exp(lr)

    def terms(self, lp, lq, p, q):
        return _mul0(p, lp - lq), -p


class ReverseKL(Generator):
    kind = "reverse_kl"

    def f(self, lr):
        return -lr

    def psi(self, lr):
        return 1.0 - lr

    def weight(self, lr):
        return torch.ones_like(lr)

    def terms(self, lp, lq, p, q):
        t = _mul0(q, lq - lp)
        return t, t


class JS(Generator):
    kind = "js"

    def f(self, lr):
        r = torch.exp(lr)
        return 0.5 * (r * lr - (r + 1) * (torch.nn.functional.softplus(lr) - LOG2))

    def psi(self, lr):
        return -0.5 * (torch.nn.functional.softplus(lr) - LOG2)

    def weight(self, lr):
        return 0.5 * torch.sigmoid(lr)

    def terms(self, lp, lq, p, q):
        lr = lp - lq
        lmp = torch.nn.functional.softplus(-lr) - LOG2  # log(m / p), m = (p + q) / 2
        lmq = torch.nn.functional.softplus(lr) - LOG2  # log(m / q)
        qpsi = -0.5 * _mul0(q, lmq)
        return -0.5 * _mul0(p, lmp) + qpsi, qpsi


class TV(Generator):
    kind = "tv"

    def f(self, lr):
        return 0.5 * torch.abs(torch.expm1(lr))

    def psi(self, lr):
        return -0.5 * torch.sign(lr)

    def weight(self, lr):
        return torch.zeros_like(lr)  # f'' = 0 away from r = 1

    def terms(self, lp, lq, p, q):
        return 0.5 * torch.abs(p - q), -0.5 * q * torch.sign(p - q)


class Hellinger(Generator):
    kind = "hellinger"

    def f(self, lr):
        return torch.expm1(0.5 * lr) ** 2

    def psi(self, lr):
        return -torch.expm1(0.5 * lr)

    def weight(self, lr):
        return 0.5 * torch.exp(0.5 * lr)

    def terms(self, lp, lq, p, q):
        sp, sq = torch.exp(0.5 * lp), torch.exp(0.5 * lq)
        return (sp - sq) ** 2, q - sp * sq


class Chi2(Generator):
    kind = "chi2"

    def f(self, lr):
        return torch.expm1(lr) ** 2

    def psi(self, lr):
        return -torch.expm1(2 * lr)

    def weight(self, lr):
        return 2 * torch.exp(2 * lr)

    def terms(self, lp, lq, p, q):
        lr = lp - lq
        big = _mul0(p, torch.exp(lr))  # p^2 / q
        t = torch.where(lr >= 1, big - 2 * p + q, _mul0(q, torch.expm1(lr) ** 2))
        return t, q - big


class Alpha(Generator):
    kind = "alpha"

    def __init__(self, alpha=0.5):
        super().__init__(alpha=alpha)
        self.a = float(alpha)

    def f(self, lr):
        a = self.a
        if a == 1:
            return torch.exp(lr) * lr - torch.expm1(lr)
        if a == 0:
            return torch.expm1(lr) - lr
        return (torch.expm1(a * lr) - a * torch.expm1(lr)) / (a * (a - 1))

    def psi(self, lr):
        a = self.a
        return -lr if a == 0 else -torch.expm1(a * lr) / a

    def weight(self, lr):
        return torch.exp(self.a * lr)

    def terms(self, lp, lq, p, q):
        a = self.a
        if a == 1:
            t, s = KL().terms(lp, lq, p, q)
            return t - (p - q), s
        if a == 0:
            t, s = ReverseKL().terms(lp, lq, p, q)
            return t + (p - q), s
        lr = lp - lq
        big_a = _mul0(q, torch.expm1(a * lr))  # q (r^a - 1)
        if a <= 0.5:
            t = (big_a - a * (p - q)) / (a * (a - 1))
        else:
            big_b = _mul0(p, torch.expm1((a - 1) * lr))  # p (r^(a-1) - 1)
            t = (big_b - (1 - a) * (q - p)) / (a * (a - 1))
        return t, -big_a / a


class GeneralizedJS(Generator):
    kind = "generalized_js"

    def __init__(self, beta=0.5, normalized=False):
        super().__init__(beta=beta, normalized=normalized)
        self.b = float(beta)
        self.scale = 1.0 / (self.b * (1 - self.b)) if normalized and 0 < self.b < 1 else 1.0
        self.end = KL() if self.b == 0 else ReverseKL() if self.b == 1 else None

    def _log_m(self, lr):
        """log(m(r)), m = 1 - beta + beta r = M / q."""
        b = torch.tensor(math.log1p(-self.b), dtype=lr.dtype)
        return torch.logaddexp(lr + math.log(self.b), b)

    def f(self, lr):
        if self.end is not None:
            return self.end.f(lr)
        lm = self._log_m(lr)
        return self.scale * (self.b * torch.exp(lr) * (lr - lm) - (1 - self.b) * lm)

    def psi(self, lr):
        if self.end is not None:
            return self.end.psi(lr)
        return -self.scale * (1 - self.b) * self._log_m(lr)

    def weight(self, lr):
        if self.end is not None:
            return self.end.weight(lr)
        return self.scale * self.b * (1 - self.b) * torch.exp(lr - self._log_m(lr))

    def terms(self, lp, lq, p, q):
        if self.end is not None:
            return self.end.terms(lp, lq, p, q)
        b = self.b
        lr = lp - lq
        l1b, lb = math.log1p(-b), math.log(b)
        lmq = torch.logaddexp(lr + lb, torch.tensor(l1b, dtype=lr.dtype))  # log(M / q)
        lmp = torch.logaddexp(l1b - lr, torch.tensor(lb, dtype=lr.dtype))  # log(M / p)
        qpsi = -(1 - b) * _mul0(q, lmq)
        t = -b * _mul0(p, lmp) + qpsi
        return self.scale * t, self.scale * qpsi


class SkewKL(Generator):
    kind = "skew_kl"

    def __init__(self, lam=0.1):
        super().__init__(lam=lam)
        self.lam = float(lam)

    def _log_m(self, lr):
        """log(M / q) with M = lam p + (1 - lam) q."""
        lam = self.lam
        if lam == 0:
            return torch.zeros_like(lr)
        return torch.logaddexp(lr + math.log(lam), torch.tensor(math.log1p(-lam), dtype=lr.dtype))

    def f(self, lr):
        return torch.exp(lr) * (lr - self._log_m(lr))

    def psi(self, lr):
        return -(1 - self.lam) * torch.exp(lr - self._log_m(lr))

    def weight(self, lr):
        return (1 - self.lam) ** 2 * torch.exp(lr - 2 * self._log_m(lr))

    def terms(self, lp, lq, p, q):
        if self.lam == 0:
            return KL().terms(lp, lq, p, q)
        lr = lp - lq
        lmq = self._log_m(lr)
        t = _mul0(p, lr - lmq)  # p log(p / M)
        return t, -(1 - self.lam) * _mul0(p, torch.exp(-lmq))


class SkewReverseKL(Generator):
    kind = "skew_reverse_kl"

    def __init__(self, lam=0.1):
        super().__init__(lam=lam)
        self.lam = float(lam)

    def _log_m(self, lr):
        """log(M / q) with M = (1 - lam) p + lam q."""
        lam = self.lam
        if lam == 0:
            return lr
        return torch.logaddexp(lr + math.log1p(-lam), torch.tensor(math.log(lam), dtype=lr.dtype))

    def f(self, lr):
        return -self._log_m(lr)

    def psi(self, lr):
        lm = self._log_m(lr)
        return -lm + (1 - self.lam) * torch.exp(lr - lm)

    def weight(self, lr):
        return (1 - self.lam) ** 2 * torch.exp(2 * (lr - self._log_m(lr)))

    def terms(self, lp, lq, p, q):
        if self.lam == 0:
            return ReverseKL().terms(lp, lq, p, q)
        lmq = self._log_m(lp - lq)
        t = -_mul0(q, lmq)
        return t, -_mul0(q, lmq + self.lam * torch.exp(-lmq))


KINDS = {
    g.kind: g
    for g in (KL, ReverseKL, JS, TV, Hellinger, Chi2, Alpha, GeneralizedJS, SkewKL, SkewReverseKL)
}
_ARGS = {"alpha": {"alpha"}, "generalized_js": {"beta", "normalized"}}
_ARGS.update(skew_kl={"lam"}, skew_reverse_kl={"lam"})


def generator(kind: str, **args) -> Generator:
    """The generator of ``kind`` (see the module docstring) with its arguments validated.

    Raises:
        ValueError: an unknown kind, an argument the kind does not take, a NaN/Inf argument,
            beta outside [0, 1], lam outside [0, 1).
    """
    if kind not in KINDS:
        raise ValueError(f"Invalid kind: {kind!r}; expected one of {sorted(KINDS)}")
    extra = set(args) - _ARGS.get(kind, set())
    if extra:
        raise ValueError(f"Invalid argument(s) {sorted(extra)} for kind {kind!r}")
    for name in ("alpha", "beta", "lam"):
        if name in args and not math.isfinite(float(args[name])):
            raise ValueError(f"Invalid {name}: {args[name]!r} (must be finite)")
    if "beta" in args and not 0.0 <= float(args["beta"]) <= 1.0:
        raise ValueError(f"Invalid beta: {args['beta']!r} (must be in [0, 1])")
    if "lam" in args and not 0.0 <= float(args["lam"]) < 1.0:
        raise ValueError(f"Invalid lam: {args['lam']!r} (must be in [0, 1))")
    return KINDS[kind](**args)
