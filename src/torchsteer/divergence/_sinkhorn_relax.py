"""A safe over-relaxation for Sinkhorn: the relaxation factor of each half-step, per pair.

Sinkhorn minimises the convex dual (a Lyapunov function of the iterations)

    E(f, g) = eps sum_ij a_i b_j exp((f_i + g_j - C_ij) / eps) - <a, f> - <b, g>,

bounded below by -OT_eps(a, b), one block at a time. With l_i = log(rho_i), rho_i the ratio
of the plan's i-th row sum to a_i, the exact f-step is f_i <- f_i - eps l_i and the relaxed
step (Thibault et al. 2017) f_i <- f_i - omega eps l_i changes E by

    eps D(omega),   D(omega) = sum_i a_i [phi((1 - omega) l_i) - phi(l_i)],   phi(x) = e^x - 1 - x,

convex in omega with D(0) = 0 and its minimum at omega = 1 (the exact step),
D(1) = -sum_i a_i phi(l_i) <= 0; near the optimum D(omega) ~ omega (2 - omega) D(1). The rule:
take the target omega when it keeps at least a fraction ``theta`` of the exact step's decrease,

    D(omega) <= theta D(1)
    <=>  sum_i a_i phi((1 - omega) l_i) <= (1 - theta) sum_i a_i phi(l_i),

else halve omega - 1 (``HALVINGS`` times), else omega = 1, which always satisfies it. Then
every half-step decreases E by at least theta eps sum_i a_i phi(l_i); E being bounded below,
sum_k sum_i a_i phi(l_i^k) < inf, so l -> 0: the marginal errors tend to 0 and the stopping
test is reached for any target omega in (0, 2) (the same Lyapunov argument as Thibault et
al.'s, with a sufficient-decrease test in place of their bound). The g-step is the same with
b and the column ratios.

A cheap sufficient test comes first: phi(x) = e^xi x^2 / 2 for some xi between 0 and x
(Taylor), so with m = max_i |l_i| the left side is at most (1 - omega)^2 e^{|1 - omega| m}
sum_i a_i l_i^2 / 2 and the right side at least (1 - theta) e^{-m} sum_i a_i l_i^2 / 2: the
test holds whenever (1 - omega)^2 e^{(1 + |1 - omega|) m} <= 1 - theta (omega = 1.8:
m <= 0.19), which needs only m. The exact sums are formed only for the pairs it leaves.
"""

from __future__ import annotations

import torch

THETA = 0.1  # near the optimum accepts omega (2 - omega) >= theta: omega <= 1.948
HALVINGS = 4


def phi(x: torch.Tensor) -> torch.Tensor:
    """e^x - 1 - x without cancellation for small |x| (series below 1e-2)."""
    series = 0.5 * x * x * (1.0 + x / 3.0 * (1.0 + 0.25 * x * (1.0 + 0.2 * x)))
    return torch.where(x.abs() < 1e-2, series, torch.expm1(x) - x)


def safe_omega(
    weights: torch.Tensor, log_ratio: torch.Tensor, omega: float, theta: float = THETA
) -> torch.Tensor:
    """Per pair (rows of ``weights`` / ``log_ratio``, shape (pairs, n)), the relaxation
    factor, shape (pairs, 1): the target ``omega``, or omega - 1 halved until
    D(omega) <= theta D(1) (module docstring), else 1."""
    w = float(omega)
    m = log_ratio.abs().amax(-1, keepdim=True)
    cheap = (1.0 - w) ** 2 * torch.exp((1.0 + abs(1.0 - w)) * m) <= 1.0 - theta  # NaN: False
    out = torch.where(cheap, torch.full_like(m, w), torch.ones_like(m))
    todo = ~cheap
    if w == 1.0 or not bool(todo.any()):
        return out
    bound = (1.0 - theta) * (weights * phi(log_ratio)).sum(-1, keepdim=True)
    for _ in range(HALVINGS + 1):
        if w == 1.0:
            break
        ok = (weights * phi((1.0 - w) * log_ratio)).sum(-1, keepdim=True) <= bound
        take = todo & ok
        out = torch.where(take, torch.full_like(out, w), out)
        todo = todo & ~ok
        if not bool(todo.any()):
            break
        w = 1.0 + 0.5 * (w - 1.0)
    return out


def relaxed_scaling(weights, U, log_ratio, omega):
    """The safe relaxed scaling step U e^{-w l} (= U^{1-w} (a / K v)^w), w per pair."""
    return U * torch.exp(-safe_omega(weights, log_ratio, omega) * log_ratio)
