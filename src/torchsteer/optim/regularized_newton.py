"""Gradient-normalized regularized Newton: exact, Gauss-Newton or empirical-Fisher curvature."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchsteer import distributed as tdist
from torchsteer.jacobian import flatten, unflatten
from torchsteer.linalg.lanczos import LanczosSolver
from torchsteer.optim._newton_solvers import (
    CGSolver,
    CholeskySolver,
    WoodburySolver,
    _flat_cat,
    cg_tolerance,
    evaluate_closure,
    make_curvature,
)

__all__ = ["RegularizedNewton"]

CURVATURES = ("hessian", "gauss_newton", "empirical_fisher", "dense")
REGULARIZATIONS = ("gns", "sqrt")
SOLVERS = ("auto", "cg", "lanczos", "cholesky", "woodbury")
GROWTHS = ("double", "margin")
_MARGIN = 2.0  # growth="margin": gamma grows only if the accept test holds with this factor
_AUTO_SOLVER = {
    "hessian": "cg",
    "gauss_newton": "cg",
    "empirical_fisher": "woodbury",
    "dense": "cholesky",
}
_SCALE_MAX = 2.0**200  # gamma <= _SCALE_MAX and M >= 1 / _SCALE_MAX: lambda never hits 0 or inf


@dataclasses.dataclass
class TryRecord:
    """What the tries of one step did; :meth:`as_record` is the public per-step record."""

    tries: int = 0
    accepted: bool = False
    cg_iterations: int = 0
    evals: int = 0
    reasons: list[str] = dataclasses.field(default_factory=list)
    gamma: float | None = None
    M: float | None = None
    lam: float = float("nan")
    margin: bool | None = None  # set on acceptance only
    new_loss: float = float("nan")

    def as_record(self, reused: bool, loss: float, grad_norm: float) -> dict[str, Any]:
        """The dict of ``state["record"]``, keys in their documented order."""
        rec: dict[str, Any] = dict(
            tries=self.tries,
            accepted=self.accepted,
            cg_iterations=self.cg_iterations,
            reasons=self.reasons,
            gamma=self.gamma,
            M=self.M,
        )
        if self.margin is not None:
            rec["margin"] = self.margin
        rec.update(new_loss=self.new_loss, reused=reused)
        rec["lambda"] = self.lam
        rec.update(loss=loss, grad_norm=grad_norm)
        return rec


@dataclasses.dataclass(frozen=True)
class SearchStart:
    """Where the tries of one step start and how a trial is evaluated.

    ``loss`` = f(x0), ``grad_norm`` = |g(x0)|, ``scale`` = gamma (gns rule) or M (sqrt rule)
    of the first try; ``keep``: keep the accepted trial's evaluation for the next step;
    ``work``: the dtype the trials are computed in.
    """

    closure: Callable[[], Any]
    params: list[torch.Tensor]
    loss: float
    grad_norm: float
    scale: float
    keep: bool
    work: torch.dtype


class RegularizedNewton(torch.optim.Optimizer):
    """Gradient-normalized regularized Newton (Algorithm 1 of Semenov, Jaggi and Doikov).

    With ``H`` the curvature chosen by ``curvature`` at the current point ``x``::

        g = grad f(x)
        repeat (at most max_tries times):
            lambda = |g| / gamma                      ("gns")   or   sqrt(M |g|)   ("sqrt")
            delta  = -(H + lambda I)^{-1} g           (Cholesky, Woodbury or CG)
            accept if  f(x) - f(x + delta) >= |grad f(x + delta)|^2 / (8 lambda)
            on reject: gamma <- gamma / 2   (sqrt: M <- 2 M)
        on accept: x <- x + delta,  gamma <- 2 gamma   (sqrt: M <- M / 2), for the next step

    A failed solve (Cholesky of an indefinite ``H + lambda I``, CG meeting non-positive
    curvature, a non-finite step) and a trial point with a non-finite loss or gradient are
    rejections. When every try is rejected the parameters and ``gamma`` / ``M`` stay as they
    were, a ``RuntimeWarning`` says so and the record has ``accepted=False``. With ``H >= 0``,
    ``|delta| <= gamma``: gamma is a trust radius in disguise; with ``H = 0`` the step is
    normalized gradient descent ``x - gamma g / |g|``; as gamma grows it tends to Newton's step.
    The ``"sqrt"`` rule is the classic gradient regularization ``lambda = sqrt(M |g|)``
    (gamma = sqrt(|g| / M)), with ``M`` initialized so that the first try has ``gamma0``.

    Curvature (what the closure returns):

    - ``"hessian"``: exact Hessian-vector products (reverse over reverse); the scalar loss.
    - ``"dense"``: the exact Hessian built as a P x P matrix, Cholesky solves; the scalar loss.
      Small P only.
    - ``"gauss_newton"``: ``J^T H_out J``, ``J`` the Jacobian of ``outputs`` and ``H_out`` the
      Hessian of the loss in output space; ``(loss, outputs)``. The loss must reach the
      parameters through ``outputs`` only (a penalty on the parameters enters the gradient
      but not the curvature).
    - ``"empirical_fisher"``: ``(1/B) sum_i g_i g_i^T`` from the per-sample gradients; the
      per-sample losses ``(B,)``, and ``f`` is their mean. Woodbury with the B x B Gram is exact.
      It underweights curvature on separable data and converges only linearly there.

    The closure is called once per try (and once at ``x`` on a step that cannot reuse the last
    one), under ``torch.enable_grad()``; a trial point is evaluated with the parameters' ``.data``
    swapped for the trial values and back (the graph at ``x`` stays valid for the next try), and
    the parameters are written in place only once a try is accepted. It must compute
    the loss from the parameters and return it **without calling** ``backward()``: the
    optimizer differentiates it with ``torch.autograd.grad`` (``.grad`` is left alone, so
    zeroing it in the closure is harmless).

    Reuse (``reuse_trial=True``, off by default): the accept test needs ``f`` and ``grad f`` at
    the trial point ``x + delta``; once accepted, that point is the next step's ``x``. When the
    next ``step`` gets the same closure object (``==``) and no parameter was written in between
    (version counters and storage unchanged), the trial's evaluation -- loss, gradient and
    autograd graph, built with ``create_graph=True`` for the Hessian -- is the next step's
    evaluation at ``x``: one closure call per try instead of one per try plus one per step, and
    the same iterates bit for bit (under a process group, up to the last bit for parameters that
    are not float64: the trial's gradient is averaged in float64, a fresh one in the working
    dtype). The accepted values are then written through ``.data`` (the kept graph saved the
    parameters holding exactly them), so the parameters' version counters do not move on such a
    write. A closure object that is new at every step (a minibatch per step, Lightning's
    wrapper) is always evaluated afresh, and after its first step no trial graph is built for
    it. A closure object that is passed again must compute the same function of the parameters
    (as the accept test already assumes within a step): a closure that reads a batch which
    changes between steps would be silently evaluated on the old batch, which is why reuse is
    opt-in. Turn it on for full-batch loops (the convex benchmark does). The kept graph lives
    between steps (the memory of one evaluation).

    The method is global: the parameters of all groups form one vector, and every group must
    have the same hyperparameters.

    Under DDP (a process group of R ranks, each closure evaluating its rank's slice of the
    batch) the loss, the gradient and every curvature product are means over the ranks
    (:mod:`torchsteer.distributed`), so every host-side decision (accept, reject, CG) is the
    same on every rank and the step is that of one process on the whole batch. The
    gradients come from ``torch.autograd.grad``, which DDP's hooks never see, and are reduced
    here exactly once, even if the closure also calls ``backward(retain_graph=True)`` (DDP then
    all-reduces ``.grad``, which is not read). The parameters must
    start equal on every rank (DDP's constructor broadcasts them). Without a process group
    nothing is communicated and nothing changes.

    Args:
        params: the parameters (one group).
        curvature: ``"hessian"``, ``"gauss_newton"``, ``"empirical_fisher"`` or ``"dense"``.
        regularization: ``"gns"`` (``lambda = |g| / gamma``) or ``"sqrt"``
            (``lambda = sqrt(M |g|)``).
        gamma0: the first step's gamma (> 0).
        growth: after an accepted try, ``"double"`` (Algorithm 1: ``gamma <- 2 gamma``) or
            ``"margin"``: ``gamma <- 2 gamma`` only if the accept test held with a factor 2 to
            spare, ``f(x) - f(x + delta) >= 2 |grad f(x + delta)|^2 / (8 lambda)``, else
            ``gamma`` stays (sqrt rule: ``M`` halves or stays). As a trust region grows only
            when its model agrees, this avoids trying a ``gamma`` that just failed to pass with
            room; gamma still halves only on a rejection, so ``gamma_k >= min(gamma0,
            gamma_ok / 2)`` for any ``gamma_ok`` that always passes, and the rejections are at
            most the doublings plus ``log2(gamma0 / gamma_min)``, as in Algorithm 1.
        max_tries: tries of the adaptive search per step (>= 1; the paper uses 40).
        solver: ``"auto"`` (CG for hessian and gauss_newton, Woodbury for empirical_fisher,
            Cholesky for dense), ``"cg"``, ``"lanczos"`` (the Krylov basis kept across the
            tries of a step, reorthogonalized: below), ``"cholesky"`` or ``"woodbury"``.
        cg_tol: CG/Lanczos stop at ``|r| <= cg_tol |g|``; ``None`` uses SciPy Newton-CG's
            forcing term ``min(0.5, sqrt(|g|))`` (superlinear local convergence);
            ``"eisenstat_walker"``: their choice 2, ``0.9 (|g_k| / |g_{k-1}|)^2`` safeguarded
            (``eisenstat_walker_tolerance``), from the last accepted step's ``|g|`` and tolerance.
        cg_maxiter: CG iterations per solve (Lanczos: basis vectors per step); ``None``: ``10 P``.
        nonfinite: ``"raise"`` (``ValueError``, nothing changes) or ``"skip"`` (the step is
            skipped and counted in ``skipped_steps``) when the loss or gradient at ``x`` has
            NaN/Inf.
        reuse_trial: reuse the accepted trial point's evaluation as the next step's (above);
            only for a closure that computes the same function at every step (full batch).

    State (on the first parameter, for logging): ``step``; ``gamma`` (or ``M``) for the next
    step; ``record``, the last step's ``{tries, accepted, gamma, lambda, cg_iterations,
    loss, new_loss, grad_norm, reasons, reused, margin}`` (``margin``: the accepted try passed
    with a factor 2 to spare); totals ``closure_evals``, ``tries``,
    ``curvature_products``, ``cg_iterations``, ``failed_steps``, ``skipped_steps``; with
    ``cg_tol="eisenstat_walker"``, ``forcing``: the last accepted step's ``(|g|, tolerance)``.

    CG: ``|r| <= cg_tol |g|`` in the 2-norm; after a rejected try it is warm-started from the
    previous solution at no product (the solver keeps ``H delta``, so
    ``r_0 = -g - H delta - lambda' delta``). Lanczos (:mod:`torchsteer.linalg.lanczos`, CG's
    iterates in exact arithmetic) keeps the orthonormal basis of ``K(H, g) = K(H + lambda I, g)``
    and ``T_k``: a retry is a ``k x k`` solve, extended only while its residual is above the
    tolerance, and the full reorthogonalization saves products on ill-conditioned systems;
    ``k`` P-vectors.

    Memory: CG keeps the graph of one closure evaluation (with the gradient's own graph for
    ``"hessian"``) and a few P-vectors, and with reuse a trial's graph as well (two
    evaluations' graphs at the peak, one between steps); ``"dense"``/``"cholesky"`` a P x P
    matrix; Woodbury the B x P per-sample gradients and a B x B Gram.

    References:
        Semenov, Jaggi, Doikov. "Gradient-Normalized Smoothness for Optimization with
        Approximate Hessians." ICLR 2026. arXiv:2506.13710. Mishchenko, "Regularized Newton
        method with global O(1/k^2) convergence", SIAM J. Optim. 2023; Doikov and Nesterov,
        "Gradient regularization of Newton method with Bregman distances", 2023.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        curvature: str = "hessian",
        regularization: str = "gns",
        gamma0: float = 1.0,
        growth: str = "double",
        max_tries: int = 40,
        solver: str = "auto",
        cg_tol: float | None = None,
        cg_maxiter: int | None = None,
        nonfinite: str = "raise",
        reuse_trial: bool = False,
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"Invalid curvature: {curvature!r}; expected one of {CURVATURES}")
        if regularization not in REGULARIZATIONS:
            raise ValueError(
                f"Invalid regularization: {regularization!r}; expected one of {REGULARIZATIONS}"
            )
        if not (isinstance(gamma0, int | float) and math.isfinite(gamma0) and gamma0 > 0):
            raise ValueError(f"Invalid gamma0: {gamma0}")
        if growth not in GROWTHS:
            raise ValueError(f"Invalid growth: {growth!r}; expected one of {GROWTHS}")
        if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
            raise ValueError(f"Invalid max_tries: {max_tries}")
        if solver not in SOLVERS:
            raise ValueError(f"Invalid solver: {solver!r}; expected one of {SOLVERS}")
        if solver == "woodbury" and curvature != "empirical_fisher":
            raise ValueError(
                f"Invalid solver: 'woodbury' needs curvature='empirical_fisher', got {curvature!r}"
            )
        if cg_tol not in (None, "eisenstat_walker") and not (
            isinstance(cg_tol, int | float) and math.isfinite(cg_tol) and 0 < cg_tol < 1
        ):
            raise ValueError(f"Invalid cg_tol: {cg_tol!r}")
        if cg_maxiter is not None and (
            isinstance(cg_maxiter, bool) or not isinstance(cg_maxiter, int) or cg_maxiter < 1
        ):
            raise ValueError(f"Invalid cg_maxiter: {cg_maxiter}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}")
        if not isinstance(reuse_trial, bool):
            raise ValueError(f"Invalid reuse_trial: {reuse_trial!r}")
        defaults = dict(
            curvature=curvature,
            regularization=regularization,
            gamma0=float(gamma0),
            growth=growth,
            max_tries=max_tries,
            solver=solver,
            cg_tol=cg_tol,
            cg_maxiter=cg_maxiter,
        )
        super().__init__(params, defaults)
        self.nonfinite = nonfinite  # a policy, not a hyperparameter: load_state_dict keeps it
        self.reuse_trial = reuse_trial  # a policy too: it changes the cost, not the iterates
        self._cache: dict | None = None  # the accepted trial's evaluation (never serialized)
        self._last_closure = None
        for group in self.param_groups[1:]:
            differ = [k for k in defaults if group[k] != self.param_groups[0][k]]
            if differ:
                raise ValueError(
                    f"Invalid param groups: RegularizedNewton's hyperparameters are global, but "
                    f"the groups differ in {', '.join(differ)}"
                )

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy: the state and the policies; never the kept graph or the closure."""
        return {
            **super().__getstate__(),
            "nonfinite": self.nonfinite,
            "reuse_trial": self.reuse_trial,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("reuse_trial", False)
        self._cache, self._last_closure = None, None
        for group in self.param_groups:  # checkpoints from before these keys existed
            group.setdefault("growth", "double")
        first = self.state.get(self.param_groups[0]["params"][0]) if self.param_groups else None
        if first and "step" in first:
            first.setdefault("tries", 0)

    # -- the step -------------------------------------------------------------------------

    @staticmethod
    def _write(params, flat: torch.Tensor) -> None:
        for p, v in zip(params, unflatten(flat, params)):
            p.copy_(v)

    def _trial(self, closure, params, curvature: str, x_new: torch.Tensor, keep: bool, work):
        """``f``, ``|grad f|^2`` at ``x_new`` and, when ``keep``, the whole evaluation there.

        The parameters' ``.data`` is swapped for the trial values and back (instead of writing
        in place): their version counters stay as they were, so the graph of the evaluation at
        ``x`` stays valid for more curvature products after a rejection. With ``keep`` the
        evaluation keeps its graph (``create_graph`` for the Hessian) and is returned as
        ``(f, aux, grads, g, loss)``, ``g`` and ``loss`` reduced over ranks as in :meth:`step`;
        the trial values get their own storage, which the graph's views of the parameters
        refer to after the swap back.
        """
        saved = [p.data for p in params]
        values = unflatten(x_new, params)
        if keep:
            values = [v.clone() for v in values]
        try:
            for p, v in zip(params, values):
                p.data = v
            f_t, aux_t, grads_t = evaluate_closure(closure, params, curvature, graph=keep)
        finally:
            for p, d in zip(params, saved):
                p.data = d
        if tdist.is_distributed():  # the global f and gradient: one all-reduce of P + 1 numbers
            flat = _flat_cat(grads_t, params, torch.float64)
            packed = tdist.all_reduce_mean(torch.cat([flat, f_t.detach().double().reshape(1)]))
            gn2 = sum(float((t**2).sum()) for t in unflatten(packed[:-1], params))
            ev = None
            if keep:
                loss_t = packed[-1].to(f_t.dtype)
                ev = (f_t, aux_t, grads_t, packed[:-1].to(work), loss_t)
            return float(packed[-1]), gn2, ev
        gn2 = sum(float((t.detach().double() ** 2).sum()) for t in grads_t if t is not None)
        ev = (f_t, aux_t, grads_t, _flat_cat(grads_t, params, work), f_t.detach()) if keep else None
        return f_t.item(), gn2, ev

    @staticmethod
    def _write_kept(params, flat: torch.Tensor) -> None:
        """Write ``flat`` into the parameters' storage without bumping their version counters.

        The kept trial graph saved the parameters while they held exactly these values; through
        ``.data`` (an alias with its own version counter) the write leaves that graph valid.
        """
        for p, v in zip(params, unflatten(flat, params)):
            p.data.copy_(v)

    @staticmethod
    def _init_state(state: dict, group: dict) -> None:
        if "step" in state:
            return
        state["step"] = torch.tensor(0.0)
        state["gamma"] = group["gamma0"]
        state["M"] = None
        state["record"] = {}
        for key in (
            "closure_evals",
            "tries",
            "curvature_products",
            "cg_iterations",
            "failed_steps",
            "skipped_steps",
        ):
            state[key] = 0

    @staticmethod
    def _lambda(gns: bool, scale: float, gnorm: float) -> float:
        """``|g| / gamma`` (gns, scale = gamma) or ``sqrt(M |g|)`` (sqrt, scale = M)."""
        return gnorm / scale if gns else math.sqrt(scale * gnorm)

    def _make_solver(self, group, curv, g: torch.Tensor, gnorm: float, state: dict):
        name = _AUTO_SOLVER[group["curvature"]] if group["solver"] == "auto" else group["solver"]
        if name in ("cg", "lanczos"):
            tol = cg_tolerance(group["cg_tol"], gnorm, state.get("forcing"))
            return (CGSolver if name == "cg" else LanczosSolver)(curv, g, tol, group["cg_maxiter"])
        if name == "woodbury":
            return WoodburySolver(curv, g)
        return CholeskySolver(curv, g)

    def _search(self, start: SearchStart, group: dict, solver):
        """The tries of one step; ``(TryRecord, scale of the last try, kept evaluation)``."""
        closure, params, keep, work = start.closure, start.params, start.keep, start.work
        f0, gnorm, scale = start.loss, start.grad_norm, start.scale
        gns, curvature = group["regularization"] == "gns", group["curvature"]
        x0 = flatten([p.detach() for p in params]).clone()
        eps = torch.finfo(x0.dtype).eps
        rec = TryRecord()
        warm, f_new, kept = None, f0, None
        for _ in range(group["max_tries"]):
            rec.tries += 1
            lam = self._lambda(gns, scale, gnorm)
            rec.gamma, rec.M, rec.lam = scale if gns else gnorm / lam, None if gns else scale, lam
            sol = solver.solve(lam, warm) if isinstance(solver, CGSolver) else solver.solve(lam)
            rec.cg_iterations += sol.cg_iterations
            if not sol.ok:
                rec.reasons.append(sol.reason)
                warm = None
            else:
                x_new = x0 + sol.delta.to(x0.dtype)
                if torch.equal(x_new, x0):  # smaller steps would not move x either
                    rec.reasons.append("below resolution")
                    break
                warm = sol.delta
                f_new, gn2, ev = self._trial(closure, params, curvature, x_new, keep, work)
                rec.evals += 1
                if math.isfinite(f_new) and math.isfinite(gn2) and f0 - f_new >= gn2 / (8 * lam):
                    rec.accepted = True
                    rec.margin = f0 - f_new >= _MARGIN * gn2 / (8 * lam)
                    if ev is None:
                        self._write(params, x_new)
                    else:
                        self._write_kept(params, x_new)
                        kept = ev
                    break
                del ev
                finite = math.isfinite(f_new + gn2)
                rec.reasons.append("decrease" if finite else "nonfinite trial")
                tiny = float(sol.delta.norm()) <= math.sqrt(eps) * (float(x0.norm()) + 1)
                if finite and tiny and abs(f0 - f_new) <= 4 * eps * max(abs(f0), 1e-30):
                    rec.reasons.append("below resolution")  # f cannot tell the tries apart
                    break
            scale = scale / 2 if gns else scale * 2
        rec.new_loss = f_new if rec.accepted else f0
        return rec, scale, kept

    @staticmethod
    def _reusable(cache: dict, closure, params) -> bool:
        """The same closure, the same parameters, none of them written since the cache was made."""
        return (
            cache["closure"] == closure
            and len(cache["params"]) == len(params)
            and all(a is b for a, b in zip(cache["params"], params))
            and cache["versions"] == [(p._version, p.data_ptr()) for p in params]
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> torch.Tensor:  # type: ignore[override]
        """One step of the adaptive search.

        Args:
            closure: recomputes and returns the loss (see the class docstring for its form
                per curvature) without calling ``backward()``.

        Returns:
            The objective ``f(x)`` at the start of the step (detached).
        """
        if closure is None:
            raise ValueError("Invalid closure: RegularizedNewton needs a closure")
        group = self.param_groups[0]
        params = [p for grp in self.param_groups for p in grp["params"] if p.requires_grad]
        dtype = params[0].dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        cache, self._cache = self._cache, None
        reused = cache is not None and self._reusable(cache, closure, params)
        evaluation = cache["evaluation"] if reused else None
        del cache  # a stale kept graph goes before a fresh evaluation builds another
        keep = self.reuse_trial and (self._last_closure is None or closure == self._last_closure)
        self._last_closure = closure if self.reuse_trial else None
        if reused:  # the last step's accepted trial point is this step's x
            f, aux, grads, g, loss = evaluation
        else:
            f, aux, grads = evaluate_closure(closure, params, group["curvature"], graph=True)
            g = _flat_cat(grads, params, work)
            loss = f.detach()  # what the step reports: the global mean under a process group
            if tdist.is_distributed():  # global mean loss and gradient (DDP's hooks never ran)
                packed = tdist.all_reduce_mean(torch.cat([g, loss.reshape(1).to(g.dtype)]))
                g, loss = packed[:-1], packed[-1].to(loss.dtype)
        finite = bool(torch.isfinite(loss).all()) and bool(torch.isfinite(g).all())
        if not finite and self.nonfinite == "raise":
            raise ValueError("Invalid loss or gradient: contains NaN or Inf")
        state = self.state[group["params"][0]]
        self._init_state(state, group)
        state["closure_evals"] += 0 if reused else 1
        f0 = loss.item()
        if not finite:
            state["skipped_steps"] += 1
            state["record"] = {"accepted": False, "skipped": True, "tries": 0, "loss": f0}
            return loss
        state["step"] += 1
        gnorm = g.norm().item()
        if gnorm == 0.0:  # stationary: nothing to do
            state["record"] = {"accepted": False, "tries": 0, "loss": f0, "grad_norm": 0.0}
            return loss
        gns = group["regularization"] == "gns"
        scale = state["gamma"] if gns else state["M"]
        if scale is None:  # the sqrt rule's M, so that the first try has gamma0
            scale = gnorm / group["gamma0"] ** 2
        curv = make_curvature(group["curvature"], f, aux, grads, params, work)
        solver = self._make_solver(group, curv, g, gnorm, state)
        start = SearchStart(closure, params, f0, gnorm, scale, keep, work)
        rec, scale, kept = self._search(start, group, solver)
        if kept is not None:
            versions = [(p._version, p.data_ptr()) for p in params]
            self._cache = dict(closure=closure, params=params, versions=versions, evaluation=kept)
        state["closure_evals"] += rec.evals
        state["tries"] += rec.tries
        state["curvature_products"] += curv.products
        state["cg_iterations"] += rec.cg_iterations
        state["record"] = rec = rec.as_record(reused, f0, gnorm)
        if rec["accepted"]:
            if rec["margin"] or group["growth"] == "double":
                scale = min(2 * scale, _SCALE_MAX) if gns else max(scale / 2, 1 / _SCALE_MAX)
            state["gamma" if gns else "M"] = scale
            if group["cg_tol"] == "eisenstat_walker":  # this step's |g| and tolerance
                state["forcing"] = (gnorm, solver.tol)
            return loss
        state["failed_steps"] += 1
        if not gns and state["M"] is None:
            state["M"] = gnorm / group["gamma0"] ** 2
        warnings.warn(
            f"RegularizedNewton: every try was rejected ({rec['tries']} tries, last: "
            f"{rec['reasons'][-1]}); the parameters are unchanged",
            RuntimeWarning,
            stacklevel=2,
        )
        return loss
