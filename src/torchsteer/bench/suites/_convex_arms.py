"""The arms of the ``convex`` suite: one :class:`Arm` per method, each running to the target.

``newton_arm`` (RegularizedNewton with its options), ``torch_lbfgs_arm`` (strong Wolfe),
``scipy_arm`` (SciPy's ``minimize`` methods, on the problems' NumPy oracles, with counted
calls) and ``gradient_descent_arm`` (backtracking line search). Each returns a
:class:`~torchsteer.bench.registry.Run` whose ``metric`` is ``f - f*`` (the MLP: ``f``) per
iteration; :mod:`.convex` lists and runs them.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from torchsteer.bench.registry import Run
from torchsteer.bench.suites import _convex_problems as problems
from torchsteer.optim.regularized_newton import RegularizedNewton

__all__ = [
    "LBFGS_INNER",
    "MLP_TARGET",
    "NAME",
    "TOL",
    "Arm",
    "gradient_descent_arm",
    "newton_arm",
    "scipy_arm",
    "small_or_quick_cheap",
    "torch_lbfgs_arm",
]

NAME = "convex"
TOL = 1e-8  # f - f* at which an arm has reached the target
MLP_TARGET = 0.02
LBFGS_INNER = 4  # torch.optim.LBFGS iterations per step() call


def small_or_quick_cheap(max_nd: float):
    """Expensive arms: in quick mode only on breast-cancer and the MLP; else when n d fits."""

    def fits(problem, quick):
        if quick:
            return problem.name == "breast-cancer" or not problem.convex
        return problem.n_samples * problem.d <= max_nd

    return fits


@dataclasses.dataclass(kw_only=True)
class Arm:
    """One method: ``run(problem, max_iter) -> Run`` (suite, seed and method set by the caller)."""

    name: str
    run: Callable[[problems.Problem, int], Run]
    kind: str  # "newton" (few iterations) or "first-order" (budget x 10) or "linear"
    dense: bool = False  # builds a P x P matrix: skipped when P is too large
    needs_numpy: bool = False  # needs the NumPy oracles (not on torch-only problems)
    fits: Callable[[problems.Problem, bool], bool] = lambda problem, quick: True


def _target(problem: problems.Problem, f: float) -> tuple[float, bool]:
    if problem.f_star is None:
        return f, f <= MLP_TARGET
    gap = f - problem.f_star
    return gap, gap <= TOL


# -- RegularizedNewton and torch.optim.LBFGS --------------------------------------------------


def _torch_loop(problem, opt, closure, params, max_iter, counts) -> Run:
    run = Run(suite=NAME, method="", seed=0)
    with torch.no_grad():
        f = problem.loss(params).item()
    metric, done = _target(problem, f)
    run.record(0, 0.0, f, metric)
    spent, it = 0.0, 0
    while not done and it < max_iter:
        c = time.process_time()
        opt.step(closure)
        spent += time.process_time() - c
        it += 1
        with torch.no_grad():
            f = problem.loss(params).item()
        metric, done = _target(problem, f)
        run.record(it, spent, f, metric)
        if not np.isfinite(f):
            run.extra["diverged"] = True
            break
    run.time_to_target = spent if done else None
    run.step_time = spent / max(it, 1)
    run.extra.update(iterations=it, reached=done, **counts(opt, params))
    return run


def newton_arm(name: str, kind: str = "newton", dense: bool = False, fits=None, **kw) -> Arm:
    """A RegularizedNewton arm with keyword arguments ``kw``.

    The closures are full batch (the same function at every step), so the arms opt in to
    ``reuse_trial=True`` (one closure call per try) unless ``kw`` says otherwise.
    """
    curvature = kw.get("curvature", "hessian")
    kw.setdefault("reuse_trial", True)

    def go(problem, max_iter):
        params = problem.make_params()
        opt = RegularizedNewton(params, **kw)
        closure = {
            "hessian": lambda: problem.loss(params),
            "dense": lambda: problem.loss(params),
            "gauss_newton": lambda: problem.outputs(params),
            "empirical_fisher": lambda: problem.losses(params),
        }[curvature]

        def counts(opt, params):
            s = opt.state[params[0]]
            cholesky = kw.get("solver") == "cholesky" or curvature == "dense"
            return dict(
                solves=s["tries"],
                accepted=int(s["step"].item()) - s["failed_steps"],
                fg_calls=s["closure_evals"],
                hvp_calls=0 if cholesky else s["curvature_products"],
                hessians=int(s["step"].item()) if cholesky else 0,
                cg_iterations=s["cg_iterations"],
                failed_steps=s["failed_steps"],
            )

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # precision floor: all tries fail
            return _torch_loop(problem, opt, closure, params, max_iter, counts)

    arm = Arm(name=name, run=go, kind=kind, dense=dense)
    if fits is not None:
        arm.fits = fits
    return arm


def torch_lbfgs_arm() -> Arm:
    """``torch.optim.LBFGS`` (history 10, strong Wolfe), 4 iterations per ``step`` call.

    (With ``max_iter=1`` per call it stalls far from the optimum on these problems.)
    """

    def go(problem, max_iter):
        params = problem.make_params()
        opt = torch.optim.LBFGS(
            params,
            lr=1,
            max_iter=LBFGS_INNER,
            history_size=10,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = problem.loss(params)
            loss.backward()
            return loss

        def counts(o, p):
            s = o.state[p[0]]
            return dict(
                solves=None,
                accepted=s["n_iter"],
                fg_calls=s["func_evals"],
                hvp_calls=0,
                hessians=0,
                n_iter=s["n_iter"],
            )

        run = _torch_loop(problem, opt, closure, params, -(-max_iter // LBFGS_INNER), counts)
        run.extra["iterations"] = run.extra["n_iter"]
        return run

    return Arm(name="torch LBFGS", run=go, kind="first-order")


# -- SciPy and gradient descent on the NumPy oracles ------------------------------------------


class _Counted:
    """NumPy oracles that count their calls."""

    def __init__(self, problem):
        self.p, self.fg_calls, self.hvp_calls, self.hessians = problem, 0, 0, 0

    def fg(self, x):
        self.fg_calls += 1
        return self.p.fg(x)

    def hessp(self, x, v):
        self.hvp_calls += 1
        return self.p.hessp(x, v)

    def hess(self, x):
        self.hessians += 1
        return self.p.hess(x)


def _numpy_run(problem, oracle, f0) -> Run:
    run = Run(suite=NAME, method="", seed=0)
    metric, done = _target(problem, f0)
    run.record(0, 0.0, f0, metric)
    run.extra["reached"] = done
    return run


def _finish(run, oracle, spent, it, solves=True):
    """``accepted``: recorded points whose f differs from the previous one (x moved)."""
    done = run.extra["reached"]
    run.time_to_target = run.cpu_time[-1] if done else None
    run.step_time = spent / max(it, 1)
    run.extra.update(
        iterations=it,
        solves=it if solves else None,
        accepted=sum(a != b for a, b in zip(run.loss, run.loss[1:])),
        fg_calls=oracle.fg_calls,
        hvp_calls=oracle.hvp_calls,
        hessians=oracle.hessians,
    )
    return run


def scipy_arm(method: str, dense: bool = False) -> Arm:
    from scipy.optimize import minimize

    def go(problem, max_iter):
        oracle = _Counted(problem)
        x0 = np.zeros(problem.d)
        run = _numpy_run(problem, oracle, problem.fg(x0)[0])
        extra_kw = {"hess": oracle.hess} if method == "trust-exact" else {}
        if method in ("trust-krylov", "Newton-CG"):
            extra_kw = {"hessp": oracle.hessp}
        options = {"maxiter": max_iter}
        options.update(
            {
                "L-BFGS-B": {"ftol": 0.0, "gtol": 0.0, "maxfun": 100 * max_iter},
                "Newton-CG": {"xtol": 1e-30},
            }.get(method, {"gtol": 1e-30})
        )
        start, paused = time.process_time(), [0.0]

        def callback(intermediate_result):
            c = time.process_time()
            f = float(intermediate_result.fun)
            metric, done = _target(problem, f)
            run.record(len(run.steps), c - start - paused[0], f, metric)
            paused[0] += time.process_time() - c
            if done:
                run.extra["reached"] = True
                raise StopIteration

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            minimize(
                oracle.fg,
                x0,
                jac=True,
                method=method,
                callback=callback,
                options=options,
                **extra_kw,
            )
        spent = time.process_time() - start - paused[0]
        return _finish(run, oracle, spent, len(run.steps) - 1, solves=method != "L-BFGS-B")

    return Arm(
        name=f"SciPy {method}" + (" (Hv)" if method == "Newton-CG" else ""),
        run=go,
        kind="first-order" if method == "L-BFGS-B" else "newton",
        dense=dense,
        needs_numpy=True,
    )


def gradient_descent_arm() -> Arm:
    """Gradient descent ``x - g / L`` with the doubling/halving search on L (Armijo)."""

    def go(problem, max_iter):
        oracle = _Counted(problem)
        x = np.zeros(problem.d)
        start = time.process_time()
        f, g = oracle.fg(x)
        run = _numpy_run(problem, oracle, f)
        L, spent, paused = 1.0, 0.0, 0.0
        for it in range(1, max_iter + 1):
            for _ in range(60):
                x_new = x - g / L
                f_new, g_new = oracle.fg(x_new)
                if f_new <= f - (g @ g) / (2 * L):
                    L /= 2
                    break
                L *= 2
            x, f, g = x_new, f_new, g_new
            c = time.process_time()
            metric, done = _target(problem, f)
            run.record(it, c - start - paused, f, metric)
            paused += time.process_time() - c
            if done:
                run.extra["reached"] = True
                break
        spent = time.process_time() - start - paused
        return _finish(run, oracle, spent, it, solves=False)

    return Arm(name="GD + line search", run=go, kind="first-order", needs_numpy=True)
