"""The Triton kernel of ``int8_weights.dequantize``: int8 codes times their block's fp32 scale, stored in the output's
dtype (one rounding, as the twin). Each program handles ``BLOCK`` flat elements (64-bit offsets).

Imported only when the kernel runs (``dispatch.use_triton``), so lowmem works without Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, on_device


@triton.jit
def dequantize_kernel(codes_ptr, scales_ptr, out_ptr, n, QBLOCK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scales_ptr + offs // QBLOCK, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (codes * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, block: int) -> None:
    n = codes.numel()
    size = 8192 if interpreting() else 1024
    with on_device(codes):
        dequantize_kernel[(triton.cdiv(n, size),)](codes, scales, out, n, QBLOCK=block, BLOCK=size)
