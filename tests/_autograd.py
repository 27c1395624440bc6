"""Autograd functions the tests use to plant bad derivatives."""

import torch


class NaNGrad(torch.autograd.Function):
    """The identity forward; a NaN backward (a NaN Jacobian with finite losses)."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")
