"""Pure-torch arithmetic shared by the kernels' twins and ``lowmem.optim`` (the torch side of ``_triton_common``).

* ``adam_moments_``: Adam's moment update in place and its direction: the eager 8-bit AdamW twin
  (``blockwise_8bit``) and the composed optimizer's AdamW rule (``lowmem.optim.rules``) both run it;
* ``stochastic_round``: fp32 to bf16 / fp16, rounded up or down at random so the result is unbiased: the
  twins of the kernels that round (``blockwise_8bit``, ``zo_noise``), MeZO's torch-noise update and the composed
  optimizer's ``bf16_stochastic_round`` (``lowmem.optim.fused``).
"""

from __future__ import annotations

import torch


def adam_moments_(m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float, eps: float,
                  bias_div: float = 1.0) -> torch.Tensor:
    """Adam's moments ``m``, ``v`` (fp32) updated in place from ``grad``; returns the direction
    ``m / (sqrt(v) / bias_div + eps)`` in one new buffer (``bias_div`` 1: the hf core, no division)."""
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = v.sqrt()
    if bias_div != 1.0:
        denom.div_(bias_div)
    denom.add_(eps)
    return torch.div(m, denom, out=denom)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, uniform: torch.Tensor) -> torch.Tensor:
    """``x`` (fp32) in ``dtype``, rounded up or down at random with the probabilities that make it unbiased:
    ``E[result] = x``. A value exact in ``dtype`` stays exactly itself. ``uniform``: U[0, 1) shaped like ``x``."""
    if dtype == torch.float32:
        return x.clone()
    if dtype == torch.bfloat16:  # bf16 is fp32's top 16 bits: add 16 random low bits, then cut them off
        bits = x.view(torch.int32) + (uniform * 65536).to(torch.int32)
        return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)
    nearest = x.to(dtype)
    err = x - nearest.float()
    toward = torch.where(err > 0, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(nearest, toward)
    gap = other.float() - nearest.float()
    take_other = uniform < torch.where(gap != 0, err / gap, 0.0)
    return torch.where(take_other, other, nearest)
