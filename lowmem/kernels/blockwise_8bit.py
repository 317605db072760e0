"""Blockwise 8-bit states on the GPU: quantize, dequantize and the fused 8-bit AdamW update, each a Triton kernel
with a pure-torch twin of the same signature (``dispatch`` picks one).

The fused update is one pass over memory per parameter: read the gradient, the parameter and both moments' codes
and block maxima, dequantize, update the moments, requantize them and write the parameter (or, for a projected
gradient, the direction). The unfused path writes and reads the dequantized fp32 moments and the direction in
between: about 14 more bytes of traffic per element and ``12 x numel`` bytes of temporaries. A bf16 parameter can
be stochastically rounded (unbiased, so updates far below half an ulp are not lost), the rounding bits drawn from
``tl.rand(round_seed, element)`` in the kernel and from its torch twin (``philox``) in the twin.

The twin is the eager path written out in fp32 (``codes_8bit`` does the coding). The kernel computes every
fp32 operation correctly rounded and unfused; torch's CPU kernels fuse some multiply-adds and their fp32 ``sqrt`` is
1 ulp off on about a fifth of values (torch 2.13), so where a moment sits on a midpoint between two codes the two
may pick neighbouring codes (a few elements in 1e5; quantize and dequantize alone are identical).
"""

from __future__ import annotations

import torch

from . import codes_8bit, philox
from .common import adam_moments_, stochastic_round
from .dispatch import use_triton

QBLOCK = 256
_BOUNDS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def _bounds(code: torch.Tensor) -> torch.Tensor:
    """The 255 midpoints between consecutive codes, then +inf: what the kernel's binary search compares with."""
    return torch.cat([codes_8bit.midpoints(code), torch.full((1,), float("inf"), device=code.device)])


def _default_bounds(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, device)
    if key not in _BOUNDS:
        _BOUNDS[key] = _bounds(codes_8bit.cached_map(signed, device))
    return _BOUNDS[key]


def _bounds_of(code: torch.Tensor) -> torch.Tensor:
    """``_bounds(code)``, cached for the two default maps (what every optimizer state uses)."""
    for signed in (True, False):
        if code is codes_8bit.cached_map(signed, code.device):
            return _default_bounds(signed, code.device)
    return _bounds(code.float())


def _kernels():
    from . import blockwise_8bit_triton

    return blockwise_8bit_triton


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = QBLOCK):
    """(uint8 codes shaped like ``x``, fp32 maximum of each block of ``blocksize``) on the map ``code``."""
    if blocksize == QBLOCK and use_triton(x):
        return _kernels().quantize(x.contiguous(), _bounds_of(code))
    return codes_8bit.quantize_blockwise(x, code, blocksize)


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = QBLOCK):
    """fp32 values shaped like ``codes``: ``code[codes]`` times their block's maximum."""
    if blocksize == QBLOCK and use_triton(codes):
        return _kernels().dequantize(codes.contiguous(), absmax, code.float().contiguous())
    return codes_8bit.dequantize_blockwise(codes, absmax, code, blocksize)


def adamw_8bit_update_(param: torch.Tensor | None, grad: torch.Tensor, state: dict, *, beta1: float, beta2: float,
                       eps: float, step_size: float = 0.0, decay: float = 0.0, decay_after: bool = True,
                       bias_div: float = 1.0, round_seed: int | None = None,
                       out: torch.Tensor | None = None) -> None:
    """AdamW on the blockwise 8-bit moments in ``state`` (``exp_avg`` / ``exp_avg_sq`` codes and ``*_absmax``,
    updated in place), in one pass.

    With ``out`` (fp32, shaped like ``grad``) the direction ``m / (sqrt(v) / bias_div + eps)`` is written there and
    ``param`` is not touched (a projected gradient: the lift applies it). Without, ``param`` (contiguous, shaped like
    ``grad``) is updated in place: ``p -= step_size * direction`` and decoupled decay, ``p -= decay * p`` after the
    update (``decay_after``, the hf core) or ``p *= 1 - decay`` before it (the torch core). ``round_seed`` rounds a
    bf16 ``param`` stochastically."""
    if (param is None) == (out is None):
        raise ValueError("give exactly one of param (update it) and out (write the direction)")
    if round_seed is not None and (out is not None or param.dtype != torch.bfloat16):
        raise ValueError("stochastic rounding applies to a bf16 parameter being updated")
    tensors = [t for t in (param, grad, out) if t is not None]
    device = grad.device
    maps = (codes_8bit.cached_map(True, device), codes_8bit.cached_map(False, device))
    if use_triton(*tensors):
        bounds = (_default_bounds(True, device), _default_bounds(False, device))
        factor = decay if decay_after else 1.0 - decay
        _kernels().adamw_8bit(param, grad, out, state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"],
                              state["exp_avg_sq_absmax"], maps, bounds, beta1=beta1, beta2=beta2, eps=eps,
                              bias_div=bias_div, step_size=step_size, decay=factor, decay_after=decay_after,
                              round_seed=round_seed)
        return
    _adamw_8bit_twin(param, grad, state, maps, beta1, beta2, eps, step_size, decay, decay_after, bias_div,
                     round_seed, out)


def _adamw_8bit_twin(param, grad, state, maps, beta1, beta2, eps, step_size, decay, decay_after, bias_div,
                     round_seed, out) -> None:
    """The fused update in eager torch, in the kernel's order of operations."""
    m = codes_8bit.dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], maps[0], QBLOCK)
    v = codes_8bit.dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], maps[1], QBLOCK)
    direction = adam_moments_(m, v, grad.float(), beta1, beta2, eps, bias_div)
    for key, value, code in (("exp_avg", m, maps[0]), ("exp_avg_sq", v, maps[1])):
        codes, absmax = codes_8bit.quantize_blockwise(value, code, QBLOCK)
        state[key].copy_(codes)
        state[key + "_absmax"].copy_(absmax)
    if out is not None:
        out.copy_(direction)
        return
    p = param.float()
    if decay_after:
        p.add_(direction, alpha=-step_size).add_(p, alpha=-decay)
    else:
        p.mul_(1.0 - decay).add_(direction, alpha=-step_size)
    if round_seed is None:
        param.copy_(p)
        return
    uniform = philox.rand(round_seed, torch.arange(p.numel(), device=p.device)).view(p.shape)
    param.copy_(stochastic_round(p, torch.bfloat16, uniform))
