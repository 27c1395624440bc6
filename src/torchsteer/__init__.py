"""torchsteer: curvature-aware optimizers and training-dynamics controllers for PyTorch."""

__version__ = "0.1.0"
