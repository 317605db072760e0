"""The Triton kernels of ``zo_noise`` (imported only when one runs, so lowmem imports without Triton).

Every kernel walks a contiguous tensor's flat elements, ``BLOCK`` per program (64-bit offsets, so tensors of more
than 2**31 elements are fine), and draws the noise of element ``e`` as ``tl.randn(seed, offset + e)``: the noise
depends on the seed and the element only, never on ``BLOCK`` or the grid. All arithmetic is fp32 (a bf16 or fp16
weight is loaded and cast first: Triton's interpreter computes bf16 arithmetic on raw bits). Seeds and offsets are
not specialized on, so a new seed never compiles a new kernel. They are compiled without floating-point fusion
(``FUSION``): a multiply and an add round twice, as in the torch twins, instead of once in an FMA. No libdevice and
no ``.to()`` on scalar arguments, so the interpreter runs them as they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import stochastic_bf16
from .dispatch import on_device

#: Rounding of ``update``'s result: a plain store (fp32), or stochastic rounding to bf16 / fp16.
ROUND_NONE, ROUND_BF16, ROUND_FP16 = 0, 1, 2
_ROUNDING = {torch.float32: ROUND_NONE, torch.bfloat16: ROUND_BF16, torch.float16: ROUND_FP16}
#: Launch option: no FMA contraction (the interpreter ignores it; it never fuses).
FUSION = dict(enable_fp_fusion=False)


@triton.jit(do_not_specialize=["seed", "offset"])
def _perturbed_kernel(w_ptr, out_a_ptr, out_b_ptr, n, seed, offset, scale_a, scale_b, TWO: tl.constexpr,
                      BLOCK: tl.constexpr):
    """``out_a = w + scale_a z`` (and ``out_b = w + scale_b z`` when ``TWO``), one draw of ``z``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    z = tl.randn(seed, offset + offs)
    tl.store(out_a_ptr + offs, (w + scale_a * z).to(out_a_ptr.dtype.element_ty), mask=mask)
    if TWO:
        tl.store(out_b_ptr + offs, (w + scale_b * z).to(out_b_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_fp16(x, u):
    """Stochastic rounding of fp32 ``x`` to fp16: the nearest fp16, or its neighbour on ``x``'s side with the
    probability ``(x - nearest) / (neighbour - nearest)``. The neighbour (``nextafter``) comes from the bits: one
    step of the magnitude away from zero (or off zero, to ``x``'s side), or one step toward zero."""
    nearest = x.to(tl.float16)
    near = nearest.to(tl.float32)
    err = x - near
    bits = nearest.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended: negative for a negative fp16
    magnitude = bits & 0x7FFF
    up = err > 0
    away = (up != (bits < 0)) | (magnitude == 0)  # an exact zero: a finite neighbour, not NaN bits
    step = tl.where(away, magnitude + 1, magnitude - 1)
    signed = tl.where(up == away, step, step - 32768)  # the neighbour's bits as a signed 16-bit value
    other = signed.to(tl.int16).to(tl.float16, bitcast=True)
    gap = other.to(tl.float32) - near
    ratio = tl.where(gap != 0, tl.math.div_rn(err, gap), 0.0)
    return tl.where(u < ratio, other, nearest)


@triton.jit(do_not_specialize=["seed0", "n_more", "round_seed", "offset"])
def _update_kernel(w_ptr, seed0, coef0, seeds_ptr, coefs_ptr, n_more, decay, n, round_seed, offset,
                   ROUND: tl.constexpr, BLOCK: tl.constexpr):
    """``w <- round(w decay + coef0 z_0 + sum_k coefs[k] z_k)``: ``z_0`` drawn under ``seed0`` (the first sample,
    passed as scalars: no per-call copy to the device), any further ones under ``seeds[k]`` (int64 bits of a uint64),
    and the rounding's uniforms under ``round_seed``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    counter = offset + offs
    new = tl.load(w_ptr + offs, mask=mask).to(tl.float32) * decay
    new += coef0 * tl.randn(seed0, counter)
    for k in range(n_more):
        new += tl.load(coefs_ptr + k) * tl.randn(tl.load(seeds_ptr + k), counter)
    if ROUND == 1:
        out = stochastic_bf16(new, tl.rand(round_seed, counter))
    elif ROUND == 2:
        out = _round_fp16(new, tl.rand(round_seed, counter))
    else:
        out = new
    tl.store(w_ptr + offs, out.to(w_ptr.dtype.element_ty), mask=mask)


def _grid(n: int, block: int) -> tuple[int]:
    return (triton.cdiv(n, block),)


def perturbed(w: torch.Tensor, outs: list[torch.Tensor], seed: int, offset: int, scales: list[float],
              block: int) -> None:
    """Write ``w + scale z`` into each of ``outs`` (one or two, contiguous, like ``w``)."""
    two = len(scales) == 2
    with on_device(w):
        _perturbed_kernel[_grid(w.numel(), block)](w, outs[0], outs[-1], w.numel(), seed, offset, float(scales[0]),
                                                   float(scales[-1]), TWO=two, BLOCK=block, **FUSION)


def update_(w: torch.Tensor, seeds: list[int], coefs: list[float], decay: float, round_seed: int, offset: int,
            block: int) -> None:
    """``w <- round(w decay + sum_k coefs[k] z_k)`` in place (``coefs``: fp32 values). The first sample goes as
    scalars; only further ones (``zo_samples`` > 1) are copied to the device, as int64 bits and fp32."""
    more = [s - (1 << 64) if s >= 1 << 63 else s for s in seeds[1:]]  # uint64 bits in int64 (the kernel's view)
    if more:
        more_seeds = torch.tensor(more, dtype=torch.int64).to(w.device)
        more_coefs = torch.tensor(coefs[1:], dtype=torch.float32).to(w.device)
    else:  # no copy at all (typed pointers the kernel never reads)
        more_seeds = torch.empty(0, dtype=torch.int64, device=w.device)
        more_coefs = torch.empty(0, dtype=torch.float32, device=w.device)
    with on_device(w):
        _update_kernel[_grid(w.numel(), block)](w, seeds[0], coefs[0], more_seeds, more_coefs, len(more), float(decay),
                                                w.numel(), round_seed, offset, ROUND=_ROUNDING[w.dtype], BLOCK=block,
                                                **FUSION)
