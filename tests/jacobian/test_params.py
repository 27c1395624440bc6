"""Parameter dict <-> flat vector helpers and wrapper unwrapping."""

import socket

import pytest
import torch
from torch import nn

from torchsteer.jacobian import check_finite, flatten, numel, param_dict, unflatten, unwrap_model


def test_flatten_unflatten_roundtrip_returns_views():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    p = param_dict(model)
    vec = flatten(p)
    assert vec.numel() == numel(p) == 3 * 4 + 4 + 4 * 2 + 2
    back = unflatten(vec, p)
    assert list(back) == list(p)
    for k in p:
        torch.testing.assert_close(back[k], p[k].detach())
        assert back[k].untyped_storage().data_ptr() == vec.untyped_storage().data_ptr()
    as_list = unflatten(vec, list(p.values()))
    assert isinstance(as_list, list) and len(as_list) == 4
    with pytest.raises(ValueError, match="Invalid vector"):
        unflatten(vec[:-1], p)


def test_param_dict_skips_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in param_dict(model)
    assert "0.weight" in param_dict(model, trainable_only=False)


def test_unwrap_compile_wrapper():
    model = nn.Linear(2, 2)
    compiled = torch.compile(model)
    assert compiled is not model
    assert unwrap_model(compiled) is model


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unwrap_ddp_wrapper():
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        model = nn.Linear(2, 2)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(ddp) is model
        assert unwrap_model(torch.compile(ddp)) is model
    finally:
        dist.destroy_process_group()


def test_check_finite_names_the_input():
    check_finite("gradient", torch.ones(3))
    with pytest.raises(ValueError, match="Invalid gradient: contains NaN or Inf"):
        check_finite("gradient", torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="Invalid loss"):
        check_finite("loss", torch.ones(2), torch.tensor(float("inf")))
