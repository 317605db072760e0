"""Non-finite gradients: find them with one reduction per tensor, skip those tensors' updates, say so once.

A NaN or inf in one gradient would otherwise enter that tensor's moments and every later step would be NaN. With
``skip_nonfinite=True`` (the default of every lowmem optimizer) a tensor whose gradient is not finite is left alone
for that step, as if it had no gradient: its weight, moments, projector and step count stay as they were. Each such
skip adds one to ``optimizer.nonfinite_skips`` (the lowmem Trainer logs it as ``skipped_nonfinite``); the first one
warns with the parameter's name. ``skip_nonfinite=False`` gives torch's behaviour (the update runs, NaN and all).

The test is the max-norm (``vector_norm(ord=inf)``): one reduction, no temporary, NaN and inf propagate through it,
and unlike a sum it cannot overflow on finite values. The flags of many tensors reach the host in one transfer per
device.
"""

from __future__ import annotations

import warnings

import torch

_INF = float("inf")


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """For each tensor, whether every element is finite (one reduction each, one host transfer per device)."""
    flags = [True] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        peaks = torch.stack([torch.linalg.vector_norm(tensors[i], ord=_INF).float() for i in indices])
        for i, ok in zip(indices, torch.isfinite(peaks).tolist(), strict=True):
            flags[i] = ok
    return flags


class SkipCounter:
    """The count of skipped updates and the once-only warning, kept by an optimizer."""

    def __init__(self):
        self.count = 0
        self.warned = False

    def skip(self, what: str, step: int | None = None) -> None:
        """Count one skipped update of ``what`` (a parameter's name); warn the first time."""
        self.count += 1
        if not self.warned:
            self.warned = True
            when = f" at step {step + 1}" if step is not None else ""
            warnings.warn(f"lowmem: the gradient of {what} has NaN or inf values{when}: its update was skipped and its "
                          "optimizer state kept. Later skips are counted in optimizer.nonfinite_skips (logged as "
                          "skipped_nonfinite); pass skip_nonfinite=False to update with them as torch does.",
                          RuntimeWarning, stacklevel=4)
