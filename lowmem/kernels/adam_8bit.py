"""Fused Adam moment update on blockwise 8-bit states, compiled by ``torch.compile`` for CPU.

Dequantize both moments, update them with the gradient, compute the Adam direction, and requantize them: the
eager path (``BlockwiseQuantStore.load`` -> ``rules.AdamW`` -> ``save``) is the twin this must match, and it
remains what runs where this cannot (tensors whose size is not a multiple of the block size, a machine without
a C++ compiler, or ``LOWMEM_COMPILE=0``; on a GPU ``blockwise_8bit``'s Triton kernel runs instead). Two
compiled kernels, because inductor's vectorized C++ emulates a gather lane by lane (about 4x slower than its
scalar loop): the dequantizing gathers compile as scalar code, the Adam math, block maxima and the quantizer
as vectorized code.

The compiled code may round the moment update differently in the last bit (fused multiply-add), so a
code can differ from the twin's where a value sits on a midpoint between two codes: tests allow one
quantization step on a few elements. Compilation happens once per process and gradient dtype
(sizes are dynamic; betas, eps and the bias correction are passed as tensors, so no recompiles).

Memory: the same transient fp32 buffers as the eager path (the two moments and the direction).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch.distributed.tensor import DTensor

from .codes_8bit import block_codes, cached_map, lookup_table

BLOCKSIZE = 256
# Indices are in range by construction (uint8 codes into 256 entries; cells clamped to the table), so
# the per-lane bounds checks go; scalar C++ for the dequantizing gathers (gcc compiles them far better).
_VECTOR_CODE = {"assert_indirect_indexing": False}
_SCALAR_CODE = {**_VECTOR_CODE, "cpp.simdlen": 1}
_kernels: dict[str, object] = {}
_disabled_reason: str | None = None if os.environ.get("LOWMEM_COMPILE", "1") != "0" else "LOWMEM_COMPILE=0"


def dequantize_moments(m_codes, m_absmax, v_codes, v_absmax, signed_map, unsigned_map):
    """fp32 first and second moments (flat) from their codes and block maxima."""
    m = signed_map[m_codes.to(torch.int32)].view(-1, BLOCKSIZE) * m_absmax[:, None]
    v = unsigned_map[v_codes.to(torch.int32)].view(-1, BLOCKSIZE) * v_absmax[:, None]
    return m.view(-1), v.view(-1)


def update_and_requantize(m, v, grad, coefficients, signed_table, unsigned_table, offset: int):
    """Adam moments and direction ``m / (sqrt(v) / bias_div + eps)``, the moments requantized.

    ``coefficients`` = (beta1, 1 - beta1, beta2, 1 - beta2, eps, bias_div) in one fp32 tensor (one input to
    guard, not six); ``1 - beta`` comes computed in double, as the eager twin's ``alpha`` (1 - fp32(0.999)
    is 1.3e-5 off). Returns (direction, m codes, m absmax, v codes, v absmax), all flat.
    """
    beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_div = coefficients.unbind()
    g = grad.float()
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + g * g * one_minus_beta2
    direction = m / (v.sqrt() / bias_div + eps)
    m_blocks, v_blocks = m.view(-1, BLOCKSIZE), v.view(-1, BLOCKSIZE)
    m_absmax, v_absmax = m_blocks.abs().amax(dim=1), v_blocks.amax(dim=1)  # v >= 0
    m_codes = block_codes(m_blocks, m_absmax, signed_table, offset)
    v_codes = block_codes(v_blocks, v_absmax, unsigned_table, offset)
    return direction, m_codes.view(-1), m_absmax, v_codes.view(-1), v_absmax


def fused_applicable(state: dict, grad: torch.Tensor) -> bool:
    """Whether the compiled kernels can update this parameter's 8-bit Adam state."""
    return (_disabled_reason is None and grad.device.type == "cpu" and not isinstance(grad, DTensor)
            and grad.numel() % BLOCKSIZE == 0
            and "exp_avg_absmax" in state and "exp_avg_sq_absmax" in state)


def _compiled(name: str):
    if name not in _kernels:
        if name == "dequantize":
            _kernels[name] = torch.compile(dequantize_moments, options=_SCALAR_CODE)
        else:
            _kernels[name] = torch.compile(update_and_requantize, options=_VECTOR_CODE)
    return _kernels[name]


def _dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.mark_dynamic(t, 0)


def adam_step_8bit(state: dict, grad: torch.Tensor, beta1: float, beta2: float, eps: float,
                   bias_div: float) -> torch.Tensor | None:
    """Update ``state``'s 8-bit ``exp_avg``/``exp_avg_sq`` in place and return the direction (grad's
    shape, fp32); None when compilation is unavailable (the caller then runs the eager twin)."""
    global _disabled_reason
    shape = grad.shape
    m_codes, v_codes = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
    m_absmax, v_absmax, g = state["exp_avg_absmax"], state["exp_avg_sq_absmax"], grad.reshape(-1)
    signed_table, offset = lookup_table(cached_map(True))
    unsigned_table, _ = lookup_table(cached_map(False))
    _dynamic(m_codes, v_codes, m_absmax, v_absmax, g)
    coefficients = torch.tensor([beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bias_div], dtype=torch.float32)
    try:
        m, v = _compiled("dequantize")(m_codes, m_absmax, v_codes, v_absmax, cached_map(True), cached_map(False))
        _dynamic(m, v)
        out = _compiled("update")(m, v, g, coefficients, signed_table, unsigned_table, offset)
    except Exception as err:  # no C++ compiler, an unsupported platform: keep training on the eager twin
        _disabled_reason = f"{type(err).__name__}: {err}"
        warnings.warn(f"lowmem: compiled 8-bit Adam unavailable, using the eager path ({_disabled_reason[:200]})",
                      RuntimeWarning, stacklevel=2)
        return None
    direction, state["exp_avg"], state["exp_avg_absmax"], state["exp_avg_sq"], state["exp_avg_sq_absmax"] = (
        out[0].view(shape), out[1].view(shape), out[2], out[3].view(shape), out[4])
    return direction


def set_enabled(enabled: bool) -> None:
    """Turn the compiled path on or off for this process (tests compare it with the eager twin)."""
    global _disabled_reason
    _disabled_reason = None if enabled else "disabled by set_enabled(False)"
