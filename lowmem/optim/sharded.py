"""Sharded parameters (FSDP2's DTensors): what the optimizer's parts need to keep one process's math.

Under ``fully_shard`` every parameter, gradient and state tensor is a DTensor sharded on dim 0, and DTensor ops keep
global semantics: an elementwise op runs on the local rows, a reduction over a sharded dim or an SVD communicates.
So the composed update runs on DTensors as written, and only two things need help:

* tensors the parts make themselves (APOLLO's seeded Gaussian matrix, FRUGAL's random basis) are plain tensors,
  which DTensor ops refuse to mix: ``replicated_like`` makes them replicated DTensors (every rank draws the same
  matrix from the same seed, so nothing is sent);
* blockwise 8-bit storage quantizes the local rows (``local`` / ``like``): its blocks never straddle a shard.

A checkpoint, the chunked update and the fused kernels take the local path or plain tensors only (see the callers).

What each part does with an m x n weight whose rows are split over the ranks (m_i rows here), per step:

* AdamW, sign-SGD, SGD, 8-bit moments: all local; nothing sent.
* Adam-mini: per-row and per-element blocks local (per-head too when a shard holds whole heads); a tensor-wide
  block's sum of squares is all-reduced (one number), its v kept on every rank.
* Adafactor / CAME: row statistics (m_i) local; column means and the update's RMS all-reduced (n + 1 numbers per
  factored moment), the column statistics (n) kept on every rank.
* GaLore / Fira / FRUGAL-SVD, right side (m >= n): G_i V^T and the m_i x r moments local; V (r x n) kept on every
  rank. Left side (m < n): U_i (m_i x r) local, U_i^T G_i summed over the ranks once in ``down`` (r x n); the low-rank
  gradient and its r x n moments are kept on every rank. A refresh (every T steps) gathers the whole gradient for
  the SVD (m x n).
* APOLLO: as GaLore's sides, with P redrawn from its seed on every rank (nothing kept or sent); channel norms local,
  tensor-wise norms all-reduced (one number).
* Fira's and APOLLO's limiter, the non-finite test: one norm or flag per tensor.
* Muon: the momentum local; Newton-Schulz gathers the whole (projected) momentum on every rank and each keeps its
  rows of the result (``whole`` / ``placed_like``), so its bf16 products are one process's, not a sharded matmul's
  other summation order (which bf16 rounding would carry into a different update).

So a step sends at most the projected size (r x n) per weight, and the m x n gather happens only at a GaLore-type
refresh. tests/test_fsdp.py checks the math; benchmarks/bench_fsdp.py measures the state per rank and the bytes sent.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor


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


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` gathered whole on every rank (``t`` itself when it is a plain tensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def placed_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A tensor every rank computed whole and identically, placed like ``ref`` (each rank keeps its part; nothing is
    sent); ``full`` itself when ``ref`` is a plain tensor."""
    if not isinstance(ref, DTensor):
        return full
    return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)


def replicated_like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A plain tensor that every rank computed identically, as a replicated DTensor on ``ref``'s mesh (``t`` itself
    when ``ref`` is a plain tensor)."""
    if not isinstance(ref, DTensor):
        return t
    mesh = ref.device_mesh
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
