"""The host-sync counter of tests/_sync.py counts exactly the calls that synchronize, and
puts torch back as it was."""

import torch

from ._sync import NAMES, SyncCounter


def test_counts_each_synchronizing_call_once_and_pure_tensor_work_not_at_all():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        y = torch.where(x > 2, x * 2, x).sum()  # device work only
        assert c.total == 0
        y.item()
        bool(y > 0)
        float(y)
        int(y)
        x.tolist()
        x.cpu()
        x.nonzero()
        if x[0] == 0:  # an `if` on a tensor is a __bool__
            pass
    assert dict(c.counts) == {
        "item": 1,
        "__bool__": 2,
        "__float__": 1,
        "__int__": 1,
        "tolist": 1,
        "cpu": 1,
        "nonzero": 1,
    }


def test_torch_is_restored_after_the_block():
    before = {name: getattr(torch.Tensor, name) for name in NAMES}
    with SyncCounter():
        pass
    assert {name: getattr(torch.Tensor, name) for name in NAMES} == before
    with SyncCounter() as c:
        pass
    float(torch.ones(()))
    assert c.total == 0
