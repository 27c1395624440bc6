"""The dense single-process Sven step with every decision on the device (issue 17).

The step of :mod:`torchsteer.optim._sven_step` with its host reads replaced by tensor
arithmetic, so that a steady-state step makes no host synchronization:

    s_R = 2^-e(max |R|)   if max |R| outside [2^-16, 2^16], else 1    (R <- s_R R)
    s_M = 2^-e(max |M|)   if max |M| outside [2^-16, 2^16], else 1    (M <- s_M M)
    d   = (s_M / s_R) d(s_M M, s_R R),   S = S(s_M M) / s_M

with ``x = m 2^e(x)``, ``0.5 <= m < 1`` (:func:`scale_to_unit`, the device twin of
:func:`~torchsteer.optim._sven_step.power_of_two_scale`). Powers of two are exact, so a
scale of 1 leaves every bit as it was and any other scale changes ``d`` by rounding only. The
former code solved M unscaled first and rescaled only when that solve failed or gave
``S_max`` outside ``[2^-30, 2^30]``, a decision the host had to read; deciding on
``max |M|`` needs no solve: ``max |M| <= S_max <= sqrt(B P) max |M|``, and inside the band
the Gram matrix neither overflows nor underflows (entries up to ``P 2^32``, its largest at
least ``2^-32``).

The verdict is the vector ``flags = (finite(l), any(l < 0), finite(M), finite(d, S_max))``
(:func:`masked_solve`); with ``nonfinite="skip"`` the update is written through
``torch.where(ok, new, old)`` (:func:`masked_update`), ``ok = flags_0 and flags_2 and
flags_3``, so a rejected step leaves parameters and momentum as they were, bit for bit.

A step that reads its verdict anyway (``nonfinite="raise"``, or any step that cannot be
masked) takes the former path instead, :meth:`MaskedSteps._read_once_solve`: M solved as
it is (no pass over M before the solve), then one transfer for the verdict and the rescale
decision; the two passes ``max |M|`` and ``M <- s_M M`` are paid only by the rare step whose
unscaled solve failed or was out of band.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchsteer.jacobian import unwrap_model
from torchsteer.jacobian.captured import GraphRowCapture
from torchsteer.jacobian.factored import MIN_FACTORED, FactoredRows
from torchsteer.linalg.truncated import TruncatedSolution as Solution
from torchsteer.optim._sven_contract import RECORDS, SKIP_WARNING
from torchsteer.optim._sven_step import (
    NonFinite,
    group_rows,
    max_abs,
    power_of_two_scale,
    residuals,
    solve_rows,
    unscale,
)

__all__ = [
    "FREE_READS",
    "MaskedSteps",
    "masked_solve",
    "masked_update",
    "ok_of",
    "raise_verdict",
    "scale_to_unit",
]

_BAND = 16  # as _sven_step: |log2 max|x|| up to which nothing is rescaled
FREE_READS = ("cpu",)  # device types whose host reads cost no synchronization


def scale_to_unit(amax: torch.Tensor, band: int = _BAND) -> torch.Tensor:
    """``2^-e`` with ``amax = m 2^e``, ``0.5 <= m < 1`` (a 0-d tensor of ``amax``'s dtype);
    1 when ``2^-band <= amax <= 2^band`` (``band > 0``), ``amax = 0`` or ``amax`` is NaN/Inf.
    The exponent is clamped so that the scale stays a normal number of the dtype."""
    limit = math.frexp(torch.finfo(amax.dtype).max)[1] - 2
    _, e = torch.frexp(amax)
    scale = torch.exp2(torch.clamp(-e, -limit, limit).to(torch.float64)).to(amax.dtype)
    one = (amax == 0) | ~torch.isfinite(amax)
    if band > 0:
        one = one | ((amax >= 2.0**-band) & (amax <= 2.0**band))
    return torch.where(one, torch.ones_like(scale), scale)


def solve_rows_clean(M, R, config, generator):
    """:func:`~torchsteer.optim._sven_step.solve_rows` with ``clean=True`` (a masked step)."""
    return solve_rows(M, R, config, generator, clean=True)


def masked_solve(M, losses, kappa: float, config, solver, generator):
    """The direction of ``(M, R(losses))`` from ``solver`` (e.g. ``solve_dense``) and the
    verdict ``flags`` (``float`` 0/1: finite losses, a negative loss, finite M, finite step).

    ``M`` (B, P) is the residual Jacobian ``diag(D) J``; it is scaled in place (held as
    :class:`~torchsteer.jacobian.factored.FactoredRows`: through its row scale, from the
    bound :meth:`~torchsteer.jacobian.factored.FactoredRows.max_abs`). No host read
    (with a solver that reads none: ``solve_dense`` on the exact path cleans NaN/Inf out of
    the B x B Gram matrix so that ``eigh`` does not fail): a NaN/Inf loss or Jacobian shows
    in ``flags`` only, and the step must be masked by it.
    """
    R, _ = residuals(losses, kappa)
    scale_r = scale_to_unit(max_abs(R))
    m_max = max_abs(M)  # of FactoredRows a bound: the scale is a power of two either way
    scale_m = scale_to_unit(m_max)
    M = M.scaled(scale_m) if isinstance(M, FactoredRows) else M.mul_(scale_m)
    sol = solver(M, R * scale_r, config, generator)
    sol = Solution(
        sol.direction * (scale_m / scale_r),
        sol.kept_rank,
        sol.sigma_max / scale_m,
        sol.sigma_min / scale_m,
        sol.linearized_reduction,
    )
    finite_step = torch.isfinite(sol.direction).all() & torch.isfinite(sol.sigma_max)
    checks = [torch.isfinite(losses).all(), (losses < 0).any(), torch.isfinite(m_max)]
    flags = torch.stack([*checks, finite_step]).to(losses.dtype)
    return sol, flags


def ok_of(flags: torch.Tensor) -> torch.Tensor:
    """The verdict of a step as a 0-d bool tensor: finite losses, M and step."""
    return (flags[0] * flags[2] * flags[3]).bool()


def masked_update(p, buf, dp, ok, alpha: float, momentum: float):
    """``(p', buf')``: ``buf' = momentum buf + dp`` (``buf`` None or ``momentum = 0``: ``dp``)
    and ``p' = p + alpha buf'``, each ``torch.where(ok, new, old)``: the old tensors where
    the verdict is false. The arithmetic is that of ``buf.mul_(momentum).add_(dp)`` and
    ``p.add_(buf, alpha=alpha)``, so the bits are those of the unmasked update."""
    if buf is not None and momentum != 0.0:
        new_buf = torch.where(ok, buf * momentum + dp, buf)
        step = new_buf
    else:
        new_buf, step = buf, dp
    new_p = torch.where(ok, torch.add(p, step.to(p.dtype), alpha=alpha), p)
    return new_p, new_buf


def raise_verdict(values: list[float], kappa: float) -> None:
    """The host's reading of ``flags`` (:func:`masked_solve`): :class:`NonFinite` naming the
    first of losses, Jacobian, step that holds NaN/Inf, or ``ValueError`` for a negative
    loss under ``kappa != 2``, in the order the former step checked them."""
    finite_l, negative, finite_m, finite_step = values[:4]
    if finite_l != 1.0:  # NaN/Inf in a loss shows in its micro-batch mean
        raise NonFinite("per-sample losses")
    if kappa != 2.0 and negative == 1.0:
        raise ValueError(f"Invalid losses: kappa = {kappa} needs losses >= 0")
    if finite_m != 1.0:
        raise NonFinite("Jacobian")
    if finite_step != 1.0:
        raise NonFinite("step")


def _what(values: list[float]) -> str:
    return "per-sample losses" if values[0] != 1.0 else "Jacobian" if values[1] != 1.0 else "step"


class MaskedSteps:
    """Sven's steps whose verdict stays on the device (``nonfinite="skip"``).

    A step is *masked* when the host needs nothing from it: ``nonfinite="skip"``, ``kappa =
    2`` (else a negative loss is a ``ValueError``), the dense path in one process with the
    generator unused (exact SVD, ``param_fraction = 1``: a CPU generator's draw could not be
    undone on a skip without the host knowing), and state that exists already (the records,
    every momentum buffer, the path records of the same path: the device cannot create
    entries on one branch only). Its write is ``where(ok, new, old)`` for the parameters,
    the momentum buffers and the records, and ``step += ok``, ``skipped_steps += not ok``
    (these counters then live on the parameters' device, as ``torch.optim`` keeps ``step``
    under ``capturable=True``). Any other step reads its verdict once (one transfer).

    The run of skipped steps in a row is a device counter. It is read (one transfer) only at
    the earliest step at which it could reach :data:`SKIP_WARNING`: ``SKIP_WARNING - r``
    masked steps after a read that found ``r < SKIP_WARNING``, ``SKIP_WARNING + 1`` after one
    that found ``r >= SKIP_WARNING``; so the warning comes at the same step as before, and
    a run of good steps reads once every :data:`SKIP_WARNING` steps.
    """

    def _reset_runtime(self) -> None:
        super()._reset_runtime()
        self._skip_run: torch.Tensor | None = None  # the device run of skips (unread)
        self._unread = 0  # masked steps since the run was last read
        self._host_path: tuple | None = None  # (path, fraction) of the stored path records

    def _maskable(self, state: dict, path, uses_generator: bool) -> bool:
        """Whether this step can be masked (host facts only, no tensor read)."""
        if self.nonfinite != "skip" or self.kappa != 2.0 or uses_generator:
            return False
        if "kept_rank" not in state or self._host_path != (path.path, path.fraction):
            return False
        return all(
            "momentum_buffer" in self.state[p]
            for group in self.param_groups
            if group["momentum"] != 0.0
            for p in group["params"]
            if p.requires_grad
        )

    def _settle_run(self) -> None:
        """Read the device run of skips, if one is unread (one transfer); afterwards the
        host knows the run again (a step off the dense one-process path)."""
        if self._skip_run is not None:
            self._skips_in_row, self._skip_run, self._unread = round(float(self._skip_run)), None, 0

    def _factored_ok(self, rows: int, path) -> bool:
        """Whether this step's dense solve may take factored rows (host facts only): one
        process is the caller's to check; the exact solve on all coordinates, ``rows <= P``,
        no micro-batches, every parameter in the algebra dtype."""
        if path.path != "dense" or path.fraction != 1.0 or (self.microbatch_size or 1) > 1:
            return False
        if {p.dtype for p in self._active()} != {self._algebra_dtype()}:
            return False
        n_params = self._n_params()
        return rows <= n_params and not self._randomized_dense(rows, n_params)

    def _functional_factors(self, inputs, targets):
        """``(values, source)`` of the functional path from one forward and one backward of
        the module itself (:class:`~torchsteer.jacobian.captured.GraphRowCapture`, the
        closure path's rows, factored where it pays), or None where that capture refuses or
        the loss is not per-sample (then :func:`per_sample_jacobian` decides, as before)."""
        params = self._active()  # one dtype, the algebra's (_factored_ok)
        ids = {id(p) for p in params}
        if not any(  # a layer that could be factored: else the functional path as it was
            isinstance(m, nn.Linear) and id(m.weight) in ids and m.weight.numel() >= MIN_FACTORED
            for m in unwrap_model(self.model).modules()
        ):
            return None
        n, capture = inputs.shape[0], GraphRowCapture(params)
        with torch.enable_grad(), capture:
            out = self.loss_fn(unwrap_model(self.model)(inputs), targets)
        if out.dim() == 0 or out.shape[0] != n or not out.requires_grad:
            return None
        with torch.enable_grad():
            out = out.reshape(n, -1).sum(1)
            rows = capture.factors(out, lambda: self._jacobian_buffer(n))
        if rows is None:
            return None
        factored = isinstance(rows, FactoredRows)
        return out.detach(), lambda kind: rows.dense() if kind == "dense" and factored else rows

    def _solve_local(self, losses, source, path, gen, cols):
        """``_solve`` for the dense path in one process: ``(sol, cols, flags)``. A step that
        can be masked (:meth:`_maskable`) reads nothing (``masked_solve``; its ``flags``
        returned, to be written through); any other reads once (``_read_once_solve``, the
        path of 06f44c7; ``flags`` None). Only an error of the masked solve reads its
        verdict. A read-once exact step on all coordinates with B <= P, no micro-batches,
        asks ``source`` for factored rows (the closure path's
        :class:`~torchsteer.jacobian.factored.FactoredRows`: M never formed); any other
        source answers with the dense matrix."""
        alg, mb = self._algebra_dtype(), self.microbatch_size
        lg = group_rows(losses.to(alg), mb)
        n_cols = self._n_params() if cols is None else cols.numel()
        config = self._config(not self._randomized_dense(lg.shape[0], n_cols))
        uses_gen = cols is not None or not config.exact_svd
        maskable = self._maskable(self._first_state(), path, uses_gen)
        M = source("factored" if self._factored_ok(losses.shape[0], path) else "dense")
        D = None if self.kappa == 2.0 else residuals(lg, self.kappa)[1]
        if isinstance(M, FactoredRows):
            M = M if D is None else M.scaled(D)
        else:
            M = group_rows(M.to(alg), mb)
            M = M if cols is None else M[:, cols]
            M = M if D is None else M.mul_(D.unsqueeze(1))
        if not maskable:  # the solve of 06f44c7 (on factors when it has them)
            return self._read_once_solve(M, lg, self.kappa, config, solve_rows, gen), cols, None
        try:
            sol, flags = masked_solve(M, lg, self.kappa, config, solve_rows_clean, gen)
        except (RuntimeError, ValueError):
            checks = [torch.isfinite(lg).all(), (lg < 0).any(), torch.isfinite(max_abs(M)).all()]
            raise_verdict([*torch.stack(checks).tolist(), 1.0], self.kappa)
            raise
        return sol, cols, flags

    def _read_once_solve(self, M, losses, kappa: float, config, solver, generator):
        """The step of 06f44c7 with its reads joined into one: ``M`` solved as it is with
        ``R <- s_R R`` (:func:`scale_to_unit`, on the device), then ONE transfer of
        ``(finite(l), any(l < 0), s_R, finite(d, S_max), S_max)`` (and the device run of
        skips, if any). The verdict is raised (:class:`NonFinite`, or ``ValueError`` for a
        negative loss under ``kappa != 2``); a solve that failed, or whose ``S_max`` is not
        0 nor in ``[2^-30, 2^30]`` (:func:`~torchsteer.optim._sven_step.plausible`), is redone
        from the same generator state on ``s_M M``, ``s_M = 2^-e(max |M|)`` (band 0), with
        ``d = (s_M / s_R) d(s_M M, s_R R)``: two more reads (``max |M|``, a finite step)."""
        if losses.device.type in FREE_READS:  # a read costs nothing here: read as it goes
            sol, R, s_r, start = self._read_as_it_goes(M, losses, kappa, config, solver, generator)
            if sol is not None:
                return sol
        else:
            R, _ = residuals(losses, kappa)
            scale_r = scale_to_unit(max_abs(R))
            R = R * scale_r  # a scale of 1 leaves every bit
            start = generator.get_state()
            try:
                sol = solver(M, R, config, generator)
            except (RuntimeError, ValueError):
                sol = None  # looked at below: NaN/Inf in M, or the error again
            parts = [torch.isfinite(losses).all(), (losses < 0).any(), scale_r]
            if sol is not None:
                smax = sol.sigma_max.reshape(())
                parts += [torch.isfinite(sol.direction).all() & torch.isfinite(smax), smax]
            if self._skip_run is not None:
                parts.append(self._skip_run)
            values = torch.stack([t.to(torch.float64).reshape(()) for t in parts]).tolist()  # one
            if self._skip_run is not None:
                self._skips_in_row, self._skip_run, self._unread = round(values.pop()), None, 0
            finite_l, negative, s_r = values[:3]
            if finite_l != 1.0:  # NaN/Inf in a loss shows in its micro-batch mean
                raise NonFinite("per-sample losses")
            if kappa != 2.0 and negative == 1.0:
                raise ValueError(f"Invalid losses: kappa = {kappa} needs losses >= 0")
            if sol is not None and values[3] == 1.0:
                if values[4] == 0.0 or 2.0**-30 <= values[4] <= 2.0**30:
                    return unscale(sol, 1.0, s_r)
        generator.set_state(start)
        M = M.dense() if isinstance(M, FactoredRows) else M  # the rescale needs the entries
        amax = float(torch.nan_to_num(max_abs(M), nan=math.inf))
        scale_m = power_of_two_scale(amax, M.dtype, band=0)  # NaN/Inf: NonFinite
        M.mul_(scale_m)
        sol = unscale(solver(M, R, config, generator), scale_m, s_r)
        if not bool(torch.isfinite(torch.cat([sol.direction, sol.sigma_max.reshape(1)])).all()):
            raise NonFinite("step")
        return sol

    def _read_as_it_goes(self, M, losses, kappa: float, config, solver, generator):
        """:meth:`_read_once_solve` where a host read is free (:data:`FREE_READS`): the same
        verdict, scale and solve, from plain reads instead of one joined transfer (about 40
        small tensor operations fewer). ``max |l|`` and finiteness come from one ``aminmax``
        (NaN/Inf show in its min or max), the step's from ``|d|_inf``. Returns ``(sol, R,
        s_R, start)``: ``sol`` None when the step must be redone on ``s_M M``."""
        self._settle_run()  # as the joined transfer: before any verdict is raised
        low, high = (float(t) for t in torch.aminmax(losses))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NonFinite("per-sample losses")
        if kappa != 2.0 and low < 0.0:
            raise ValueError(f"Invalid losses: kappa = {kappa} needs losses >= 0")
        R = losses if kappa == 2.0 else residuals(losses, kappa)[0]
        r_max = max(-low, high) if kappa == 2.0 else float(max_abs(R))
        s_r = power_of_two_scale(r_max, R.dtype) if math.isfinite(r_max) else 1.0
        R = R if s_r == 1.0 else R * s_r  # the power of two of scale_to_unit, exact
        start = generator.get_state()
        try:
            sol = solver(M, R, config, generator)
        except (RuntimeError, ValueError):
            return None, R, s_r, start  # looked at by the caller: NaN/Inf in M, or the error
        d = sol.direction
        d_max = float(torch.linalg.vector_norm(d, math.inf)) if d.numel() else 0.0
        smax = float(sol.sigma_max)
        if math.isfinite(d_max) and (smax == 0.0 or 2.0**-30 <= smax <= 2.0**30):
            return unscale(sol, 1.0, s_r), R, s_r, start
        return None, R, s_r, start

    def _masked_step(self, sol, cols, flags: torch.Tensor) -> None:
        """Write the step through ``where(ok, new, old)`` and count it; no host read unless
        the run of skips could reach :data:`SKIP_WARNING` now."""
        ok = ok_of(flags)
        self._apply(sol, cols, ok)
        state = self.state[self._params()[0]]
        state["step"] = state["step"] + ok.to(state["step"].dtype)
        state["skipped_steps"] = state["skipped_steps"] + (~ok).to(state["skipped_steps"].dtype)
        for key in RECORDS:
            new = getattr(sol, key).detach()
            state[key] = torch.where(ok, new, state[key].to(new))
        run = self._skip_run
        if run is None:
            run = torch.tensor(float(self._skips_in_row), device=flags.device)
        self._skip_run = torch.where(ok, torch.zeros_like(run), run + 1)
        self._unread += 1
        r, u, w = self._skips_in_row, self._unread, SKIP_WARNING
        if (r < w and r + u >= w) or (r >= w and u >= w + 1):
            values = torch.cat([self._skip_run.reshape(1), flags[[0, 2]].to(run)]).tolist()
            self._skips_in_row, self._skip_run, self._unread = round(values[0]), None, 0
            if self._skips_in_row == w:
                self._warn_skips(_what(values[1:]))

    def _apply(self, sol, cols: torch.Tensor | None, ok: torch.Tensor | None = None) -> None:
        """``theta_g <- theta_g -/+ lr_g b_g`` (see :class:`~torchsteer.optim.sven.Sven`); with
        ``ok`` (a 0-d bool tensor) through :func:`masked_update`, the old values where false."""
        d = sol.direction
        if cols is not None:
            full = d.new_zeros(self._n_params())
            full[cols] = d
            d = full
        if self.max_step_norm is not None:  # trust region on the step lr_g d_g (no momentum)
            pieces, offset = [], 0
            for group in self.param_groups:  # |lr_g d_g| per group: no P-sized temporary
                n = sum(p.numel() for p in group["params"] if p.requires_grad)
                pieces.append(group["lr"] * torch.linalg.vector_norm(d[offset : offset + n]))
                offset += n
            norm = torch.linalg.vector_norm(torch.stack(pieces))
            d = d * torch.clamp(self.max_step_norm / norm, max=1.0)
        active = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        pieces = iter(d.split([p.numel() for p in active]))  # one split: views, no copy
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            sign = 1.0 if group["maximize"] else -1.0
            params = [p for p in group["params"] if p.requires_grad]  # frozen: skipped
            dps = [next(pieces).view_as(p) for p in params]
            if ok is None and momentum == 0.0 and all(p.dtype == d.dtype for p in params):
                if params:  # p <- p + alpha dp for all at once: add_'s arithmetic, its bits
                    torch._foreach_add_(params, dps, alpha=sign * lr)
                continue
            for p, dp in zip(params, dps, strict=True):
                if ok is not None:  # every buffer exists (MaskedSteps._maskable)
                    pstate = self.state[p] if momentum != 0.0 else {}
                    buf = pstate.get("momentum_buffer")
                    new_p, new_buf = masked_update(p, buf, dp, ok, sign * lr, momentum)
                    p.copy_(new_p)
                    if buf is not None:
                        buf.copy_(new_buf)
                    continue
                if momentum != 0.0:
                    pstate = self.state[p]
                    if "momentum_buffer" not in pstate:
                        pstate["momentum_buffer"] = dp.clone()
                    else:
                        pstate["momentum_buffer"].mul_(momentum).add_(dp)
                    dp = pstate["momentum_buffer"]
                p.add_(dp.to(p.dtype), alpha=sign * lr)
