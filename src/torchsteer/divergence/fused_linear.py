"""f-divergences from hidden states and output heads, without the (N, V) logits.

With student logits z_s = h_s W_s^T + b_s and teacher logits z_t = h_t W_t^T + b_t (rows:
tokens), q = softmax(z_s / T), p = softmax(z_t / T) and G = dD/dz_s the logit gradient of
:func:`.f_divergence` (``q * (psi - E_q psi) / T`` per row, times the reduction's scale),

    dD/dh_s = G W_s,    dD/dW_s = G^T h_s,    dD/db_s = sum_rows G.

The rows are processed ``chunk_size`` at a time: the chunk's logits are formed, its values
and G computed (the same per-chunk code as :func:`.f_divergence`), then G is folded into
dD/dh_s (the chunk's rows) and accumulated into dD/dW_s and dD/db_s, and the chunk's logits
are freed. For the reductions ``"sum"``, ``"mean"`` and ``"batchmean"`` this happens in
the forward and backward only scales the stored gradients; for ``"none"`` the per-row
weights are only known in backward, which recomputes the chunks with G's rows scaled by
them. Extra memory: dD/dh_s (N, H), dD/dW_s (V, H) in the compute dtype, O(chunk * V)
temporaries; never (N, V). The teacher is a constant.
"""

from __future__ import annotations

import math

import torch

from .f_divergence import _check_temperature, _check_tops, _chunk, _rows_plan
from .generators import generator

__all__ = ["fused_linear_divergence"]


def _pass(cfg, hs, ws, bs, ht, wt, bt, need, row_weight=None):
    """Row values and the gradients (h_s, W_s, b_s) named in ``need`` (compute dtype)."""
    gen, temperature, rows, chunk, scale, cdt = cfg
    ws_c, wt_c = ws.to(cdt), wt.to(cdt)
    bs_c = None if bs is None else bs.to(cdt)
    bt_c = None if bt is None else bt.to(cdt)
    values = torch.empty(rows.numel(), dtype=cdt, device=hs.device)
    tops = torch.empty(rows.numel(), 2, dtype=cdt, device=hs.device)  # row maxima, checked once
    gh = torch.zeros(hs.shape, dtype=hs.dtype, device=hs.device) if need[0] else None
    gw = torch.zeros(ws.shape, dtype=cdt, device=hs.device) if need[1] else None
    gb = torch.zeros(bs.shape, dtype=cdt, device=hs.device) if need[2] and bs is not None else None
    any_grad = any(need)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        h = hs.index_select(0, idx).to(cdt)
        s = h @ ws_c.T if bs_c is None else torch.addmm(bs_c, h, ws_c.T)
        ht_i = ht.index_select(0, idx).to(cdt)
        t = ht_i @ wt_c.T if bt_c is None else torch.addmm(bt_c, ht_i, wt_c.T)
        del ht_i
        g = torch.empty_like(s) if any_grad else None
        part = tops[start : start + chunk]
        values[start : start + chunk] = _chunk(s, t, gen, temperature, part, g, scale)
        del s, t
        if not any_grad:
            continue
        if row_weight is not None:
            g.mul_(row_weight.index_select(0, idx).to(cdt).unsqueeze(1))
        if gh is not None:
            gh.index_copy_(0, idx, (g @ ws_c).to(gh.dtype))
        if gw is not None:
            gw.addmm_(g.T, h)
        if gb is not None:
            gb.add_(g.sum(0))
    _check_tops(tops, ("student_logits", "teacher_logits"), rows)
    return values, gh, gw, gb


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, cfg, reduction):
        need = tuple(ctx.needs_input_grad[:3])
        now = need if reduction != "none" else (False, False, False)
        values, gh, gw, gb = _pass(cfg, hs, ws, bs, ht, wt, bt, now)
        ctx.cfg, ctx.reduction, ctx.need = cfg, reduction, need
        ctx.dtypes = (ws.dtype, None if bs is None else bs.dtype)
        if reduction == "none":
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
            out = torch.zeros(hs.shape[0], dtype=values.dtype, device=hs.device)
            return out.index_copy_(0, cfg[2], values)
        ctx.grads = (gh, gw, gb)
        return values.double().sum().to(values.dtype) * cfg[4]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt = ctx.saved_tensors
            _, gh, gw, gb = _pass(ctx.cfg, hs, ws, bs, ht, wt, bt, ctx.need, grad_out)
        else:
            gh, gw, gb = ctx.grads
            if not (grad_out.device.type == "cpu" and float(grad_out) == 1.0):
                gh, gw, gb = (None if x is None else x * grad_out.to(x.dtype) for x in (gh, gw, gb))
        gw = None if gw is None else gw.to(ctx.dtypes[0])
        gb = None if gb is None else gb.to(ctx.dtypes[1])
        return gh, gw, gb, None, None, None, None, None


def _head(head, bias, name):
    """(weight, bias) of an output head given as a (V, H) tensor or a ``torch.nn.Linear``."""
    if isinstance(head, torch.nn.Linear):
        if bias is not None:
            raise ValueError(f"Invalid {name}_bias: {name}_head is a Linear with its own bias")
        head, bias = head.weight, head.bias
    if not torch.is_tensor(head) or head.ndim != 2 or not head.is_floating_point():
        what = tuple(head.shape) if torch.is_tensor(head) else type(head).__name__
        raise ValueError(f"Invalid {name}_head: {what} (expected a float (V, H) weight or Linear)")
    if bias is not None and (not torch.is_tensor(bias) or tuple(bias.shape) != (head.shape[0],)):
        what = tuple(bias.shape) if torch.is_tensor(bias) else type(bias).__name__
        raise ValueError(f"Invalid {name}_bias: {what} (expected ({head.shape[0]},))")
    return head, bias


def _check_finite(x, name):
    if x is not None and not bool(torch.isfinite(x).all()):
        raise ValueError(f"Invalid {name}: holds NaN or Inf")


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_head,
    teacher_hidden: torch.Tensor,
    teacher_head,
    kind: str = "kl",
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    **kind_args,
) -> torch.Tensor:
    """:func:`.f_divergence` of ``h_s W_s^T + b_s`` and ``h_t W_t^T + b_t``, never forming them.

    Equal (up to rounding) to ``f_divergence(student_hidden @ W_s.T + b_s, teacher_hidden @
    W_t.T + b_t, kind, ...)`` with the same ``temperature``, ``mask``, ``reduction`` and kind
    arguments, and differentiable in ``student_hidden``, the student weight and bias.

    Args:
        student_hidden: ``(..., H_s)``; the gradient comes back in its dtype.
        student_head: the ``(V, H_s)`` output weight, or a ``torch.nn.Linear`` (its bias used).
        teacher_hidden: ``(..., H_t)``, same leading shape; a constant.
        teacher_head: ``(V, H_t)`` weight or ``torch.nn.Linear``; a constant (freeze it).
        student_bias, teacher_bias: ``(V,)`` biases for tensor heads (default none).
        chunk_size: rows per chunk (default: ~1M logits entries, at least 16 rows).

    Computed in float32 (float64 if an input is); the weight gradient is accumulated in the
    compute dtype and returned in the weight's dtype. Masked rows are never read.

    Raises:
        ValueError: as :func:`.f_divergence`, and for a head or bias of the wrong shape, a
            hidden size that does not match its head, different vocabularies, NaN/Inf in a
            head, or teacher tensors that require grad.
    """
    gen = generator(kind, **kind_args)
    ws, bs = _head(student_head, student_bias, "student")
    wt, bt = _head(teacher_head, teacher_bias, "teacher")
    hs, ht = student_hidden, teacher_hidden
    if not (torch.is_tensor(hs) and torch.is_tensor(ht)):
        raise ValueError("Invalid hidden states: student_hidden and teacher_hidden must be tensors")
    if not (hs.is_floating_point() and ht.is_floating_point()):
        raise ValueError(f"Invalid hidden dtype: {hs.dtype} / {ht.dtype} (must be floating)")
    if hs.ndim == 0 or ht.ndim == 0 or hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"Invalid shapes: student_hidden {tuple(hs.shape)}, teacher_hidden "
            f"{tuple(ht.shape)} (leading shape mismatch)"
        )
    for h, w, name in ((hs, ws, "student"), (ht, wt, "teacher")):
        if h.shape[-1] != w.shape[1]:
            raise ValueError(
                f"Invalid {name} hidden size: hidden {h.shape[-1]}, head {tuple(w.shape)}"
            )
    if ws.shape[0] != wt.shape[0]:
        raise ValueError(f"Invalid vocabulary: student V={ws.shape[0]}, teacher V={wt.shape[0]}")
    tensors = (hs, ws, bs, ht, wt, bt)
    if len({x.device for x in tensors if x is not None}) != 1:
        raise ValueError("Invalid devices: hidden states and heads must be on one device")
    grad_on = torch.is_grad_enabled()
    for x, name in ((ht, "teacher_hidden"), (wt, "teacher_head"), (bt, "teacher_bias")):
        if x is not None and x.requires_grad and grad_on:
            raise ValueError(
                f"Invalid {name}: requires grad; the teacher is a constant "
                "(freeze it with requires_grad_(False) or pass .detach())"
            )
    for x, name in ((ws, "student_head"), (bs, "student_bias"), (wt, "teacher_head")):
        _check_finite(x, name)
    _check_finite(bt, "teacher_bias")
    t = _check_temperature(temperature)
    lead, vocab = hs.shape[:-1], ws.shape[0]
    n = math.prod(lead)
    rows, divisor = _rows_plan(mask, lead, hs.device, reduction, chunk_size)
    chunk = int(chunk_size) if chunk_size is not None else max(16, (1 << 20) // max(vocab, 1))
    scale = 1.0 if reduction in ("none", "sum") else 1.0 / divisor if divisor else 0.0
    cdt = torch.float64 if any(x.dtype == torch.float64 for x in tensors if x is not None) else None
    cfg = (gen, t, rows, chunk, scale, cdt or torch.float32)
    detached = [None if x is None else x.detach() for x in (ht, wt, bt)]
    out = _FusedLinear.apply(
        hs.reshape(n, hs.shape[-1]),
        ws,
        bs,
        detached[0].reshape(n, ht.shape[-1]),
        detached[1],
        detached[2],
        cfg,
        reduction,
    )
    return out.reshape(lead) if reduction == "none" else out
