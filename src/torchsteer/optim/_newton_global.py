"""The start of a :class:`RegularizedNewton` step under DDP: the global loss and gradient.

Every rank evaluates its closure at x; the step's loss and gradient are the means over ranks,

    f = (1/R) sum_r f_r,    g = (1/R) sum_r g_r,

in one all-reduce of ``[g_r, f_r, e_r]`` (P + 2 numbers), where ``e_r = 1`` when rank r
rejected its closure output (a ``ValueError``: a (B,) loss where a scalar is expected, an
empty batch for the empirical Fisher, a sparse gradient) and ``0`` otherwise; a rejecting rank
sends zeros for ``g_r`` and ``f_r``. The flag rides in the collective the step makes anyway
(issue 18 #4): the rank that rejected raises its own error after it, the others read
``sum_r e_r`` with the step's first numbers (:func:`~torchsteer.optim._newton_trial.start_numbers`,
the transfer they make anyway) and raise too, before anything is written. Without a process
group nothing is reduced and the error propagates at once. The sum and the division are those
of :func:`torchsteer.distributed.all_reduce_mean`: g and f are bit for bit what it gives.
"""

from __future__ import annotations

import torch

from torchsteer import distributed as tdist
from torchsteer.jacobian import flatten_like
from torchsteer.optim._newton_inputs import check_gradients
from torchsteer.optim._newton_solvers import evaluate_closure

__all__ = ["global_evaluation"]


def global_evaluation(fn, params, curvature: str, work: torch.dtype):
    """``(f, aux, grads, g, loss, flag)``: the closure's evaluation at x, the flat gradient
    ``g`` (``work`` dtype) and the reported ``loss``, both global under a process group, and
    ``flag`` (a 1-element tensor, ``sum_r e_r``; ``None`` without a process group)."""
    sharded = tdist.is_distributed()
    try:
        f, aux, grads = evaluate_closure(fn, params, curvature, graph=True)
        check_gradients(grads, params)
    except ValueError:
        if not sharded:
            raise
        n = sum(p.numel() for p in params)
        zeros = torch.zeros(n + 2, dtype=work, device=params[0].device)
        zeros[-1] = 1.0
        tdist.all_reduce_sum(zeros)  # this rank's part of the step's one all-reduce
        raise
    g = flatten_like(grads, params, work)
    loss = f.detach()  # what the step reports: the global mean under a process group
    if not sharded:
        return f, aux, grads, g, loss, None
    flag = g.new_zeros(1)
    packed = tdist.all_reduce_sum(torch.cat([g, loss.reshape(1).to(g.dtype), flag]))
    packed = packed / tdist.world_size()  # (the flag is only compared with 0)
    return f, aux, grads, packed[:-2], packed[-2].to(loss.dtype), packed[-1:]
