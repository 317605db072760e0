"""Sharded parameters (FSDP2's DTensors): what the optimizer's parts need to keep one process's math.

Under ``fully_shard`` every parameter, gradient and state tensor is a DTensor sharded on dim 0, and DTensor ops keep
global semantics: an elementwise op runs on the local rows, a reduction over a sharded dim or an SVD communicates.
So the composed update runs on DTensors as written, and only two things need help:

* tensors the parts make themselves (APOLLO's seeded Gaussian matrix, FRUGAL's random basis) are plain tensors,
  which DTensor ops refuse to mix: ``replicated_like`` makes them replicated DTensors (every rank draws the same
  matrix from the same seed, so nothing is sent);
* blockwise 8-bit storage quantizes the local rows (``local`` / ``like``): its blocks never straddle a shard.

A checkpoint, the chunked update and the fused kernels take the local path or plain tensors only (see the callers).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, its gradient or state)."""
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself when it is a plain tensor)."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(part: torch.Tensor, ref: torch.Tensor, shape: tuple | None = None) -> torch.Tensor:
    """``part`` (this rank's part of a tensor placed like ``ref``, of ``ref``'s global shape or ``shape``) as a
    DTensor placed like ``ref``; ``part`` itself when ``ref`` is a plain tensor."""
    if not isinstance(ref, DTensor):
        return part
    if shape is None:
        return DTensor.from_local(part, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
                                  stride=ref.stride())
    return DTensor.from_local(part, ref.device_mesh, ref.placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def settled(t: torch.Tensor) -> torch.Tensor:
    """``t`` with any pending sum (a DTensor ``Partial``, left by a product over the sharded dim) reduced, so that
    states built from it are plain replicated tensors and in-place updates need no placement change."""
    if not isinstance(t, DTensor) or not any(p.is_partial() for p in t.placements):
        return t
    return t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in t.placements])


def replicated_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A plain tensor that every rank computed identically, as a replicated DTensor on ``ref``'s mesh (``t`` itself
    when ``ref`` is a plain tensor)."""
    if not isinstance(ref, DTensor):
        return t
    mesh = ref.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
