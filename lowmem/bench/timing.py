"""Step time: lowmem's optimizer against its reference on the same tensors, in the same process, interleaved.

Both optimizers hold the same parameters with the same fixed gradients (each keeps its own state), and their steps
alternate in blocks (ours, reference, ours, ...) so that a slow moment of the machine hits both. The ratio of each
pair of blocks is one sample; the result is the median ratio and its spread. Projection refreshes are pushed out of
the timed window (``update_proj_gap`` huge): the refresh is the same ``torch.linalg.svd`` call on both sides, and
the steady step is what a run spends its time on.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass

import torch

#: ``update_proj_gap`` while timing: no refresh inside the timed steps.
NO_REFRESH = 10**9


@dataclass
class Timing:
    """Median ms per step of each side, and the median and range of the per-block ratio ours / reference."""

    ours_ms: float
    ref_ms: float
    ratio: float
    low: float
    high: float
    blocks: int


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # a GPU step returns before its kernels finish


def _block_seconds(step, steps: int) -> float:
    _sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync()
    return (time.perf_counter() - start) / steps


def interleaved(ours_step, ref_step, repeats: int = 7, min_block_s: float = 0.3, warmup: int = 2) -> Timing:
    """Time two step functions in alternating blocks of equal length (at least ``min_block_s`` for the slower)."""
    for _ in range(warmup):
        ours_step()
        ref_step()
    probe = max(_block_seconds(ours_step, 1), _block_seconds(ref_step, 1))
    steps = max(1, int(min_block_s / max(probe, 1e-6)))
    ours, ref = [], []
    for _ in range(repeats):
        ours.append(_block_seconds(ours_step, steps))
        ref.append(_block_seconds(ref_step, steps))
    ratios = sorted(o / r for o, r in zip(ours, ref, strict=True))
    return Timing(1e3 * statistics.median(ours), 1e3 * statistics.median(ref), statistics.median(ratios),
                  ratios[0], ratios[-1], repeats)


def time_pair(name: str, ref_key: str, model, options: dict, **kwargs) -> Timing:
    """``interleaved`` for lowmem's ``name`` and the reference ``ref_key`` on ``model``'s parameters (which must
    hold gradients); projections refresh only in the warm-up."""
    from .. import create_optimizer
    from ..optim.registry import get_spec
    from .references import reference

    known = get_spec(name).options()
    options = {**options, **{gap: NO_REFRESH for gap in ("update_proj_gap", "update_gap") if gap in known}}
    ours = create_optimizer(name, model, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference(ref_key, model, **options)
        return interleaved(ours.step, ref.step, **kwargs)

