"""Single arms of the lm suite on one seed: the tuning sweep behind benchmarks/results/lm.md.

Each argument is an arm built by the suite's helpers, run on the full configuration
(:data:`torchsteer.bench.suites.lm.FULL`) with :func:`~torchsteer.bench.suites.lm.run_arm`;
one line per arm: CPU seconds in all, per step, to the target (1.05 H), steps taken, the
validation curve (every other point) and the true chain's loss on the same windows::

    SEED=1 OMP_NUM_THREADS=1 python benchmarks/lm_sweep.py "adamw_arm(3e-3, 600)" \\
        "mfac_arm(3e-2, 600)" "sven_arm(0.2, 100)" "newton_arm(30)"

CPU time is ``time.process_time``, one torch thread; on a shared machine compare lines of
one invocation or of the same load, not across machines.
"""

import os
import sys
import time

import torch

from torchsteer.bench.suites import lm

torch.set_num_threads(1)
cfg, lang = lm.FULL, lm.language()
seed = int(os.environ.get("SEED", "0"))
print("H", lang.entropy_rate, "target", 1.05 * lang.entropy_rate, "seed", seed, flush=True)
helpers = {k: getattr(lm, k) for k in ("adamw_arm", "mfac_arm", "sven_arm", "newton_arm")}
for spec in sys.argv[1:]:
    arm = eval(spec, helpers)  # a call of one of the helpers, from the command line
    t = time.process_time()
    r = lm.run_arm(arm, cfg, seed, lang)
    print(
        arm.name,
        f"total {time.process_time() - t:.1f}s step {r.step_time * 1000:.0f}ms",
        f"ttt {r.time_to_target}",
        "steps",
        r.extra["step"][-1],
        "metric",
        [round(m, 3) for m in r.metric][::2],
        "true",
        round(r.extra["val_true_nll"], 3),
        flush=True,
    )
