"""Triton helpers shared by the kernels (imported only when a kernel runs)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def stochastic_bf16(x, u):
    """fp32 ``x`` rounded at random to a bf16 value, returned as fp32 (exact in bf16): 16 random low bits from the
    uniforms ``u`` added, then cut off, so the result is unbiased (``common.stochastic_round``'s rule)."""
    bits = x.to(tl.int32, bitcast=True) + (u * 65536.0).to(tl.int32)
    return (bits & -65536).to(tl.float32, bitcast=True)
