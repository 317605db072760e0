"""A one-element Triton kernel that ``dispatch`` launches once per process to learn whether kernels run here."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_one(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)


def probe(device: torch.device) -> None:
    """Raise unless a kernel compiles, launches and computes on ``device`` (a CUDA device)."""
    x = torch.zeros(1, device=device)
    with torch.cuda.device(x.device):
        _add_one[(1,)](x)
    if x.item() != 1.0:
        raise RuntimeError(f"a probe kernel computed {x.item()} instead of 1.0")
