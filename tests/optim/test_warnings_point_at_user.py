"""The optimizers' warnings name the user's line (past torch's step wrappers), as stacklevel
promises: the filename of the warning is this test file."""

import pytest
import torch

from torchsteer.optim import RegularizedNewton


def test_regularized_newton_all_rejected_warning_points_at_the_caller():
    w = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    w0 = w.detach().clone()
    opt = RegularizedNewton([w], max_tries=2)

    def closure():  # finite at the start, NaN at every trial point: every try is rejected
        f = (w**2).sum()
        return f if torch.equal(w.detach(), w0) else f * float("nan")

    with pytest.warns(RuntimeWarning, match="every try was rejected") as record:
        opt.step(closure)
    assert record[0].filename == __file__
    assert torch.equal(w.detach(), w0)
