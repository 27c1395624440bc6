"""The built-in suites by name, without importing them: what ``torchsteer bench --list`` prints.

Importing a suite module imports torch (and NumPy, SciPy, scikit-learn); ``--list`` must not
pay for that, so the names, one-line descriptions and ``quick_default`` flags of the modules
in :mod:`torchsteer.bench.suites` are kept here as plain data. ``tests/bench`` checks that
this table equals what the modules register.
"""

from __future__ import annotations

__all__ = ["BUILTIN"]

# name -> (module in torchsteer.bench.suites, description, quick_default)
BUILTIN: dict[str, tuple[str, str, bool]] = {
    "convex": (
        "convex",
        "logistic / softmax regression and a small MLP: f - f* <= 1e-8 (MLP: f)",
        True,
    ),
    "digits-mlp": ("digits_mlp", "MLP 64-64-64-10 on scikit-learn digits, test accuracy", True),
    "distill": (
        "distill",
        "digits: teacher MLP 64-256-256-10 distilled into 64-4-10, 10 arms",
        True,
    ),
    "dro": (
        "dro",
        "KL-DRO reweighting in PGD adversarial training (digits MLP, worst class)",
        True,
    ),
    "lm": (
        "lm",
        "GPT 4x128 on a Markov language of known entropy rate H: CPU s to 1.05 H",
        False,
    ),
    "lr-spike": (
        "lr_spike",
        "digits, full-batch Adam with a one-step lr spike: plain, clip, radius limiter",
        True,
    ),
    "regression": (
        "regression",
        "Sven paper's 1-D regression, MLP 1-16-16-16-1, val MSE",
        True,
    ),
    "rlhf-toy": (
        "rlhf_toy",
        "KL control vs reward hacking: toy RLHF policy (V=32, L=8), 6 controllers",
        True,
    ),
    "rlvr-diversity": (
        "rlvr_diversity",
        "RLVR pass@k collapse: shared-parameter policy, reverse/forward KL, JS, DPH-RL",
        True,
    ),
    "rlvr-paced": (
        "rlvr_paced",
        "RLVR prompts of spread difficulty: PACED weights, APO's adaptive KL, uniform",
        True,
    ),
}
