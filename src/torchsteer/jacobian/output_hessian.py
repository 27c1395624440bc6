"""Closed-form output Hessians for the Gauss-Newton product ``J^T H_out J v``.

For the mean softmax cross-entropy over the rows ``n = 1..N`` of outputs ``z`` (..., V),

    loss = (1/N) sum_n -log softmax(z_n)_{y_n},     g_out = dloss/dz = (p - e_y) / N,
    H_out u = (1/N) (diag(p_n) - p_n p_n^T) u_n = (p * u - p (p . u)_n) / N,   p = softmax(z)

(``(p . u)_n`` the row sums of ``p * u``). Autograd gets ``H_out u`` by differentiating
``g_out`` again, which re-runs log-softmax's double backward (two exponentials and several
passes over the N x V outputs) for every product; here ``p`` is computed once and each product
is four passes. At GPT-2 small (B x T = 8 x 128, V = 50,257) the double backward was 19 % of a
Gauss-Newton product (`benchmarks/results/newton_scale.md`).

The formula holds only for that loss. :class:`SoftmaxCrossEntropyHessian` checks it once
against the gradient autograd computed: ``p - N g_out`` must be one-hot in every row (label
smoothing, class weights, ``ignore_index`` rows, a sum reduction or another loss fail it), one
host read.
"""

from __future__ import annotations

import torch

__all__ = ["OUTPUT_HESSIANS", "SoftmaxCrossEntropyHessian"]

OUTPUT_HESSIANS = ("cross_entropy",)  # the closed forms (None: autograd's double backward)
_TOL = 1e-3  # of p - N g_out against its one-hot rows (rounding is ~1e-6 in float32)


class SoftmaxCrossEntropyHessian:
    """``u -> H_out u`` of the mean softmax cross-entropy of ``outputs`` (module docstring).

    Args:
        outputs: the logits (..., V) the loss was computed from.
        g_out: ``dloss/doutputs`` (same shape), as autograd gave it.

    Raises:
        ValueError: ``g_out`` is not ``(softmax(outputs) - onehot) / N`` (another loss).
    """

    def __init__(self, outputs: torch.Tensor, g_out: torch.Tensor) -> None:
        z = outputs.detach()
        work = torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype
        self.p = torch.softmax(z.to(work), dim=-1)
        self.rows = z.numel() // z.shape[-1] if z.dim() else 1
        e = self.p - self.rows * g_out.detach().to(work)
        off = (e - e.round().clamp(0.0, 1.0)).abs().amax() if e.numel() else e.new_zeros(())
        total = (e.sum(-1) - 1.0).abs().amax() if e.numel() else e.new_zeros(())
        if z.dim() == 0 or not bool(torch.maximum(off, total) <= _TOL):  # one read
            raise ValueError(
                "Invalid output_hessian='cross_entropy': the loss is not the mean softmax "
                "cross-entropy of the outputs' last dimension (p - N dloss/doutputs is not "
                "one-hot per row: label smoothing, class weights, ignore_index, another "
                "reduction or another loss?); leave output_hessian=None (autograd)"
            )

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        pu = self.p * u.to(self.p.dtype)
        return ((pu - self.p * pu.sum(-1, keepdim=True)) / self.rows).to(u.dtype)
