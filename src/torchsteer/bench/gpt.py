"""A GPT-2-shaped decoder built in code (random initialization, nothing downloaded).

One definition for the ``lm`` suite (about 4 layers, width 128) and the 124M-parameter
scale runs (:meth:`GPTConfig.gpt2_small`: 12 layers, width 768, 12 heads, vocabulary 50,257).

Pre-norm blocks as in GPT-2::

    h = x + W_o attn(LN_1(x)),    attn causal, heads of width d / n_head
    y = h + W_2 gelu(W_1 LN_2(h)),  W_1: d -> 4d

Every weight is a plain ``nn.Linear`` / ``nn.Embedding`` / ``nn.LayerNorm``, the layers whose
per-sample gradients :class:`torchsteer.jacobian.GraphRowCapture` forms from one backward.
Initialization is GPT-2's: N(0, 0.02), the residual projections scaled by 1 / sqrt(2 L).
With ``tie_weights`` the output head is the token embedding (GPT-2's 124M count);
untied, the head adds V d parameters.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "GPTConfig", "count_parameters"]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Shape of the decoder. ``width`` must be a multiple of ``n_head``."""

    vocab_size: int = 64
    context: int = 64
    n_layer: int = 4
    n_head: int = 4
    width: int = 128
    tie_weights: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "context", "n_layer", "n_head", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig: {name} must be a positive int, got {value!r}")
        if self.width % self.n_head:
            raise ValueError(
                f"GPTConfig: width {self.width} is not a multiple of n_head {self.n_head}"
            )

    @classmethod
    def gpt2_small(cls, context: int = 128, tie_weights: bool = True) -> GPTConfig:
        """GPT-2 small: 12 layers, width 768, 12 heads, vocabulary 50,257 (124M tied)."""
        return cls(50257, context, 12, 12, 768, tie_weights)


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.width
        self.n_head = cfg.n_head
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=-1)
        shape = (b, t, self.n_head, d // self.n_head)
        q, k, v = (z.reshape(shape).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Token ids ``(B, T)`` (T <= context) -> next-token logits ``(B, T, vocab_size)``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:
            for proj in (block.proj, block.fc_proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_weights:
            self.head.weight = self.tok.weight

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.ndim != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"GPT: expected integer token ids (B, T), got {tuple(idx.shape)}")
        t = idx.shape[1]
        if t > self.config.context:
            raise ValueError(f"GPT: sequence length {t} exceeds the context {self.config.context}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (a tied weight counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
