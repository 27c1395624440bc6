"""Small float64 models the core is tested on: MLP, CNN, BatchNorm (eval), transformer block."""

import torch
import torch.nn.functional as F
from torch import nn


class TinyTransformer(nn.Module):
    """One pre-norm transformer block (self-attention + MLP) mean-pooled to C logits.

    Written out by hand: ``nn.TransformerEncoderLayer`` in eval mode takes a fused fast
    path that has no forward-mode derivative.
    """

    def __init__(self, d=8, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(1, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: (B, T)
        h = self.embed(x.unsqueeze(-1))
        B, T, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(B, T, d))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


def make(name: str, seed: int = 0):
    """(model in eval mode, inputs (B=5), integer targets) in float64."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(5, 4, generator=g)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
        x = torch.randn(5, 1, 5, 5, generator=g)
    elif name == "bn":
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
        with torch.no_grad():  # non-trivial running statistics
            model[1].running_mean.uniform_(-0.5, 0.5, generator=g)
            model[1].running_var.uniform_(0.5, 2.0, generator=g)
        x = torch.randn(5, 4, generator=g)
    elif name == "transformer":
        model = TinyTransformer()
        x = torch.randn(5, 4, generator=g)
    else:
        raise ValueError(name)
    model = model.double().eval()
    y = torch.randint(0, 3, (5,), generator=g)
    return model, x.double(), y


NAMES = ["mlp", "cnn", "bn", "transformer"]


def ce(out, y):
    """Per-sample cross-entropy, shape (B,): the per-sample loss of these tests."""
    return F.cross_entropy(out, y, reduction="none")
