"""Lightning ``strategy="ddp"`` on 2 CPU processes: M-FAC + RadiusLimit, fit and resume.

The processes are started the way ``torchrun`` starts them (``LOCAL_RANK`` set, the gloo
process group initialized by the launcher, here ``tests/distributed/harness.py``); Lightning's
``ddp`` strategy then launches nothing itself. (``strategy="ddp"`` with Lightning as the
launcher would re-run the ``pytest`` command line in a child process.) The oracle is a
hand-written single-process loop on the concatenated batch.
"""

import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from torchsteer.callbacks.radius_limit import RadiusLimit
from torchsteer.control.radius import RadiusLimiter
from torchsteer.distributed import column_bounds
from torchsteer.optim.mfac import MFAC

from .._lightning import ddp_trainer
from .harness import run_ranks

F64 = torch.float64
N, BATCH = 16, 8  # global batch 8: 4 samples per rank
OPT = dict(lr=0.5, ngrads=3, damp=1e-2, momentum=0.5)
R_MAX = 1.0
STEPS, MORE = 4, 4  # an epoch is 2 steps: 2 epochs, checkpoint, 2 more; the ring wraps


def data():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, 5, generator=gen, dtype=F64)
    y = torch.randint(0, 3, (N,), generator=gen)
    return x, y


def net():
    torch.manual_seed(0)
    # 40 + 8 + 24 + 3 = 75 parameters: odd, so the two ranks hold 38 and 37 window columns
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return MFAC(self.parameters(), **OPT)

    def train_dataloader(self):
        # rank r of R gets samples r, r + R, ...: the ranks' batches make up 8k..8k+7
        world, dataset = self.trainer.world_size, torch.utils.data.TensorDataset(*data())
        sampler = DistributedSampler(dataset, world, self.trainer.global_rank, shuffle=False)
        return torch.utils.data.DataLoader(dataset, BATCH // world, sampler=sampler)


def _trainer(tmpdir, steps):
    # stop by epochs: a checkpoint taken after a max_steps stop mid-loop resumes Lightning's
    # epoch and replays a batch (non-stateful loader): another data order than one process
    return ddp_trainer(
        max_epochs=steps // 2,
        use_distributed_sampler=False,  # ours, unshuffled (Lightning's would shuffle)
        default_root_dir=tmpdir,
        callbacks=[RadiusLimit(r_max=R_MAX)],
    )


def _worker(rank, world_size, tmpdir):
    os.environ["LOCAL_RANK"] = str(rank)  # as torchrun: Lightning launches nothing
    os.environ["NODE_RANK"] = "0"
    path = os.path.join(tmpdir, "fit.ckpt")
    module = Classifier()
    trainer = _trainer(tmpdir, STEPS)
    trainer.fit(module)
    trainer.save_checkpoint(path)  # on every rank; the file is written by rank 0
    opt = trainer.optimizers[0]
    first = next(module.parameters())
    out = {
        "params": [p.detach().clone() for p in module.parameters()],
        "window_numel": opt.state[first]["window_grads"].numel(),
    }
    resumed = Classifier()
    trainer = _trainer(tmpdir, STEPS + MORE)
    trainer.fit(resumed, ckpt_path=path)
    limiter = trainer.callbacks[0].limiter
    out["resumed"] = [p.detach().clone() for p in resumed.parameters()]
    out["limiter"] = limiter.state_dict()
    return out


def oracle(steps):
    """One process, the concatenated batch (samples 8k..8k+7 at step k of an epoch)."""
    model = net()
    x, y = data()
    opt = MFAC(model.parameters(), **OPT)
    limiter = RadiusLimiter(model, r_max=R_MAX)
    out, scales = [], []
    for step in range(steps):
        sl = slice(BATCH * (step % 2), BATCH * (step % 2 + 1))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[sl]), y[sl]).backward()
        limiter.step(opt, x[sl])
        scales.append(limiter.last["scale"])
        out.append([p.detach().clone() for p in model.parameters()])
    return out, scales, limiter


@pytest.mark.distributed
def test_lightning_ddp_mfac_radius_fit_and_resume_equal_one_process(tmp_path):
    ranks = run_ranks(_worker, 2, str(tmp_path))
    params, scales, limiter = oracle(STEPS + MORE)
    assert any(s < 1.0 for s in scales) and any(s == 1.0 for s in scales)  # both regimes
    d = sum(p.numel() for p in params[0])
    bounds = column_bounds(d, 2)  # 38 and 37 columns: the ranks hold unequal slices
    for r, out in enumerate(ranks):
        assert out["window_numel"] == OPT["ngrads"] * (bounds[r + 1] - bounds[r])
        for got, want in ((out["params"], params[STEPS - 1]), (out["resumed"], params[-1])):
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        state = out["limiter"]  # restored from the checkpoint and continued
        assert (state["steps"], state["limited"]) == (limiter.steps, limiter.limited)
        assert state["last"]["r"] == pytest.approx(limiter.last["r"], rel=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["resumed"], ranks[1]["resumed"]))
