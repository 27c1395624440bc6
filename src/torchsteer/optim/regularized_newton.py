"""Gradient-normalized regularized Newton: exact, Gauss-Newton or empirical-Fisher curvature."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchsteer.jacobian import flatten, unflatten
from torchsteer.linalg.lanczos import LanczosSolver
from torchsteer.optim._contract import GlobalStateMixin, user_stacklevel
from torchsteer.optim._newton_global import global_evaluation
from torchsteer.optim._newton_inputs import (
    COUNTERS,
    HYPERPARAMETERS,
    LEGACY_DEFAULTS,
    LIGHTNING_AUTOMATIC,
    ScaledCurvature,
    check_parameters,
    lightning_automatic,
    maximizing,
    validate_group,
    validate_state,
)
from torchsteer.optim._newton_multishift import MultiShiftSolver
from torchsteer.optim._newton_records import SearchStart, TryRecord
from torchsteer.optim._newton_solvers import (
    CGSolver,
    CholeskySolver,
    WoodburySolver,
    cg_tolerance,
    make_curvature,
    parse_closure_output,
)
from torchsteer.optim._newton_trial import evaluate_trial, start_numbers

__all__ = ["RegularizedNewton"]

_MARGIN = 2.0  # growth="margin": gamma grows only if the accept test holds with this factor
_AUTO_SOLVER = {
    "hessian": "cg",
    "gauss_newton": "cg",
    "empirical_fisher": "woodbury",
    "dense": "cholesky",
}
_SCALE_MAX = 2.0**200  # gamma <= _SCALE_MAX and M >= 1 / _SCALE_MAX: lambda never hits 0 or inf


class RegularizedNewton(GlobalStateMixin, torch.optim.Optimizer):
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
    have the same hyperparameters. The optimizer contract (``optim/_contract.py``): every
    hyperparameter below is a key of ``defaults`` and of every group, so ``state_dict``,
    ``copy.deepcopy`` and ``pickle`` carry it; each is validated in the constructor, in
    ``add_param_group`` and at the start of ``step`` (``ValueError("Invalid <name>: ...")``);
    ``load_state_dict`` validates everything first (a rejected state dict changes nothing) and
    keeps the live ``nonfinite`` and ``reuse_trial``. Parameters: real floating point, one dtype
    and device; gradients dense; frozen ones are left alone (all frozen: ``step`` returns the
    closure's loss). A closure that raises leaves the parameters and the state as they were.

    Loss scale: with ``f`` scaled by ``s``, ``g``, ``H`` (Hessian, Gauss-Newton) and ``lambda``
    scale by ``s``, so ``delta`` and the accept test do not change; the solves and the test are
    computed in units of ``c = 4^k ~ max |g_i|`` (exact powers of two), so float32 takes the same
    steps at ``s = 1e-20`` as at ``1e20``. Not scale-free by construction: the empirical Fisher
    (``s^2 F``) and the default ``cg_tol`` (``sqrt(|g|)``); give ``cg_tol`` a number for that.

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
            Cholesky for dense), ``"cg"``, ``"multishift"`` (one multi-shift CG run solves
            the first tries of a step at once: a rejected try costs no product;
            :mod:`~torchsteer.optim._newton_multishift`), ``"lanczos"`` (the Krylov basis
            kept across the tries of a step, reorthogonalized: below), ``"cholesky"`` or
            ``"woodbury"``.
        cg_tol: CG/Lanczos stop at ``|r| <= cg_tol |g|``; ``None`` uses SciPy Newton-CG's
            forcing term ``min(0.5, sqrt(|g|))`` (superlinear local convergence);
            ``"eisenstat_walker"``: their choice 2, ``0.9 (|g_k| / |g_{k-1}|)^2`` safeguarded
            (``eisenstat_walker_tolerance``), from the last accepted step's ``|g|`` and tolerance.
        cg_maxiter: CG iterations per solve (Lanczos: basis vectors per step); ``None``: ``10 P``.
        cg_check_every: the host reads CG's convergence test every this many iterations
            (the iterates do not depend on it); ``None``: 1 on CPU, 10 on accelerators.
        output_hessian: Gauss-Newton's ``H_out u``: ``None`` by autograd (any loss), or
            ``"cross_entropy"`` in closed form for a loss that is the mean softmax
            cross-entropy of the outputs' last dimension (checked at every step; no double
            backward: :mod:`~torchsteer.jacobian.output_hessian`).
        nonfinite: ``"raise"`` (``ValueError``, nothing changes) or ``"skip"`` (the step is
            skipped and counted in ``skipped_steps``) when the loss or gradient at ``x`` has
            NaN/Inf.
        reuse_trial: reuse the accepted trial point's evaluation as the next step's (above);
            only for a closure that computes the same function at every step (full batch).
        lr: step-size multiplier (>= 0, a float or a 0-d tensor), for ``torch.optim``'s
            schedulers: the search and its accept test are those of ``delta``, and the step
            taken is ``x <- x + lr delta`` (``lr = 1``: Algorithm 1, bit for bit; for a convex
            ``f`` and ``lr`` in ``[0, 1]``, ``f`` still decreases). With ``lr != 1`` no trial
            evaluation is kept for reuse (it is not at the new point).
        maximize: maximize ``f`` (the closure's value): the step minimizes ``-f``; ``step``
            returns ``f`` and the record's ``loss``/``new_loss`` are values of ``f``.
        foreach: ``None`` or ``False`` only (the step works on one flat vector; nothing to fuse).
        differentiable: ``False`` only (an accept/reject search is not differentiable).

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

    global_hyperparameters = HYPERPARAMETERS  # all of them: the method is global
    policy_hyperparameters = ("nonfinite", "reuse_trial")  # load_state_dict keeps the live ones
    global_state_keys = ("step", "gamma", "M", "forcing", *COUNTERS)

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
        cg_check_every: int | None = None,
        output_hessian: str | None = None,
        nonfinite: str = "raise",
        reuse_trial: bool = False,
        lr: float | torch.Tensor = 1.0,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(
            curvature=curvature,
            regularization=regularization,
            gamma0=gamma0,
            growth=growth,
            max_tries=max_tries,
            solver=solver,
            cg_tol=cg_tol,
            cg_maxiter=cg_maxiter,
            cg_check_every=cg_check_every,
            output_hessian=output_hessian,
            lr=lr,
            maximize=maximize,
            nonfinite=nonfinite,
            reuse_trial=reuse_trial,
            foreach=foreach,
            differentiable=differentiable,
        )
        validate_group(defaults)
        defaults["gamma0"] = float(gamma0)
        super().__init__(params, defaults)
        self._reset_runtime()

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``, validated: every hyperparameter is global (a group
        that gives another value than the first group's raises ``ValueError``), and the
        parameters must be real floating point."""
        super().add_param_group(param_group)
        try:
            check_parameters(self.param_groups[-1]["params"], uniform=False)
        except ValueError:
            self.param_groups.pop()  # nothing is added
            raise

    def _reset_runtime(self) -> None:
        self._cache: dict | None = None  # the accepted trial's evaluation (never serialized)
        self._last_closure = None

    @property
    def nonfinite(self) -> str:
        return self.param_groups[0]["nonfinite"]

    @property
    def reuse_trial(self) -> bool:
        return self.param_groups[0]["reuse_trial"]

    def __repr__(self) -> str:
        """The class and its (global) hyperparameters, then the parameters it holds."""
        group = self.param_groups[0]
        keys = [k for k in HYPERPARAMETERS if k not in ("foreach", "differentiable")]
        params = [p for g in self.param_groups for p in g["params"]]
        return (
            f"{type(self).__name__}({', '.join(f'{k}={group[k]!r}' for k in keys)}; "
            f"{len(self.param_groups)} param group(s), {len(params)} tensors, "
            f"{sum(p.numel() for p in params)} parameters)"
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle / deepcopy / ``load_state_dict``: the state and the settings, never the
        kept graph or the closure; older checkpoints get the defaults of newer keys."""
        legacy = {k: state.pop(k) for k in ("nonfinite", "reuse_trial") if k in state}
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before these keys existed
            for key, value in {**LEGACY_DEFAULTS, **legacy}.items():
                group.setdefault(key, value)
        for key, value in LEGACY_DEFAULTS.items():
            self.defaults.setdefault(key, value)
        first = self._first_state()
        if first and "step" in first:
            first.setdefault("tries", 0)

    def _validate_global_state(self, state: dict[str, Any], saved_groups: list[dict]) -> None:
        validate_state(state)

    # -- the step -------------------------------------------------------------------------

    @staticmethod
    def _write(params, flat: torch.Tensor) -> None:
        for p, v in zip(params, unflatten(flat, params)):
            p.copy_(v)

    @staticmethod
    def _write_kept(params, flat: torch.Tensor) -> None:
        """Write ``flat`` into the parameters' storage without bumping their version counters.

        The kept trial graph saved the parameters while they held exactly these values; through
        ``.data`` (an alias with its own version counter) the write leaves that graph valid.
        """
        for p, v in zip(params, unflatten(flat, params)):
            p.data.copy_(v)

    @staticmethod
    def _initial_state(group: dict) -> dict[str, Any]:
        state: dict[str, Any] = dict(step=torch.tensor(0.0), gamma=group["gamma0"], M=None)
        state["record"] = {}
        state.update({key: 0 for key in COUNTERS})
        return state

    @staticmethod
    def _lambda(gns: bool, scale: float, gnorm: float) -> float:
        """``|g| / gamma`` (gns, scale = gamma) or ``sqrt(M |g|)`` (sqrt, scale = M)."""
        return gnorm / scale if gns else math.sqrt(scale * gnorm)

    def _make_solver(self, group, curv, g: torch.Tensor, gnorm: float, state: dict):
        name = _AUTO_SOLVER[group["curvature"]] if group["solver"] == "auto" else group["solver"]
        if name in ("cg", "lanczos", "multishift"):
            tol = cg_tolerance(group["cg_tol"], gnorm, state.get("forcing"))
            if name == "lanczos":
                return LanczosSolver(curv, g, tol, group["cg_maxiter"])
            if name == "multishift":
                return MultiShiftSolver(curv, g, tol, group["cg_maxiter"])
            every = group["cg_check_every"] or (1 if g.device.type == "cpu" else 10)
            return CGSolver(curv, g, tol, group["cg_maxiter"], every)
        if name == "woodbury":
            return WoodburySolver(curv, g)
        return CholeskySolver(curv, g)

    def _search(self, start: SearchStart, group: dict, solver, release=lambda: None):
        """The tries of one step; ``(TryRecord, scale of the last try, kept evaluation)``.
        ``release`` frees the curvature's kept linearization before each trial graph."""
        params = start.params
        f0, gnorm, scale = start.loss, start.grad_norm, start.scale
        gns, curvature = group["regularization"] == "gns", group["curvature"]
        x0 = flatten([p.detach() for p in params]).clone()
        eps = torch.finfo(x0.dtype).eps
        rec = TryRecord()
        warm, f_new, kept = None, f0, None
        if isinstance(solver, MultiShiftSolver):  # every try's lambda, known ahead
            solver.plan(self._planned_lambdas(gns, scale, gnorm, group["max_tries"], start.inv))
        for _ in range(group["max_tries"]):
            rec.tries += 1
            lam = self._lambda(gns, scale, gnorm)
            rec.gamma, rec.M, rec.lam = scale if gns else gnorm / lam, None if gns else scale, lam
            lam_c = lam * start.inv  # the solvers see H / c, g / c and lambda / c: same delta
            sol = solver.solve(lam_c, warm) if isinstance(solver, CGSolver) else solver.solve(lam_c)
            rec.cg_iterations += sol.cg_iterations
            if not sol.ok:
                rec.reasons.append(sol.reason)
                warm = None
            else:  # the trial's numbers in one transfer (_newton_trial)
                x_new = x0 + sol.delta.to(x0.dtype)
                release()  # the products' kept graph goes before the trial builds one
                same, f_t, gn2, d_norm, x_norm, ev = evaluate_trial(
                    start, curvature, x_new, x0, sol.delta
                )
                rec.evals += 1
                if same:  # smaller steps would not move x either
                    rec.reasons.append("below resolution")
                    break
                warm, f_new = sol.delta, f_t
                drop = (f0 - f_new) * start.inv  # the test in units of c: exact, no overflow
                if math.isfinite(f_new) and math.isfinite(gn2) and drop >= gn2 / (8 * lam_c):
                    rec.accepted = True
                    rec.margin = drop >= _MARGIN * gn2 / (8 * lam_c)
                    if start.lr != 1.0:  # x <- x + lr delta; the test was on x + delta
                        self._write(params, x0 + (start.lr * sol.delta).to(x0.dtype))
                    elif ev is None:
                        self._write(params, x_new)
                    else:
                        self._write_kept(params, x_new)
                        kept = ev
                    break
                del ev
                finite = math.isfinite(f_new + gn2)
                rec.reasons.append("decrease" if finite else "nonfinite trial")
                tiny = d_norm <= math.sqrt(eps) * (x_norm + 1)
                if finite and tiny and abs(f0 - f_new) <= 4 * eps * abs(f0):
                    rec.reasons.append("below resolution")  # f cannot tell the tries apart
                    break
            scale = scale / 2 if gns else scale * 2
        rec.new_loss = f_new if rec.accepted else f0
        return rec, scale, kept

    @classmethod
    def _planned_lambdas(cls, gns: bool, scale: float, gnorm: float, tries: int, inv: float):
        """The ``lambda / c`` of every try, computed as :meth:`_search`'s loop does."""
        lams = []
        for _ in range(tries):
            lams.append(cls._lambda(gns, scale, gnorm) * inv)
            scale = scale / 2 if gns else scale * 2
        return lams

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

        Everything the step changes (the parameters, ``state``) is written at its end: a
        closure or a solve that raises leaves the optimizer and the parameters as they were.

        Args:
            closure: recomputes and returns the loss (see the class docstring for its form
                per curvature) without calling ``backward()``.

        Returns:
            The objective ``f(x)`` at the start of the step (detached).
        """
        if closure is None:
            raise ValueError("Invalid closure: RegularizedNewton needs a closure")
        if lightning_automatic(closure):
            raise RuntimeError(LIGHTNING_AUTOMATIC)
        self._validate_groups()  # values set directly (a scheduler's lr, say)
        group = self.param_groups[0]
        differ = [k for k in HYPERPARAMETERS if any(g[k] != group[k] for g in self.param_groups)]
        if differ:  # all are global; set per group directly (a scheduler with per-group factors)
            raise ValueError(f"Invalid param groups: they differ in {', '.join(differ)} (global)")
        params = [p for grp in self.param_groups for p in grp["params"] if p.requires_grad]
        if not params:  # every parameter frozen: nothing to update (as torch.optim)
            with torch.enable_grad():
                return parse_closure_output(closure(), group["curvature"])[0].detach()
        check_parameters(params)
        lr, sign = float(group["lr"]), -1.0 if group["maximize"] else 1.0
        fn = maximizing(closure) if group["maximize"] else closure  # minimizes -f
        dtype = params[0].dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        cache, self._cache = self._cache, None
        reused = cache is not None and self._reusable(cache, closure, params)
        evaluation = cache["evaluation"] if reused else None
        del cache  # a stale kept graph goes before a fresh evaluation builds another
        last = self._last_closure
        keep = self.reuse_trial and lr == 1.0 and (last is None or closure == last)
        if reused:  # the last step's accepted trial point is this step's x
            f, aux, grads, g, loss = evaluation
        else:
            # global mean loss and gradient under DDP (its hooks never ran); a rank that
            # rejects its closure output says so in that all-reduce and every rank raises
            f, aux, grads, g, loss, flag = global_evaluation(fn, params, group["curvature"], work)
        finite, f0, c, gnorm, g_c = start_numbers(loss, g, None if reused else flag)
        del g, evaluation  # the solves take g / c: P numbers freed before they start
        if group["curvature"] not in ("hessian", "dense"):
            grads = None  # only Hessian products go through the gradient's own graph
        if not finite and self.nonfinite == "raise":
            raise ValueError("Invalid loss or gradient: contains NaN or Inf")
        saved = self._first_state()
        state = dict(saved) if "step" in saved else self._initial_state(group)  # a draft
        state["closure_evals"] += 0 if reused else 1
        if not finite:
            state["skipped_steps"] += 1
            state["record"] = {"accepted": False, "skipped": True, "tries": 0, "loss": sign * f0}
            return self._commit(state, closure, sign * loss)
        state["step"] = state["step"] + 1
        # c = 4^k ~ max |g_i|: the solves in units of order one; |g| = |g / c| c exactly
        if gnorm == 0.0:  # stationary: nothing to do
            state["record"] = {"accepted": False, "tries": 0, "loss": sign * f0, "grad_norm": 0.0}
            return self._commit(state, closure, sign * loss)
        gns = group["regularization"] == "gns"
        scale = state["gamma"] if gns else state["M"]
        if scale is None:  # the sqrt rule's M, so that the first try has gamma0
            scale = gnorm / group["gamma0"] ** 2
        curv = make_curvature(group["curvature"], f, aux, grads, params, work, group)
        solver = self._make_solver(group, ScaledCurvature(curv, 1.0 / c), g_c, gnorm, state)
        start = SearchStart(fn, params, f0, gnorm, scale, keep, work, 1.0 / c, lr)
        rec, scale, kept = self._search(start, group, solver, curv.release)  # writes x at the end
        if kept is not None:
            versions = [(p._version, p.data_ptr()) for p in params]
            self._cache = dict(closure=closure, params=params, versions=versions, evaluation=kept)
        state["closure_evals"] += rec.evals
        state["tries"] += rec.tries
        state["curvature_products"] += curv.products
        state["cg_iterations"] += rec.cg_iterations
        state["record"] = rec = rec.as_record(reused, f0, gnorm)
        rec["loss"], rec["new_loss"] = sign * rec["loss"], sign * rec["new_loss"]
        if rec["accepted"]:
            if rec["margin"] or group["growth"] == "double":
                scale = min(2 * scale, _SCALE_MAX) if gns else max(scale / 2, 1 / _SCALE_MAX)
            state["gamma" if gns else "M"] = scale
            if group["cg_tol"] == "eisenstat_walker":  # this step's |g| and tolerance
                state["forcing"] = (gnorm, solver.tol)
            return self._commit(state, closure, sign * loss)
        state["failed_steps"] += 1
        if not gns and state["M"] is None:
            state["M"] = gnorm / group["gamma0"] ** 2
        warnings.warn(
            f"RegularizedNewton: every try was rejected ({rec['tries']} tries, last: "
            f"{rec['reasons'][-1]}); the parameters are unchanged",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
        return self._commit(state, closure, sign * loss)

    def _commit(self, state: dict[str, Any], closure, loss: torch.Tensor) -> torch.Tensor:
        """Write the step's drafted global state and remember its closure; return ``loss``."""
        self.state[self.param_groups[0]["params"][0]].update(state)
        self._last_closure = closure if self.reuse_trial else None
        return loss
