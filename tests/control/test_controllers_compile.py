"""The controllers' sync-free tensor paths under ``torch.compile(fullgraph=True)`` (issue 17):
DROWeighting's streaming weights and AdaptiveKL's tensor update, each compiled whole, give
eager's outputs and leave eager's state, over several calls with a bad (NaN) one among them
(skipped on the device). Oracle: the same calls on an eager twin.
"""

from __future__ import annotations

import math

import torch

from torchsteer.control.dro import DROWeighting
from torchsteer.control.kl import AdaptiveKLController


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if x is None or isinstance(x, str | bool):
            assert x == y, k
            continue
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0, equal_nan=True, msg=k)


def test_dro_streaming_weights_compile_fullgraph():
    torch._dynamo.reset()
    eager, comp = (DROWeighting(temperature=2.0, mode="streaming", nonfinite="skip") for _ in "ab")
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(16, generator=g, dtype=torch.float64) * 3 for _ in range(5)]
    batches[2][4] = math.nan  # skipped: the state stays
    fn = torch.compile(lambda x: comp.weights(x), fullgraph=True)
    for losses in batches:
        w_e, w_c = eager.weights(losses), fn(losses)
        torch.testing.assert_close(w_c, w_e, rtol=1e-12, atol=1e-15, equal_nan=True)
    _same_state(comp.state_dict(), eager.state_dict())
    assert eager.log_normalizer is not None  # it moved


def test_adaptive_kl_tensor_update_compiles_fullgraph():
    torch._dynamo.reset()
    eager, comp = (AdaptiveKLController(beta0=0.2, target=0.1, horizon=100) for _ in "ab")
    eager.nonfinite = comp.nonfinite = "skip"
    fn = torch.compile(lambda kl: comp.update(kl=kl, n_steps=8), fullgraph=True)
    kls = [0.12, 0.3, math.nan, 0.05, 0.2]
    for kl in kls:
        t = torch.tensor(kl, dtype=torch.float64)
        torch.testing.assert_close(fn(t), eager.update(kl=t, n_steps=8), rtol=1e-12, atol=0)
    _same_state(comp.state_dict(), eager.state_dict())
    assert float(eager.coef) != 0.2  # it moved
