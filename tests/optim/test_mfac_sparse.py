"""A sparse gradient is refused before anything is allocated (the attack rerun's M-FAC case)."""

import pytest
import torch

from torchsteer.optim import MFAC


def test_a_refused_sparse_first_step_leaves_no_state():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MFAC(emb.parameters(), lr=0.1, ngrads=4)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert opt.state_dict()["state"] == {} and opt._window is None
    assert torch.equal(emb.weight, before)
    emb.weight.grad = emb.weight.grad.to_dense()  # the same gradient, dense: steps normally
    opt.step()
    assert not torch.equal(emb.weight, before)
