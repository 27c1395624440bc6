"""Z-loss: the formula, shift/scale invariance (hypothesis), and logz_penalty."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchsteer.divergence import logz_penalty, z_loss


def test_z_loss_formula():
    o = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    mu, sigma = 7 / 3, math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 3)
    zy = (4 - mu) / sigma
    want = math.log1p(math.exp(2.0 * (0.5 - zy))) / 2.0
    got = z_loss(o, torch.tensor([2]), a=2.0, b=0.5)
    assert abs(got.item() - want) < 1e-14


@settings(max_examples=40, deadline=None)
@given(
    scale=st.floats(1e-3, 1e3),
    shift=st.floats(-1e3, 1e3),
    seed=st.integers(0, 1000),
)
def test_z_loss_is_shift_and_scale_invariant(scale, shift, seed):
    o = torch.randn(4, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = torch.tensor([0, 3, 8, 5])
    a = z_loss(o, y, a=1.5, b=1.0, reduction="none")
    b = z_loss(scale * o + shift, y, a=1.5, b=1.0, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # cross-entropy is not scale-invariant: the property is not vacuous
    ce = torch.nn.functional.cross_entropy
    assert scale == pytest.approx(1.0, abs=1e-2) or not torch.allclose(
        ce(o, y), ce(scale * o + shift, y), rtol=1e-6
    )


def test_logz_penalty_and_errors():
    o = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=torch.float64)
    want = torch.tensor([math.log(4.0) ** 2, (1 + math.log(2.0)) ** 2], dtype=torch.float64)
    torch.testing.assert_close(logz_penalty(o, reduction="none"), want)
    torch.testing.assert_close(logz_penalty(o, mask=torch.tensor([True, False])), want[0])
    with pytest.raises(ValueError, match="constant"):
        z_loss(torch.ones(2, 3), torch.tensor([0, 1]), a=1.0, b=0.0)
    with pytest.raises(ValueError, match="a, b"):
        z_loss(o, torch.tensor([0, 1]), a=0.0, b=0.0)
    with pytest.raises(ValueError, match="NaN"):
        logz_penalty(torch.tensor([[float("nan"), 0.0]]))
