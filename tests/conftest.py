"""Test-wide settings: one thread per worker (pytest-xdist runs 2 workers on 2 cores)."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def devices():
    """CPU always; CUDA when present (used to parametrize device tests)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out
