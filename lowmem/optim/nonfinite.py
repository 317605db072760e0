"""Non-finite gradients: find them with one reduction per tensor, skip those tensors' updates, say so once.

A NaN or inf in one gradient would otherwise enter that tensor's moments and every later step would be NaN. With
``skip_nonfinite=True`` (the default of every lowmem optimizer) a tensor whose gradient is not finite is left alone
for that step, as if it had no gradient: its weight, moments, projector and step count stay as they were. Each such
skip adds one to ``optimizer.nonfinite_skips`` (the lowmem Trainer logs it as ``skipped_nonfinite``); the first one
warns with the parameter's name. ``skip_nonfinite=False`` gives torch's behaviour (the update runs, NaN and all).

The test is the tensor's minimum and maximum (``aminmax``): one reduction, no temporary, NaN and inf reach them, and
unlike a sum they cannot overflow on finite values (the max-norm, ``vector_norm(ord=inf)``, is the same test but
25x slower on a CPU: 2.1 ms for a 2048 x 768 fp32 gradient against 0.09). The flags of many tensors reach the host
in one transfer per device.
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.tensor import DTensor


def finite_flags(tensors: list[torch.Tensor]) -> list[bool]:
    """For each tensor, whether every element is finite (one reduction each, one host transfer per device). A
    sharded tensor (DTensor) is judged whole: its shards' verdicts are summed over its mesh in one all-reduce per
    device and mesh, so every rank skips the same tensors."""
    flags = [True] * len(tensors)
    by_place: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        mesh = t.device_mesh if isinstance(t, DTensor) else None
        by_place.setdefault((t.device, mesh), []).append(i)
    for (_, mesh), indices in by_place.items():
        local = [tensors[i].to_local() if mesh is not None else tensors[i] for i in indices]
        bad = torch.stack([_not_finite(t) for t in local])
        if mesh is not None:
            torch.distributed.all_reduce(bad, group=mesh.get_group())
        for i, count in zip(indices, bad.tolist(), strict=True):
            flags[i] = count == 0
    return flags


def _not_finite(t: torch.Tensor) -> torch.Tensor:
    """1.0 when ``t`` holds a NaN or an inf (its minimum or maximum is then not finite), else 0.0; 0.0 for an empty
    tensor (or an empty shard)."""
    if not t.numel():
        return t.new_zeros((), dtype=torch.float32)
    return (~torch.isfinite(torch.stack(torch.aminmax(t)))).any().float()


class SkipCounter:
    """The count of skipped updates and the once-only warning, kept by an optimizer."""

    def __init__(self):
        self.count = 0
        self.warned = False

    def skip(self, what: str, step: int | None = None) -> None:
        """Count one skipped update; warn the first time, naming ``what`` was not finite (a parameter's gradient,
        MeZO's projected gradient)."""
        self.count += 1
        if not self.warned:
            self.warned = True
            when = f" at its update {step + 1}" if step is not None else ""
            warnings.warn(f"lowmem: {what} has NaN or inf values{when}: the update was skipped and "
                          "the optimizer state kept. Later skips are counted in optimizer.nonfinite_skips (logged as "
                          "skipped_nonfinite); skip_nonfinite=False turns this off.", RuntimeWarning, stacklevel=2)
