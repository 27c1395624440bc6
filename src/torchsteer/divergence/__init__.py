"""Divergences for distillation: f-divergences on logits, Z-loss (framework-free, torch only)."""

from .f_divergence import f_divergence
from .generators import KINDS, Generator, generator
from .z_loss import logz_penalty, z_loss

__all__ = ["KINDS", "Generator", "f_divergence", "generator", "logz_penalty", "z_loss"]
