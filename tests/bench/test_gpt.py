"""The benchmark decoder: its parameter count against the closed form, causality, bad shapes."""

import pytest
import torch

from torchsteer.bench.gpt import GPT, GPTConfig, count_parameters


def closed_form(cfg: GPTConfig) -> int:
    """V d + C d (embeddings) + L (12 d^2 + 13 d) (blocks) + 2 d (final norm) [+ V d head]."""
    v, c, d, n = cfg.vocab_size, cfg.context, cfg.width, cfg.n_layer
    head = 0 if cfg.tie_weights else v * d
    return v * d + c * d + n * (12 * d * d + 13 * d) + 2 * d + head


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_is_the_closed_form(tie):
    cfg = GPTConfig(vocab_size=37, context=16, n_layer=3, n_head=2, width=24, tie_weights=tie)
    assert count_parameters(GPT(cfg)) == closed_form(cfg)


def test_gpt2_small_is_124m_as_gpt2_counts_it():
    # GPT-2 small has 124,439,808 parameters with 1024 positions; 896 fewer positions here
    cfg = GPTConfig.gpt2_small(context=128)
    assert closed_form(cfg) == 124_439_808 - (1024 - 128) * 768


def test_logits_are_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, context=8, n_layer=2, n_head=2, width=16)).double()
    idx = torch.randint(0, 11, (3, 8))
    changed = idx.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-6


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTConfig(width=10, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    model = GPT(GPTConfig(vocab_size=5, context=4, n_layer=1, n_head=1, width=4))
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 3))
