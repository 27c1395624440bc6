"""Forward and reverse KL on one chunk of rows, in fewer passes than the generic chunk.

With M = max_v z, e = exp(z - M), S = sum_v e and lse = M + log S, per row (T = 1; the
logits are divided by T first and the gradient by T last):

    forward   KL(p || q) = sum_v p (z_t - z_s) - (lse_t - lse_s),   dD/dz_s = q - p
    reverse   KL(q || p) = sum_v q (z_s - z_t) - (lse_s - lse_t),   dD/dz_s = q (d - c)

with d = z_s - z_t and c = sum_v q d (the reverse gradient q (psi - E_q psi), psi = 1 + log q
- log p, in these terms). Each side takes one exp per entry (the generic chunk takes two:
its log-softmax and the exp of it) and no log per entry. The infinite entries take the same
limits as :mod:`.generators`: the difference d is NaN where both logits are -inf and -inf
where the weighting probability is 0, and both are set to 0 (0 log 0 = 0); +inf stays (a
divergence of +inf). A -inf student logit gets gradient exactly 0, marked without a
comparison pass: ``g + 0 * z_s`` is NaN exactly there, and NaN is set to 0; in the reverse
KL an entry with p = 0 < q keeps the generic chunk's NaN gradient (``+ 0 * d``, d = +inf
there) in its row of value +inf.
"""

from __future__ import annotations

import math

import torch

__all__ = ["kl_chunk"]


def _side(z: torch.Tensor, top: torch.Tensor):
    """(e, S, lse) of one side, ``top`` (the row maxima, shape (n, 1)) already written."""
    e = torch.sub(z, top).exp_()
    total = e.sum(-1, keepdim=True)
    return e, total, top + total.log()


def _finite_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b with NaN (both -inf) and -inf set to 0; +inf kept."""
    d = torch.sub(a, b)
    return torch.nan_to_num_(d, nan=0.0, neginf=0.0, posinf=math.inf)


def kl_chunk(s, t, reverse, temperature, tops, g=None, scale=1.0):
    """Row values of KL(p || q) (``reverse=False``) or KL(q || p) on one chunk (compute
    dtype), the scaled student gradient written into ``g`` when given; the row maxima of s
    and t into ``tops`` (checked by the caller). Same contract as the generic chunk."""
    torch.amax(s, -1, keepdim=True, out=tops[:, :1])
    torch.amax(t, -1, keepdim=True, out=tops[:, 1:])
    top_s, top_t = tops[:, :1], tops[:, 1:]
    if temperature != 1.0:  # max(z / T) = max(z) / T exactly (T > 0)
        s, t = s / temperature, t / temperature
        top_s, top_t = top_s / temperature, top_t / temperature
    es, ss, lse_s = _side(s, top_s)
    et, st, lse_t = _side(t, top_t)
    c = scale / temperature
    if not reverse:
        p = et.mul_(st.reciprocal())
        del et
        values = torch.linalg.vecdot(p, _finite_diff(t, s)) - (lse_t - lse_s).squeeze(-1)
        if g is not None:
            torch.mul(es, c / ss, out=g)
            g.sub_(p, alpha=c)
    else:
        del et
        q = es.mul_(ss.reciprocal())
        d = _finite_diff(s, t)
        cross = torch.linalg.vecdot(q, d)
        values = cross - (lse_s - lse_t).squeeze(-1)
        if g is not None:
            torch.sub(d, cross.unsqueeze(-1), out=g)
            g.mul_(q).mul_(c)
    if g is not None:
        torch.nan_to_num_(g.add_(s, alpha=0.0), nan=0.0, posinf=math.inf, neginf=-math.inf)
        if reverse:  # p = 0 < q: NaN (inf - inf), as the generic chunk has it
            g.add_(d, alpha=0.0)
    return values
