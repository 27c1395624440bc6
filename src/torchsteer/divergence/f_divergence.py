"""f-divergences between student and teacher logits, chunked over rows, gradient in the forward.

With q = softmax(z_s / T) (student) and p = softmax(z_t / T) (teacher), per row

    D_f(p || q) = sum_v q_v f(p_v / q_v),    dD/dz_s = q * (psi - E_q psi) / T,

psi(r) = f(r) - r f'(r) (see :mod:`.generators`). ``kind="kl"`` is KL(p || q), the forward,
mass-covering KL of distillation; ``"reverse_kl"`` is KL(q || p), mode-seeking. The rows are
processed ``chunk_size`` at a time: log-softmax, the per-entry terms and the exact student
gradient, which is stored (in the student's dtype); backward only scales it. Extra memory is
the gradient plus O(chunk_size * V). The teacher is a constant (no gradient).
"""

from __future__ import annotations

import math
import numbers

import torch

from ._kl_chunks import kl_chunk
from .generators import KL, ReverseKL, generator

__all__ = ["f_divergence"]

_REDUCTIONS = ("batchmean", "mean", "sum", "none")


def _check_row_max(top: torch.Tensor, name: str, rows: torch.Tensor) -> None:
    """Raises if a row maximum ``top[i]`` (row ``rows[i]``) is NaN, +inf or -inf."""
    _check_tops(top.unsqueeze(-1), (name,), rows)


def _check_tops(tops: torch.Tensor, names: tuple[str, ...], rows: torch.Tensor) -> None:
    """``tops[i, j]``: the maximum of row ``rows[i]`` of the input ``names[j]``. Raises on the
    first row (then the first input) whose maximum is NaN, +inf or -inf (an empty row); one
    host read when all are finite, so the chunks never wait on the host."""
    bad = ~torch.isfinite(tops)
    if not bool(bad.any()):
        return
    i, j = divmod(int(bad.reshape(-1).nonzero()[0, 0]), tops.shape[-1])  # row-major: row first
    top = float(tops[i, j])
    what = "NaN" if math.isnan(top) else "+inf" if top > 0 else "only -inf (an empty row)"
    raise ValueError(f"Invalid {names[j]}: row {int(rows[i])} holds {what} logits")


def _check_temperature(temperature) -> float:
    """T as a float; raises unless finite and > 0."""
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"Invalid temperature: {temperature!r} (must be finite and > 0)")
    return t


def _rows_plan(mask, lead, device, reduction, chunk_size):
    """Checks ``reduction``, ``chunk_size`` and ``mask`` (shape ``lead``); returns the
    selected rows of the flattened ``lead`` (the unmasked ones, ascending) and the
    reduction's divisor: the number of selected rows for ``"mean"``, else ``lead[0]``
    (1 for a single row)."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Invalid reduction: {reduction!r}; expected one of {_REDUCTIONS}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"Invalid chunk_size: {chunk_size!r} (must be a positive integer)")
    if mask is None:
        rows = torch.arange(math.prod(lead), device=device)
    else:
        if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(lead):
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask)
            raise ValueError(f"Invalid mask shape: {shape} (expected {tuple(lead)})")
        if mask.dtype != torch.bool:
            if bool(((mask != 0) & (mask != 1)).any()):
                raise ValueError("Invalid mask: values must be 0/1 or bool")
            mask = mask != 0
        rows = mask.reshape(-1).nonzero().squeeze(1).to(device)
    divisor = rows.numel() if reduction == "mean" else (lead[0] if len(lead) else 1)
    return rows, divisor


def _check_top_k(zs, top_k, rows) -> None:
    """``top_k`` an integer in [1, V]; the student's unmasked rows checked over the whole
    vocabulary (a NaN off S would not reach the per-chunk check)."""
    vocab = zs.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise ValueError(f"Invalid top_k: {top_k!r} (must be an integer in [1, {vocab}])")
    if not 1 <= int(top_k) <= vocab:
        raise ValueError(f"Invalid top_k: {top_k!r} (must be in [1, V={vocab}])")
    top = zs.detach().amax(-1).reshape(-1).index_select(0, rows)
    _check_row_max(top, "student_logits", rows)


def _top_k_support(zs, zt, top_k, rows):
    """(z_s[S], z_t[S]) with S the teacher's ``top_k`` largest logits per row (the top-k of
    z_t / T and of log p are the same set), after :func:`_check_top_k`."""
    _check_top_k(zs, top_k, rows)
    idx = zt.detach().topk(int(top_k), dim=-1).indices
    return zs.gather(-1, idx), zt.detach().gather(-1, idx)


def _bucket(zs, zt, kind, top_k, rows, temperature, mask, reduction, kind_args):
    """``tail="bucket"``: S from the teacher's top-k, its log-probabilities from the full
    log-softmax (rows checked first, so a bad teacher row is named as such), then
    :func:`.sparse_kd` with the bucket."""
    from .sparse import sparse_kd  # (sparse builds on this module)

    if temperature != 1.0:
        raise ValueError(f"Invalid temperature: {temperature} with tail='bucket' (T = 1 only)")
    _check_top_k(zs, top_k, rows)
    _check_row_max(zt.detach().amax(-1).reshape(-1).index_select(0, rows), "teacher_logits", rows)
    cdt = torch.float64 if torch.float64 in (zs.dtype, zt.dtype) else torch.float32
    read = torch.zeros(zt.shape[:-1].numel(), dtype=torch.bool, device=zt.device)
    read[rows] = True  # rows a mask drops are never read: zeros stand in for them
    zt_read = torch.where(read.reshape(*zt.shape[:-1], 1), zt.detach().to(cdt), 0.0)
    log_p = torch.log_softmax(zt_read, -1)
    idx = log_p.topk(int(top_k), dim=-1).indices
    lp = log_p.gather(-1, idx).clamp(max=0.0)  # (rounding may put log 1 a bit above 0)
    return sparse_kd(zs, idx, lp, kind, tail="bucket", mask=mask, reduction=reduction, **kind_args)


def _chunk(s, t, gen, temperature, tops, g=None, scale=1.0):
    """One chunk of logits (compute dtype): its row values and, when ``g`` (a buffer of the
    chunk's shape, compute dtype) is given, the student gradient times ``scale`` written
    into it; the row maxima of s and t go into ``tops`` (checked once, after the last chunk).
    The chunk's temporaries are freed as soon as they are used. Forward and reverse KL take
    :func:`._kl_chunks.kl_chunk` (the same values in fewer passes)."""
    if type(gen) in (KL, ReverseKL):
        return kl_chunk(s, t, type(gen) is ReverseKL, temperature, tops, g, scale)
    torch.amax(s, -1, out=tops[:, 0])
    torch.amax(t, -1, out=tops[:, 1])
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    lq, lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    del s, t
    q, p = torch.exp(lq), torch.exp(lp)
    term, qpsi = gen.terms(lp, lq, p, q)
    del lp, p
    values = term.sum(-1)
    del term
    if g is not None:
        torch.mul(q, qpsi.sum(-1, keepdim=True), out=g)
        del q
        torch.sub(qpsi, g, out=g)  # q psi - q E_q[psi]
        del qpsi
        g.masked_fill_(lq == -math.inf, 0.0)
        g.mul_(scale / temperature)
    return values


def _rows_pass(zs, zt, gen, temperature, rows, chunk, need_grad, scale):
    """Row values (compute dtype) and the scaled gradient of the selected rows.

    The gradient is written into one preallocated buffer; in float32/float64 the chunk's
    gradient is formed in its slice of that buffer (no chunk-sized copy).
    """
    cdt = torch.float64 if torch.float64 in (zs.dtype, zt.dtype) else torch.float32
    values = torch.empty(rows.numel(), dtype=cdt, device=zs.device)
    tops = torch.empty(rows.numel(), 2, dtype=cdt, device=zs.device)  # row maxima, checked once
    grad = torch.zeros_like(zs) if need_grad else None
    contiguous = rows.numel() == zs.shape[0]
    inplace = need_grad and contiguous and grad.dtype == cdt
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        if contiguous:
            s, t = zs[start : start + chunk].to(cdt), zt[start : start + chunk].to(cdt)
        else:
            s, t = zs.index_select(0, idx).to(cdt), zt.index_select(0, idx).to(cdt)
        g = None
        if need_grad:
            g = grad[start : start + chunk] if inplace else torch.empty_like(s)
        part = tops[start : start + chunk]
        values[start : start + chunk] = _chunk(s, t, gen, temperature, part, g, scale)
        del s, t
        if need_grad and not inplace:
            if contiguous:
                grad[start : start + chunk] = g.to(grad.dtype)
            else:
                grad.index_copy_(0, idx, g.to(grad.dtype))
    _check_tops(tops, ("student_logits", "teacher_logits"), rows)
    return values, grad


class _FDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, gen, temperature, rows, chunk, reduction, divisor, need_grad):
        scale = 1.0 if reduction in ("none", "sum") else 1.0 / divisor if divisor else 0.0
        values, grad = _rows_pass(zs, zt, gen, temperature, rows, chunk, need_grad, scale)
        ctx.grad, ctx.reduction = grad, reduction
        if reduction == "none":
            out = torch.zeros(zs.shape[0], dtype=values.dtype, device=zs.device)
            return out.index_copy_(0, rows, values)
        total = values.double().sum().to(values.dtype)
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad = ctx.grad
        if ctx.reduction == "none":
            grad = grad * grad_out.to(grad.dtype).unsqueeze(-1)
        elif not (grad_out.device.type == "cpu" and float(grad_out) == 1.0):
            grad = grad * grad_out.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None


def f_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "kl",
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    top_k: int | None = None,
    tail: str = "renormalize",
    **kind_args,
) -> torch.Tensor:
    """D_f(p || q) with q = softmax(student_logits / T) the student, p the teacher.

    D_f(p || q) = sum_v q_v f(p_v / q_v): ``"kl"`` is KL(p || q) (forward KL, mass-covering),
    ``"reverse_kl"`` KL(q || p) (mode-seeking); other kinds and their arguments
    (``alpha=``, ``beta=``/``normalized=``, ``lam=``) as in :mod:`.generators`. No T^2 factor
    is applied.

    Args:
        student_logits: ``(..., V)``, any float dtype; the gradient comes back in this dtype.
        teacher_logits: same shape; treated as a constant (raises if it requires grad).
        kind: the generator.
        temperature: T > 0, both logits are divided by it.
        mask: bool (or 0/1) of shape ``(...)``; False rows are never read and contribute
            exactly nothing, to the value and to the gradient.
        reduction: ``"none"`` (per row, masked rows 0), ``"sum"``, ``"mean"`` (over the
            unmasked rows), ``"batchmean"`` (sum / size of the first dimension, as
            ``F.kl_div``; 1 for a single row). An all-masked batch gives 0 and gradient 0.
        chunk_size: rows per chunk (default: ~128K entries, 512 KB in float32, per temporary).
        top_k: None (the whole vocabulary) or k in [1, V]: per row, the divergence on the
            teacher's k most likely tokens S only, Sparse KD's top-k teacher with the tail
            renormalized away (:func:`.sparse_kd`'s default ``tail="renormalize"``):
            p~ = softmax(z_t[S] / T) = p_S^{1/T} / sum_S p^{1/T}, q~ = softmax(z_s[S] / T),
            D_f(p~ || q~); tokens off S get gradient 0. Equal to ``sparse_kd(z_s, S,
            log_softmax(z_t)[S])``.
        tail: with ``top_k``, ``"renormalize"`` (above) or ``"bucket"``: the mass off S kept
            as one more entry on both sides, p~ = [p_S, 1 - sum_S p], q~ = [q_S, 1 - sum_S q]
            with p, q the full softmaxes (T = 1 only); every student logit gets its gradient.
            Equal to ``sparse_kd(z_s, S, log_softmax(z_t)[S], tail="bucket")``, which it
            calls (``chunk_size`` is not used there).

    Compute is float32 (float64 if either input is), the loss float32/float64. Entries where
    both logits are -inf (a padded vocabulary) contribute nothing; an entry where only one is
    -inf takes the limit of the definition (e.g. KL(p||q) = inf where q_v = 0 < p_v), and a
    -inf student logit gets gradient 0.

    Raises:
        ValueError: shape or vocabulary mismatch, bad mask, T <= 0, unknown kind or bad kind
            argument, NaN/+inf logits or an all -inf row in an unmasked row, a teacher that
            requires grad, ``top_k`` not an integer in [1, V], an unknown ``tail``,
            ``tail="bucket"`` without ``top_k`` or with T != 1.
    """
    gen = generator(kind, **kind_args)
    zs, zt = student_logits, teacher_logits
    if not (torch.is_tensor(zs) and torch.is_tensor(zt)):
        raise ValueError("Invalid logits: student_logits and teacher_logits must be tensors")
    if not (zs.is_floating_point() and zt.is_floating_point()):
        raise ValueError(f"Invalid logits dtype: {zs.dtype} / {zt.dtype} (must be floating)")
    if zs.ndim == 0 or zs.ndim != zt.ndim or zs.shape[:-1] != zt.shape[:-1]:
        raise ValueError(
            f"Invalid shapes: student {tuple(zs.shape)}, teacher {tuple(zt.shape)} (shape mismatch)"
        )
    if zs.shape[-1] != zt.shape[-1]:
        raise ValueError(f"Invalid vocabulary: student V={zs.shape[-1]}, teacher V={zt.shape[-1]}")
    if zs.shape[-1] == 0:
        raise ValueError(f"Invalid vocabulary: V=0 (logits of shape {tuple(zs.shape)})")
    if zs.device != zt.device:
        raise ValueError(f"Invalid devices: {zs.device} and {zt.device}")
    if zt.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "Invalid teacher_logits: requires grad; the teacher is a constant, pass .detach()"
        )
    t = _check_temperature(temperature)
    lead, vocab = zs.shape[:-1], zs.shape[-1]
    n = math.prod(lead)
    rows, divisor = _rows_plan(mask, lead, zs.device, reduction, chunk_size)
    if tail not in ("renormalize", "bucket"):
        raise ValueError(f"Invalid tail: {tail!r} (expected 'renormalize' or 'bucket')")
    if tail == "bucket" and top_k is None:
        raise ValueError("Invalid tail: 'bucket' needs top_k (the support S it buckets)")
    if top_k is not None:
        if tail == "bucket":
            return _bucket(zs, zt, kind, top_k, rows, t, mask, reduction, kind_args)
        zs, zt = _top_k_support(zs, zt, top_k, rows)
        vocab = zs.shape[-1]
    chunk = int(chunk_size) if chunk_size is not None else max(1, (1 << 17) // max(vocab, 1))
    need_grad = zs.requires_grad and torch.is_grad_enabled()
    out = _FDivergence.apply(
        zs.reshape(n, vocab),
        zt.detach().reshape(n, vocab),
        gen,
        t,
        rows,
        chunk,
        reduction,
        divisor,
        need_grad,
    )
    return out.reshape(lead) if reduction == "none" else out
