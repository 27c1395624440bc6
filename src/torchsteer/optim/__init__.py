"""Optimizers: true ``torch.optim.Optimizer`` subclasses. Never imports Lightning."""

__all__: list[str] = []
