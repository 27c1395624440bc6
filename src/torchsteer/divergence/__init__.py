"""Divergences for distillation: f-divergences on logits (also from hidden states and the head),
sparse top-k KD, NKD, USKD and PS-KD, the Sinkhorn divergence (SinKD), Z-loss (torch only)."""

from .f_divergence import f_divergence
from .fused_linear import fused_linear_divergence
from .generators import KINDS, Generator, generator
from .kd_losses import PSKDTargets, nkd_loss, ps_kd_alpha, soft_cross_entropy
from .sinkhorn import SinkhornReport, sinkhorn_divergence
from .sparse import sparse_kd
from .uskd import uskd_loss
from .z_loss import logz_penalty, z_loss

__all__ = [
    "KINDS",
    "Generator",
    "PSKDTargets",
    "SinkhornReport",
    "f_divergence",
    "fused_linear_divergence",
    "generator",
    "logz_penalty",
    "nkd_loss",
    "ps_kd_alpha",
    "sinkhorn_divergence",
    "soft_cross_entropy",
    "sparse_kd",
    "uskd_loss",
    "z_loss",
]
