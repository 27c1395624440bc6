"""NKD and PS-KD against float64 formulas written out term by term, the KD decomposition
identity, finite differences, and a resume of the PS-KD memory."""

import math

import pytest
import torch

from torchsteer.divergence import PSKDTargets, nkd_loss, ps_kd_alpha, soft_cross_entropy

DT = torch.float64


def logits(n=5, c=7, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return (
        spread * torch.randn(n, c, generator=g, dtype=DT),
        spread * torch.randn(n, c, generator=g, dtype=DT),
        torch.randint(0, c, (n,), generator=g),
    )


def nkd_reference(zs, zt, y, gamma, T):
    """The formula, one row and one class at a time, in float64."""
    rows = []
    for a in range(zs.shape[0]):
        p = [math.exp(v) for v in zt[a].tolist()]
        q = [math.exp(v) for v in zs[a].tolist()]
        p_y, q_y = p[y[a]] / sum(p), q[y[a]] / sum(q)
        others = [i for i in range(zs.shape[1]) if i != y[a]]
        pt = [math.exp(zt[a, i].item() / T) for i in others]
        qt = [math.exp(zs[a, i].item() / T) for i in others]
        cross = sum(pi / sum(pt) * math.log(qi / sum(qt)) for pi, qi in zip(pt, qt))
        rows.append(-p_y * math.log(q_y) - gamma * T**2 * cross)
    return torch.tensor(rows, dtype=DT)


@pytest.mark.parametrize(("gamma", "T"), [(1.5, 1.0), (1.0, 4.0), (0.0, 2.0)])
def test_nkd_equals_the_formula(gamma, T):
    zs, zt, y = logits()
    out = nkd_loss(zs, zt, y, gamma=gamma, temperature=T, reduction="none")
    torch.testing.assert_close(out, nkd_reference(zs, zt, y, gamma, T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nkd_loss(zs, zt, y, gamma, T), out.mean())
    torch.testing.assert_close(nkd_loss(zs, zt, y, gamma, T, reduction="sum"), out.sum())


def test_kd_cross_entropy_decomposes_into_nkd_parts():
    """-sum p log q = -p_y log q_y - (1-p_y) log(1-q_y) + (1-p_y) * (NKD's non-target part)."""
    zs, zt, y = logits(seed=3)
    p, q = torch.softmax(zt, 1), torch.softmax(zs, 1)
    p_y, q_y = p.gather(1, y[:, None])[:, 0], q.gather(1, y[:, None])[:, 0]
    non_target = nkd_loss(zs, zt, y, gamma=1.0, reduction="none") + p_y * torch.log(q_y)
    kd = -(p * torch.log(q)).sum(1)
    rebuilt = -p_y * torch.log(q_y) - (1 - p_y) * torch.log(1 - q_y) + (1 - p_y) * non_target
    torch.testing.assert_close(rebuilt, kd, rtol=1e-12, atol=1e-12)


def test_nkd_gradient_by_finite_differences_and_teacher_detached():
    zs, zt, y = logits(n=3, c=5, seed=4)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    nkd_loss(zs, zt, y, gamma=1.5, temperature=2.0).backward()
    assert zt.grad is None or torch.equal(zt.grad, torch.zeros_like(zt))
    h = 1e-6
    for a, i in [(0, 0), (1, 3), (2, 4)]:
        e = torch.zeros_like(zs)
        e[a, i] = h
        with torch.no_grad():
            fd = (nkd_loss(zs + e, zt, y, 1.5, 2.0) - nkd_loss(zs - e, zt, y, 1.5, 2.0)) / (2 * h)
        assert abs(float(zs.grad[a, i]) - float(fd)) < 1e-8


def test_nkd_low_precision_inputs_compute_in_float32_and_bad_input_raises():
    zs, zt, y = logits(seed=5)
    ref = nkd_loss(zs, zt, y)
    out = nkd_loss(zs.bfloat16(), zt.bfloat16(), y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="Invalid target"):
        nkd_loss(zs, zt, torch.full((5,), 7))
    with pytest.raises(ValueError, match="Invalid logits"):
        nkd_loss(zs, zt[:, :3], y)
    with pytest.raises(ValueError, match="Invalid temperature"):
        nkd_loss(zs, zt, y, temperature=0.0)


def test_ps_kd_targets_follow_the_schedule_and_resume():
    assert [ps_kd_alpha(t, 4) for t in range(5)] == [0.0, 0.2, 0.4, 0.6000000000000001, 0.8]
    memory = PSKDTargets(n_samples=6, n_classes=3, dtype=DT)
    idx, y = torch.tensor([4, 1]), torch.tensor([2, 0])
    onehot = torch.nn.functional.one_hot(y, 3).to(DT)
    torch.testing.assert_close(memory.targets(idx, y, 0.5), onehot)  # nothing seen yet
    z = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]], dtype=DT)
    memory.update(idx, z)
    t = memory.targets(idx, y, 0.3)
    torch.testing.assert_close(t, 0.7 * onehot + 0.3 * torch.softmax(z, 1))
    ce = soft_cross_entropy(z, t, reduction="none")
    torch.testing.assert_close(ce, -(t * torch.log_softmax(z, 1)).sum(1))
    fresh = PSKDTargets(6, 3, dtype=DT)
    fresh.load_state_dict(memory.state_dict())
    assert torch.equal(fresh.targets(idx, y, 0.3), t)
    before = memory.state_dict()
    with pytest.raises(ValueError, match="Invalid logits"):
        memory.update(idx, torch.full((2, 3), float("nan"), dtype=DT))
    with pytest.raises(ValueError, match="Invalid indices"):
        memory.update(torch.tensor([6, 0]), z)
    after = memory.state_dict()
    assert torch.equal(after["probs"], before["probs"]) and torch.equal(
        after["seen"], before["seen"]
    )
