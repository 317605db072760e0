"""Triton kernels of ``blockwise_8bit``: quantize, dequantize and the fused 8-bit AdamW update.

Each program handles ``GROUP`` quantization blocks of ``QBLOCK`` (256) elements as a ``GROUP x QBLOCK`` tile, so a
block's maximum is a reduction along the tile's rows. The nearest code is found by an 8-step branchless binary search
over the 256 midpoints between codes (``bounds``, padded with +inf): it counts the midpoints below the value, which
is ``torch.bucketize(x, bounds)`` (ties to the lower code), the rule of the torch twin. All arithmetic is fp32 (the
interpreter computes bf16 on raw bits; on a GPU it is the precision the update needs anyway), with correctly rounded
division and square root (``div_rn``, ``sqrt_rn``) and no fused multiply-adds (``FUSION``), so the GPU computes
what the twin computes: these kernels are memory-bound, exact arithmetic costs nothing.

Imported only when a kernel runs (``dispatch.use_triton``), so lowmem works without Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import stochastic_bf16
from .blockwise_8bit import QBLOCK
from .dispatch import interpreting, on_device

#: fp32's smallest normal: the floor under a block maximum before dividing by it (a zero block stays zero).
TINY = 1.1754943508222875e-38
#: Launch option: multiplies and adds round separately, as in torch (the interpreter never fuses).
FUSION = dict(enable_fp_fusion=False)


def _group() -> int:
    """Blocks per program: few on a GPU (occupancy), many in the interpreter (its cost is per program)."""
    return 64 if interpreting() else 4


@triton.jit
def _tile(pid, GROUP: tl.constexpr, QBLOCK: tl.constexpr):
    """Element offsets (GROUP x QBLOCK, int64) and block indices (GROUP) of program ``pid``."""
    blocks = pid.to(tl.int64) * GROUP + tl.arange(0, GROUP)
    return blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :], blocks


@triton.jit
def _nearest_codes(x, bounds_ptr):
    """uint8 index of the nearest code for each ``x`` in [-1, 1]: the count of midpoints below ``x``."""
    pos = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        step = 128 >> i
        below = tl.load(bounds_ptr + pos + (step - 1)) < x
        pos = tl.where(below, pos + step, pos)
    return pos.to(tl.uint8)


@triton.jit
def _quantize_tile(values, inside, bounds_ptr, TINY: tl.constexpr):
    """(codes, block maxima) of a tile of fp32 ``values`` (elements outside the tensor count as 0)."""
    values = tl.where(inside, values, 0.0)
    absmax = tl.max(tl.abs(values), axis=1)
    scale = tl.math.div_rn(1.0, tl.maximum(absmax, TINY))
    scaled = tl.minimum(tl.maximum(values * scale[:, None], -1.0), 1.0)
    return _nearest_codes(scaled, bounds_ptr), absmax


@triton.jit
def _dequantize_tile(codes_ptr, absmax_ptr, code_ptr, offs, blocks, inside, n_blocks):
    codes = tl.load(codes_ptr + offs, mask=inside, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + blocks, mask=blocks < n_blocks, other=0.0)
    return tl.load(code_ptr + codes) * absmax[:, None]


@triton.jit
def quantize_kernel(x_ptr, codes_ptr, absmax_ptr, bounds_ptr, n, n_blocks, GROUP: tl.constexpr,
                    QBLOCK: tl.constexpr, TINY: tl.constexpr):
    offs, blocks = _tile(tl.program_id(0), GROUP, QBLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    codes, absmax = _quantize_tile(x, inside, bounds_ptr, TINY)
    tl.store(codes_ptr + offs, codes, mask=inside)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks < n_blocks)


@triton.jit
def dequantize_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n, n_blocks, GROUP: tl.constexpr,
                      QBLOCK: tl.constexpr):
    offs, blocks = _tile(tl.program_id(0), GROUP, QBLOCK)
    inside = offs < n
    values = _dequantize_tile(codes_ptr, absmax_ptr, code_ptr, offs, blocks, inside, n_blocks)
    tl.store(out_ptr + offs, values, mask=inside)


@triton.jit(do_not_specialize=["round_seed"])
def adamw_8bit_kernel(p_ptr, g_ptr, out_ptr, m_ptr, m_absmax_ptr, v_ptr, v_absmax_ptr,
                      signed_code_ptr, unsigned_code_ptr, signed_bounds_ptr, unsigned_bounds_ptr,
                      n, n_blocks, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_div,
                      step_size, decay, round_seed,
                      UPDATE_PARAM: tl.constexpr, DECAY_AFTER: tl.constexpr, ROUND_BF16: tl.constexpr,
                      GROUP: tl.constexpr, QBLOCK: tl.constexpr, TINY: tl.constexpr):
    """One pass of AdamW on blockwise 8-bit moments: dequantize m and v, update them with the gradient, requantize
    them, and either write the direction ``m / (sqrt(v) / bias_div + eps)`` to ``out`` (``UPDATE_PARAM`` off: a
    projected gradient, lifted afterwards) or update the parameter in place: ``p -= step_size * direction`` with
    decoupled decay ``p -= decay * p`` after it (``DECAY_AFTER``, the hf core) or ``p *= decay`` before it (then
    ``decay`` is the factor kept, ``1 - lr * wd``, computed by the caller in double as the composed path does)."""
    offs, blocks = _tile(tl.program_id(0), GROUP, QBLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    m = _dequantize_tile(m_ptr, m_absmax_ptr, signed_code_ptr, offs, blocks, inside, n_blocks)
    v = _dequantize_tile(v_ptr, v_absmax_ptr, unsigned_code_ptr, offs, blocks, inside, n_blocks)
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + g * g * one_minus_beta2
    direction = tl.math.div_rn(m, tl.math.div_rn(tl.sqrt_rn(v), bias_div) + eps)
    m_codes, m_absmax = _quantize_tile(m, inside, signed_bounds_ptr, TINY)
    v_codes, v_absmax = _quantize_tile(v, inside, unsigned_bounds_ptr, TINY)
    tl.store(m_ptr + offs, m_codes, mask=inside)
    tl.store(v_ptr + offs, v_codes, mask=inside)
    tl.store(m_absmax_ptr + blocks, m_absmax, mask=blocks < n_blocks)
    tl.store(v_absmax_ptr + blocks, v_absmax, mask=blocks < n_blocks)
    if UPDATE_PARAM:
        p = tl.load(p_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        if DECAY_AFTER:
            p = p - step_size * direction
            p = p - decay * p
        else:
            p = p * decay
            p = p - step_size * direction
        if ROUND_BF16:
            p = stochastic_bf16(p, tl.rand(round_seed, offs))
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(out_ptr + offs, direction, mask=inside)


def _grid(n: int):
    group = _group()
    return (triton.cdiv(triton.cdiv(n, QBLOCK), group),), group


def quantize(x: torch.Tensor, bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like ``x``, fp32 block maxima) of a contiguous ``x``; ``bounds``: the padded midpoints."""
    n = x.numel()
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(triton.cdiv(n, QBLOCK), dtype=torch.float32, device=x.device)
    grid, group = _grid(n)
    with on_device(x):
        quantize_kernel[grid](x, codes, absmax, bounds, n, absmax.numel(), GROUP=group, QBLOCK=QBLOCK, TINY=TINY,
                              **FUSION)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """fp32 values shaped like ``codes`` from their codes, block maxima and map."""
    n = codes.numel()
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    grid, group = _grid(n)
    with on_device(codes):
        dequantize_kernel[grid](codes, absmax, code, out, n, absmax.numel(), GROUP=group, QBLOCK=QBLOCK, **FUSION)
    return out


def adamw_8bit(param, grad, out, m, m_absmax, v, v_absmax, maps, bounds, *, beta1, beta2, eps, bias_div,
               step_size, decay, decay_after, round_seed) -> None:
    """Launch ``adamw_8bit_kernel`` (see ``blockwise_8bit.adamw_8bit_update_`` for the arguments)."""
    n = grad.numel()
    grid, group = _grid(n)
    update_param = out is None
    scalars = [float(x) for x in (beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bias_div, step_size, decay)]
    with on_device(grad):
        adamw_8bit_kernel[grid](
            param if update_param else grad, grad, grad if update_param else out, m, m_absmax, v, v_absmax,
            maps[0], maps[1], bounds[0], bounds[1], n, m_absmax.numel(), *scalars, round_seed or 0,
            UPDATE_PARAM=update_param, DECAY_AFTER=decay_after, ROUND_BF16=round_seed is not None and update_param,
            GROUP=group, QBLOCK=QBLOCK, TINY=TINY, **FUSION)
