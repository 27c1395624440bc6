"""Thin Lightning callbacks over :mod:`torchsteer.control` and :mod:`torchsteer.optim`."""
