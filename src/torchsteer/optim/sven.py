"""Sven: singular value descent, a minimum-norm step through a truncated-SVD pseudoinverse."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from torchsteer import distributed as dist
from torchsteer.distributed import Shard
from torchsteer.jacobian import JacobianOperator, graph_jacobian, unwrap_model
from torchsteer.jacobian.captured import GraphRowCapture
from torchsteer.jacobian.per_sample import per_sample_jacobian
from torchsteer.optim._sven_contract import (
    GLOBAL,
    PATH,
    RECORDS,
    SKIP_WARNING,
    SvenContract,
    explained,
)
from torchsteer.optim._sven_ddp import RowShardedOperator, group, grouped, solve_gram_sharded
from torchsteer.optim._sven_device import MaskedSteps
from torchsteer.optim._sven_step import (
    CheckedOperator,
    NonFinite,
    ResidualOperator,
    Solution,
    SolveConfig,
    group_rows,
    max_abs,
    plausible,
    power_of_two_scale,
    residuals,
    reuse_buffer,
    solve_operator,
    unscale,
)
from torchsteer.optim.sven_memory import Plan, plan

__all__ = ["SKIP_WARNING", "Sven"]


class Sven(MaskedSteps, SvenContract, torch.optim.Optimizer):
    r"""Sven (singular value descent): the minimum-norm step that zeroes the linearized residuals.

    With per-sample losses ``l_a(theta)``, ``a = 1..B`` (what the closure returns)::

        R = l^(kappa/2)                       residuals (kappa = 2: the losses themselves)
        M = dR/dtheta                         (B x P, spanning the parameters of all groups)
        M ~ U_k diag(S_k) V_k^T               top ``rank`` singular triplets
        keep S_i > rtol * S_max and S_i > 0
        d = V_k diag(1/S_k) U_k^T R           = argmin |d| over argmin |R - M d| (in the kept space)
        b = momentum * b + d                  (b = d when momentum = 0)
        theta_g <- theta_g - lr_g * b_g       per parameter group g (+ with maximize)

    Only the parameters with ``requires_grad`` enter M and move; a frozen one
    (``requires_grad=False``) is skipped as ``torch.optim`` skips it, on every path.

    By default there is no damping: the regularization is spectral (``rank`` and ``rtol``), as
    in the paper. Two optional safeguards (off by default): ``damping = mu`` replaces the
    filter ``1/S_i`` by ``S_i / (S_i^2 + mu S_max^2)`` (Levenberg-Marquardt relative to the
    top of the spectrum, so the loss-scale invariance holds); ``max_step_norm = Delta``
    scales ``d`` so that the step ``(lr_g d_g)_g`` has norm at most Delta (a trust region; it
    acts before momentum). For squared error
    with ``kappa = 1`` the residuals are ``|f - y|`` and ``d`` is the Gauss-Newton step; with
    B = 1 it is the Polyak step ``(2/kappa) l g / |g|^2``. Scaling every loss by ``c > 0``
    leaves ``d`` unchanged.

    **Two ways in.** The *graph path*: ``step(closure)``, where the closure zeroes the
    gradients and returns the per-sample loss vector (B,) with its autograd graph (e.g.
    ``loss_fn(model(x), y)`` with ``reduction="none"``); the dense Jacobian then costs one
    batched backward (B backward passes through the whole batch: O(B^2) work for an MLP). The
    *functional path*: build with ``model=`` and ``loss_fn=`` and call ``step(batch=(x, y))``;
    the Jacobian is formed by ``vmap(grad)`` over single samples (O(B) work, several times
    faster), and the matrix-free products run in forward mode. ``loss_fn(outputs, targets)``
    returns per-sample losses; entries beyond the first dimension are summed.

    **Dense or matrix-free** (``jacobian``): ``"dense"`` forms M (B x P) and solves exactly
    through ``eigh`` of the smaller Gram matrix (``svd="exact"``) or a randomized SVD of M;
    ``"matrix_free"`` never forms M and runs a randomized SVD on products ``M V`` and
    ``M^T U`` (about ``(rank + oversample) (2 + 2 power_iters)`` JVPs/VJPs, memory
    ``O((B + P) (rank + oversample))``); ``svd="exact"`` there sketches all ``min(B, P)``
    columns, which captures the row space exactly. ``"auto"`` is dense when M's ``n B P``
    bytes fit ``memory_budget``, else matrix-free, at a smaller ``param_fraction`` when the
    sketch's ``n l (2 P + 2 P_k)`` bytes would not fit (:mod:`torchsteer.optim.sven_memory`).
    ``"dense"`` over budget, or ``"auto"`` with nothing that fits, raises ``MemoryBudgetError``
    (a ``ValueError`` naming the bytes and the options) before anything is allocated: at
    construction when even B = 1 is over, else at the step before any Jacobian product.
    ``svd="auto"`` is exact on the dense path unless a randomized sketch is much cheaper,
    randomized on the matrix-free path.

    **DDP**: with a process group each rank passes its own samples and the step is that of
    the concatenated batch; the Jacobian's rows stay on their ranks (gathered sketches and
    all-reduced products, or a column all-to-all and a B x B Gram all-reduce on the dense
    exact path), the mean loss and the records are global, rank 0's generator state is
    broadcast at the first step.

    Per step the first parameter's state records ``kept_rank``, ``sigma_max``, ``sigma_min``
    (smallest kept), ``linearized_reduction`` (``1 - |R - M d| / |R|``, the share of the
    residual norm a step with lr = 1 would remove on the linearized problem), ``step`` and
    ``skipped_steps``, ``generator_state`` (the random source of sketches and parameter
    subsets, so a resumed run continues bit-for-bit), ``matrix_free`` (1.0 when the last step
    took the matrix-free path, 0.0 dense; ``opt.jacobian_path`` reads it as a string) and
    ``path_fraction`` (the fraction of coordinates it updated: ``param_fraction``, or less
    where ``"auto"`` lowered it).

    **The optimizer contract** (``optim/_contract.py``, as M-FAC): every hyperparameter is a
    key of ``defaults`` and of every param group, so ``state_dict()``, ``copy.deepcopy`` and
    ``pickle`` carry it (``model`` and ``loss_fn`` travel with deepcopy/pickle too); ``lr``,
    ``momentum`` and ``maximize`` may differ per group, all others are global (a later group
    that gives another value raises ``ValueError``). Values are checked at construction, in
    ``add_param_group`` and at each step; ``load_state_dict`` validates everything (groups,
    state keys, shapes, dtypes) before it assigns anything, keeps the saved dtypes and keeps
    the live ``nonfinite``. :data:`SKIP_WARNING` (5) skipped steps in a row warn once.

    Args:
        params: parameters or param groups (``lr``, ``momentum`` and ``maximize`` may differ
            per group).
        lr: learning rate (authors' default 0.1); a float or a 0-d tensor.
        rank: number of singular triplets k (authors' default B // 2).
        rtol: relative cut-off of singular values, ``0 <= rtol < 1`` (default 1e-3).
        kappa: residual exponent, ``R = l^(kappa/2)`` (losses must be >= 0 unless kappa = 2).
        svd: ``"auto"``, ``"exact"`` or ``"randomized"``.
        jacobian: ``"auto"``, ``"dense"`` or ``"matrix_free"``.
        oversample: extra sketch columns of the randomized SVD.
        power_iters: subspace iterations of the randomized SVD.
        param_fraction: fraction of the coordinates, drawn afresh each step, that the step
            updates (the others' columns of M are dropped).
        microbatch_size: average the losses over consecutive groups of this many samples
            before forming residuals (fewer rows: cheaper SVD, coarser fit).
        momentum: heavy-ball coefficient on the direction, ``0 <= momentum < 1``.
        nonfinite: ``"raise"`` (ValueError; nothing changes) or ``"skip"`` (nothing changes
            but ``skipped_steps``) when the losses, the Jacobian or the step hold NaN/Inf.
        memory_budget: bytes for the dense Jacobian or the matrix-free sketch under
            ``jacobian="auto"``, and the limit of ``"dense"`` (256 MB).
        seed: seed of the sketch generator (default: drawn from torch's global generator).
        gram_dtype: dtype of the Gram matrix and ``eigh`` of the dense exact solve (default:
            the algebra dtype); ``torch.float64`` resolves float32 spectra below
            ``2 sqrt(eps32) S_max`` at the price of a slower ``eigh``.
        damping: relative Levenberg-Marquardt damping ``mu >= 0`` (0: the paper's step).
        max_step_norm: trust-region radius on the norm of the step, in parameter units
            (None: no limit).
        model, loss_fn: enable the functional path (``step(batch=...)``).
        maximize: step up the residuals instead of down (``theta + lr b``), as ``torch.optim``.
        foreach, differentiable: accepted as ``torch.optim`` (``None``/``False``); Sven applies
            one flat direction and is not differentiable, so ``True`` raises ``ValueError``.

    Sparse gradients (``nn.Embedding(sparse=True)``) raise ``ValueError``: M is dense.

    Memory: dense, the Jacobian B x P in the algebra dtype plus one transient copy while it
    is assembled, plus a B x B Gram; on the functional path of an all-``nn.Linear`` network
    the Jacobian is written into a buffer the optimizer keeps between steps (no transient
    copy, and no page faults of a fresh allocation each step). Singular values below
    ``2 sqrt(eps) S_max`` of the Gram dtype (``7e-4 S_max`` in float32) are rounding noise of
    ``M M^T`` and are dropped.
    Matrix-free: a few (B + P) x (rank + oversample) blocks. bf16/fp16 parameters use
    float32 algebra and float32 momentum.

    References:
        Bright-Thonney, Harvey, Lukas, Thaler, "Sven: Singular Value Descent as a
        Computationally Efficient Natural Gradient Method", arXiv:2604.01279 (2026).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 0.1,
        rank: int = 64,
        rtol: float = 1e-3,
        kappa: float = 2.0,
        svd: str = "auto",
        jacobian: str = "auto",
        oversample: int = 10,
        power_iters: int = 2,
        param_fraction: float = 1.0,
        microbatch_size: int | None = None,
        momentum: float = 0.0,
        nonfinite: str = "raise",
        memory_budget: int = 256 * 2**20,
        seed: int | None = None,
        gram_dtype: torch.dtype | None = None,
        damping: float = 0.0,
        max_step_norm: float | None = None,
        model: torch.nn.Module | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
    ) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        defaults = dict(lr=lr, momentum=momentum, maximize=maximize)
        defaults.update({k: v for k, v in locals().items() if k in GLOBAL})
        self._validate_group(defaults)
        if loss_fn is not None and model is None:
            raise ValueError("Invalid loss_fn: the functional path needs model= as well")
        for key in ("rtol", "kappa", "param_fraction", "damping"):
            defaults[key] = float(defaults[key])
        if max_step_norm is not None:
            defaults["max_step_norm"] = float(max_step_norm)
        super().__init__(params, defaults)
        self.model, self.loss_fn = model, loss_fn
        for p in self._params():
            if not p.is_floating_point() or p.is_complex():
                raise ValueError(f"Invalid parameter dtype: {p.dtype} (real floating point only)")
        self._reset_runtime()
        self._plan(1)  # over budget even at B = 1 (dense, or auto with nothing that fits)

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _active(self) -> list[torch.Tensor]:
        """The parameters the step moves: those that require grad (frozen ones skipped)."""
        return [p for p in self._params() if p.requires_grad]

    def _algebra_dtype(self) -> torch.dtype:
        dtypes = {p.dtype for p in self._active()}
        return torch.float64 if torch.float64 in dtypes else torch.float32

    def _named_params(self) -> dict[str, torch.Tensor]:
        module = unwrap_model(self.model)
        names = {id(p): n for n, p in module.named_parameters()}
        out = {}
        for p in self._active():
            if id(p) not in names:
                raise ValueError("Invalid model: an optimized parameter is not in the model")
            out[names[id(p)]] = p
        for m in module.modules():
            if getattr(m, "sparse", False) is True and any(p.requires_grad for p in m.parameters()):
                raise ValueError(
                    f"Invalid model: {type(m).__name__}(sparse=True) gives sparse gradients, "
                    "which Sven does not support (its Jacobian is dense); use sparse=False"
                )
        return out

    def _losses_from_closure(self, closure) -> tuple[torch.Tensor, GraphRowCapture | None]:
        if closure is None:
            raise ValueError(
                "Invalid closure: Sven needs a closure returning the per-sample losses (B,), "
                "or batch=(inputs, targets) with model= and loss_fn= given"
            )
        capture = GraphRowCapture(self._active()) if self.jacobian != "matrix_free" else None
        with torch.enable_grad(), capture or contextlib.nullcontext():
            out = closure()
        if not isinstance(out, torch.Tensor) or out.dim() != 1:
            if not isinstance(out, torch.Tensor):
                got = type(out).__name__
            else:
                got = "a scalar" if out.dim() == 0 else f"shape {tuple(out.shape)}"
            raise ValueError(
                f"Invalid closure output: Sven needs the per-sample loss vector of shape (B,) "
                f"(e.g. reduction='none'), got {got}"
            )
        if not out.requires_grad:
            raise ValueError(
                "Invalid closure output: the per-sample losses carry no autograd graph"
            )
        for p in self._active():
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(
                    "Invalid gradient: a sparse gradient (e.g. nn.Embedding(sparse=True)); "
                    "Sven's Jacobian is dense, use sparse=False"
                )
        return out, capture

    def _plan(self, rows: int) -> Plan:
        """This step's path and fraction (:func:`~torchsteer.optim.sven_memory.plan`); a
        :class:`~torchsteer.optim.sven_memory.MemoryBudgetError` when nothing fits."""
        args = (self._n_params(), self._itemsize(), self.memory_budget, self.param_fraction)
        exact = self.svd == "exact"
        return plan(self.jacobian, rows, *args, self.rank, self.oversample, exact)

    def _randomized_dense(self, rows: int, cols: int) -> bool:
        if self.svd != "auto":
            return self.svd == "randomized"
        width = min(self.rank + self.oversample, rows, cols)
        return 2 * (2 + 2 * self.power_iters) * width < min(rows, cols)

    # ------------------------------------------------------------------ the step
    def _n_params(self) -> int:
        return sum(p.numel() for p in self._active())

    def _itemsize(self) -> int:
        return torch.finfo(self._algebra_dtype()).bits // 8

    def _config(self, exact_svd: bool) -> SolveConfig:
        return SolveConfig(
            self.rank,
            self.rtol,
            self.oversample,
            self.power_iters,
            self.gram_dtype,
            self.damping,
            exact_svd,
        )

    def _columns(self, gen: torch.Generator, fraction: float) -> torch.Tensor | None:
        """The coordinates this step updates (sorted), None for all (``fraction = 1``)."""
        if fraction == 1.0:
            return None
        n_params = self._n_params()
        n_keep = max(1, math.ceil(fraction * n_params))
        cols = torch.randperm(n_params, generator=gen)[:n_keep].sort().values
        return cols.to(self._active()[0].device)

    def _solve(self, losses, source, path, gen, shard) -> tuple[Solution, torch.Tensor | None]:
        """The direction on the kept coordinates (and their indices, None for all).

        Under DDP ``losses`` are those of all ranks, ``source`` gives this rank's rows. A
        solve that fails or looks over/underflowed (``plausible``) is redone on M scaled to
        ``max |M| ~ 1`` (``d(M, R) = (s_M / s_R) d(s_M M, s_R R)``, see ``_sven_step``), from
        the same generator state; NaN/Inf in M raises :class:`NonFinite`, any other error of
        the solve propagates as it is. The dense path in one process is :meth:`_solve_local`
        (one read, or none for a masked step); the others return ``None`` as their third
        value (no flags: the verdict was read)."""
        alg, mb = self._algebra_dtype(), self.microbatch_size
        cols, dense = self._columns(gen, path.fraction), path.path == "dense"
        if dense and shard.world == 1:
            return self._solve_local(losses, source, path, gen, cols)
        lg = group(shard, losses.to(alg), mb)
        R, D = residuals(lg, self.kappa)
        checks = [torch.isfinite(lg).all().to(alg), (lg < 0).any().to(alg), max_abs(R)]
        finite, negative, r_max = torch.stack(checks).tolist()  # one host synchronization
        if finite != 1.0:  # NaN/Inf in a loss shows in its micro-batch mean
            raise NonFinite("per-sample losses")
        if self.kappa != 2.0 and negative == 1.0:
            raise ValueError(f"Invalid losses: kappa = {self.kappa} needs losses >= 0")
        scale_r = power_of_two_scale(r_max, alg)  # R is finite here
        R = R if scale_r == 1.0 else R * scale_r
        shard = grouped(shard, mb)  # rows after the micro-batch means
        D_local = shard.local(D)
        if dense:  # M = diag(D) G J[:, cols], this rank's rows
            M = group_rows(source("dense").to(alg), mb)
            M = M if cols is None else M[:, cols]
            M = M if self.kappa == 2.0 else M.mul_(D_local.unsqueeze(1))
            config = self._config(not self._randomized_dense(shard.total, M.shape[1]))
            if config.exact_svd:
                solver, system, extra = solve_gram_sharded, M, shard
            else:
                solver, system, extra = solve_operator, RowShardedOperator(M, shard), gen
        else:
            config = self._config(self.svd == "exact")
            system = ResidualOperator(source("matrix_free"), D_local, mb, cols, alg)
            if shard.world > 1:
                system = RowShardedOperator(system, shard)
            solver, extra = solve_operator, gen
        start = gen.get_state()
        try:
            sol = solver(system, R, config, extra)
        except (RuntimeError, ValueError):
            sol = None  # looked at below: NaN/Inf in M, or the error again
        if sol is not None and plausible(sol):  # every rank: the same global quantities
            return unscale(sol, 1.0, scale_r), cols, None
        gen.set_state(start)
        if dense:
            amax = dist.all_reduce_max(torch.nan_to_num(max_abs(M), nan=math.inf))
            scale_m = power_of_two_scale(float(amax), alg, band=0)  # NaN/Inf: NonFinite
            M.mul_(scale_m)  # in place: ``system`` sees it
        else:
            system = CheckedOperator(system)
        sol = solver(system, R, config, extra)
        sol = unscale(sol, scale_m if dense else (system.scale or 1.0), scale_r)
        if not bool(torch.isfinite(torch.cat([sol.direction, sol.sigma_max.reshape(1)])).all()):
            raise NonFinite("step")
        return sol, cols, None

    @staticmethod
    def _rows(shard: Shard) -> int:
        """Rows of the Jacobian this rank forms (the largest over ranks: the same decision)."""
        return max(shard.rows)

    def _graph_source(self, out: torch.Tensor, capture: GraphRowCapture | None):
        """The rows of the closure's graph: from one backward when every layer allows it
        (:class:`~torchsteer.jacobian.captured.GraphRowCapture`), else a batched backward
        (B passes) with one warning that says why."""
        params = self._active()

        def source(kind):
            with torch.enable_grad():
                if kind == "matrix_free":
                    return JacobianOperator.from_graph(out, params)
                if capture is not None:
                    if kind == "factored":  # one dtype, the algebra's (_factored_ok)
                        J = capture.factors(out, lambda: self._jacobian_buffer(out.shape[0]))
                    else:
                        one_dtype = len({p.dtype for p in params}) == 1
                        buf = self._jacobian_buffer(out.shape[0]) if one_dtype else None
                        J = capture.rows(out, out=buf)
                    if J is not None:
                        return J
                    self._warn_exact_path(capture.reason)
                return graph_jacobian(out, params)

        return source

    def _jacobian_buffer(self, rows: int) -> torch.Tensor:
        """The reused (rows, P) buffer of the dense functional Jacobian (not state)."""
        first = self._active()[0]
        self._jac_buf = reuse_buffer(self._jac_buf, rows, self._n_params(), first)
        return self._jac_buf if self._jac_buf.shape[0] == rows else self._jac_buf[:rows]

    def _functional(self, batch, dense: bool, factored: bool) -> tuple[torch.Tensor, Callable]:
        if self.model is None or self.loss_fn is None:
            raise ValueError("Invalid batch: the functional path needs model= and loss_fn=")
        inputs, targets = batch
        named, model, loss_fn = self._named_params(), self.model, self.loss_fn
        n = inputs.shape[0]
        got = self._functional_factors(inputs, targets) if dense and factored else None
        if got is not None:
            return got
        if dense:
            one_dtype = len({p.dtype for p in named.values()}) == 1
            values, jac = per_sample_jacobian(
                model,
                loss_fn,
                inputs,
                targets,
                named,
                out=self._jacobian_buffer(n) if one_dtype else None,
                return_values=True,
            )
            return values, lambda kind: jac
        bufs = dict(unwrap_model(model).named_buffers())

        def f(q):
            out = torch.func.functional_call(unwrap_model(model), {**q, **bufs}, (inputs,))
            return loss_fn(out, targets).reshape(n, -1).sum(1)

        values = f({k: v.detach() for k, v in named.items()})
        return values, lambda kind: JacobianOperator.from_function(f, named)

    def _initial_generator(self) -> torch.Tensor:
        """The generator state of the first step: from ``seed`` (rank 0's under DDP)."""
        if self._synced_generator is not None:
            return self._synced_generator
        return torch.Generator().manual_seed(self.seed).get_state()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None, *, batch=None):
        """One Sven step; returns the mean loss before the step.

        Args:
            closure: zeroes the gradients and returns the per-sample losses (B,) with their
                graph (graph path). With ``batch`` it is optional; if given (Lightning passes
                its own) it is called once and its value ignored.
            batch: ``(inputs, targets)`` for the functional path (needs ``model=`` and
                ``loss_fn=``).

        Raises:
            ValueError: a scalar or graph-less closure output, invalid losses, no parameter
                that requires grad, sparse gradients, an invalid hyperparameter set in a
                group, or NaN/Inf in the losses, Jacobian or step with ``nonfinite="raise"``
                (nothing changed). Any other error of the model, the closure or the solve
                propagates as it is (with ``nonfinite="skip"`` too).
        """
        self._validate_groups()
        first = self._params()[0]
        if not self._active():
            raise ValueError(
                "Invalid parameters: none requires grad (all frozen); Sven has nothing to step"
            )
        if batch is not None:
            if closure is not None:
                with torch.enable_grad():
                    closure()
            shard = Shard.create(int(batch[0].shape[0]), first.device)
            self._check_not_empty(shard, "batch")
            path = self._plan(self._rows(shard))  # over budget: raised before any forward
            factored = shard.world == 1 and self._factored_ok(shard.total, path)
            losses, source = self._functional(batch, path.path == "dense", factored)
        else:
            losses, source, shard = self._graph_losses(closure, first.device)
            self._check_not_empty(shard, "per-sample losses")
            path = self._plan(self._rows(shard))  # before any Jacobian product
        losses = losses.detach()
        losses = shard.gather(losses)  # every rank's: global mean, checks and residuals
        mean_loss = losses.mean()
        state = self._first_state()  # no entry is created until the step is taken
        if shard.world > 1 and "generator_state" not in state:  # rank 0's sketches for all
            synced = dist.broadcast(self._initial_generator().to(first.device, copy=True))
            self._synced_generator = synced.cpu()
        gen = torch.Generator()
        gen.set_state(state.get("generator_state", self._initial_generator()).to(torch.uint8))
        try:
            sol, cols, flags = self._solve(losses, source, path, gen, shard)
            if flags is not None:
                self._masked_step(sol, cols, flags)  # the verdict stays on the device
                return mean_loss
            self._settle_run()  # a run of masked skips, if one is still unread
        except NonFinite as err:
            if self.nonfinite == "raise":
                raise ValueError(f"Invalid {err.args[0]}: contains NaN or Inf") from err
            self._settle_run()
            state = self.state[first]
            self._init_state(state)
            state["skipped_steps"] += 1
            self._skipped(err.args[0])
            return mean_loss
        except RuntimeError as err:  # not NaN/Inf: the error as it is, or a clearer one
            clearer = explained(err)
            if clearer is err:
                raise
            raise clearer from err
        self._skips_in_row = 0
        self._apply(sol, cols)
        state = self.state[first]
        self._init_state(state)
        state["step"] += 1
        state["generator_state"] = gen.get_state()
        for key in RECORDS:  # the solve's own 0-d results (a view, if any, is copied)
            record = getattr(sol, key)
            state[key] = record if record._base is None else record.clone()
        # written every step: a state loaded from another run may hold another path
        state[PATH[0]] = torch.tensor(float(path.path == "matrix_free"))
        state[PATH[1]] = torch.tensor(path.fraction, dtype=torch.float64)
        self._host_path = (path.path, path.fraction)
        return mean_loss

    def _init_state(self, state: dict) -> None:
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["skipped_steps"] = torch.tensor(0.0)
            state["generator_state"] = self._initial_generator().clone()
