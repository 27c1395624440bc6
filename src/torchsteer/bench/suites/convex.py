"""The ``convex`` suite: RegularizedNewton against SciPy's second-order methods and L-BFGS.

Problems (:mod:`._convex_problems`): L2-regularized logistic regression (synthetic,
n = 2000, d in {100, 1000}, mu = 1e-4; breast-cancer, standardized), softmax regression on
digits (d = 640) and a small non-convex tanh MLP on 500 digits. Every arm starts from the same
point (0 for the convex problems), runs on one thread, and stops at ``f - f* <= 1e-8`` with
``f*`` from a Newton polish to ``|g| <= 1e-12`` (the MLP: at a fixed iteration budget, target
``f <= 0.05``).

Arms: RegularizedNewton with each curvature and solver and the sqrt rule; SciPy
``trust-exact`` (dense Hessian), ``trust-krylov`` and ``Newton-CG`` (Hessian-vector products),
``L-BFGS-B``; ``torch.optim.LBFGS`` (strong Wolfe); gradient descent with a backtracking line
search. SciPy and gradient descent get closed-form NumPy oracles, the torch arms autograd.

Each :class:`~torchsteer.bench.registry.Run` records ``loss = f`` and ``metric = f - f*``
per iteration, CPU time to the target in ``time_to_target`` and, in ``extra``: ``problem``,
``arm``, ``iterations`` (to the target, else run), ``solves`` (subproblem solves, rejected
tries included: RegularizedNewton's tries, SciPy trust-region iterations, Newton-CG's CG
solves; None for the first-order arms), ``accepted`` (steps that moved x), ``fg_calls``
(function and gradient evaluations), ``hvp_calls`` (curvature-vector products), ``hessians``
(dense curvature matrices), ``reached``; ``peak_memory`` from two iterations of a second
run. ``iterations`` is what each method calls one: an
accepted step for RegularizedNewton and torch L-BFGS, SciPy's iteration count (one per
subproblem solve, rejected trust-region steps included) for SciPy. Quick mode: d = 100,
breast-cancer, digits and the MLP (~50 CPU s with the memory probes).

References:
    Semenov, Jaggi, Doikov, arXiv:2506.13710 (2026).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from torchsteer.bench.memory import peak_memory
from torchsteer.bench.registry import Context, Run, Suite, register
from torchsteer.bench.suites import _convex_problems as problems
from torchsteer.bench.suites._convex_arms import (
    MLP_TARGET,
    NAME,
    TOL,
    Arm,
    gradient_descent_arm,
    newton_arm,
    scipy_arm,
    small_or_quick_cheap,
    torch_lbfgs_arm,
)

__all__ = ["MLP_TARGET", "TOL", "Arm", "arms", "make_problems", "newton_arm", "run", "run_arm"]


def arms(nonconvex: bool = False) -> list[Arm]:
    """The arms, in table order (the MLP gets the Gauss-Newton, Fisher and first-order ones).

    Arms that build dense per-sample or output-space matrices run where those fit (``fits``).
    """
    if nonconvex:
        return [
            newton_arm("RN gauss_newton/cg", curvature="gauss_newton", cg_maxiter=100),
            newton_arm(
                "RN gauss_newton/cholesky",
                dense=True,
                curvature="gauss_newton",
                solver="cholesky",
                fits=lambda p, quick: not quick and p.n_outputs <= 5000,
            ),
            newton_arm("RN hessian/cg", curvature="hessian", cg_maxiter=100),
            newton_arm(
                "RN empirical_fisher/woodbury",
                kind="linear",
                curvature="empirical_fisher",
                fits=lambda p, quick: p.n_samples <= 300,
            ),
            torch_lbfgs_arm(),
        ]
    return [
        newton_arm("RN hessian/cg", curvature="hessian"),
        newton_arm(
            "RN dense/cholesky",
            dense=True,
            curvature="dense",
            fits=lambda p, quick: not (quick and p.d > 500),
        ),
        newton_arm("RN gauss_newton/cg", curvature="gauss_newton"),
        newton_arm(
            "RN gauss_newton/cholesky",
            dense=True,
            curvature="gauss_newton",
            solver="cholesky",
            fits=lambda p, quick: p.n_outputs <= (600 if quick else 3000),
        ),
        newton_arm("RN sqrt/cg", curvature="hessian", regularization="sqrt"),
        newton_arm(
            "RN empirical_fisher/woodbury",
            kind="linear",
            curvature="empirical_fisher",
            fits=small_or_quick_cheap(1e5),
        ),
        newton_arm(
            "RN empirical_fisher/cg",
            kind="linear",
            curvature="empirical_fisher",
            solver="cg",
            fits=small_or_quick_cheap(3e6),
        ),
        scipy_arm("trust-exact", dense=True),
        scipy_arm("trust-krylov"),
        scipy_arm("Newton-CG"),
        scipy_arm("L-BFGS-B"),
        torch_lbfgs_arm(),
        gradient_descent_arm(),
    ]


def make_problems(quick: bool, polish: bool = True) -> list[problems.Problem]:
    """The problems of a mode, with ``f_star`` filled in by a Newton polish."""
    out = [problems.logistic_synthetic(100)]
    if not quick:
        out.append(problems.logistic_synthetic(1000))
    out += [problems.logistic_breast_cancer(), problems.softmax_digits()]
    for p in out if polish else []:
        _, p.f_star, gnorm = problems.newton_polish(p, np.zeros(p.d), maxiter=100)
        if gnorm > 1e-12:
            warnings.warn(f"{p.name}: Newton polish stopped at |g| = {gnorm:.2e}", stacklevel=2)
    out.append(problems.mlp_digits(n=300 if quick else 500))
    return out


def budget(arm: Arm, quick: bool) -> int:
    """Iteration budget: Newton-type 50, linear (Fisher) 100 / 500, first-order 1000 / 5000."""
    return {"newton": 50, "linear": 100 if quick else 500, "first-order": 1000 if quick else 5000}[
        arm.kind
    ]


def run_arm(arm: Arm, problem: problems.Problem, quick: bool, seed: int = 0) -> Run:
    """One arm on one problem, labelled ``"<problem> | <arm>"``.

    ``peak_memory``: a second run of the arm from the same start, two iterations, after the
    timed one: torch's CPU allocations plus what tracemalloc traces (Python objects and NumPy
    arrays: the SciPy and gradient-descent arms compute in NumPy), see
    :mod:`torchsteer.bench.memory`.
    """
    torch.manual_seed(seed)
    r = arm.run(problem, budget(arm, quick))
    r.peak_memory = peak_memory(lambda: arm.run(problem, 2), python=True)
    r.method, r.seed = f"{problem.name} | {arm.name}", seed
    r.extra.update(problem=problem.name, arm=arm.name, d=problem.d)
    return r


def _pairs(probs, quick: bool):
    for p in probs:
        for a in arms(nonconvex=not p.convex):
            if not (a.needs_numpy and p.fg is None) and a.fits(p, quick):
                yield p, a


def run(ctx: Context) -> list[Run]:
    """Every (problem, arm) on every seed (the data and start are fixed; seeds repeat)."""
    from threadpoolctl import threadpool_limits

    runs = []
    with threadpool_limits(limits=1):  # NumPy/SciPy's BLAS on one thread, as torch
        probs = make_problems(ctx.quick)
        for seed in ctx.seeds:
            for problem, arm in _pairs(probs, ctx.quick):
                runs.append(run_arm(arm, problem, ctx.quick, seed))
                ctx.advance()
    return runs


def _units(quick: bool, seeds: list[int]) -> int:
    return len(seeds) * len(list(_pairs(make_problems(quick, polish=False), quick)))


register(
    Suite(
        name=NAME,
        description="logistic / softmax regression and a small MLP: f - f* <= 1e-8 (MLP: f)",
        run=run,
        units=_units,
        metric_name="f - f* (MLP: f)",
        loss_name="f",
        baseline=None,
        higher_is_better=False,
        target=TOL,
    )
)
