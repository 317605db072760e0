"""Where ``LowMemOptimizer`` hands a whole update to a fused kernel, and bf16 stochastic rounding.

* ``fused_adamw_8bit``: an unprojected tensor under AdamW with blockwise 8-bit moments and the plain lift is
  updated by one Triton kernel (``kernels.blockwise_8bit.adamw_8bit_update_``) when the kernels run (CUDA with
  Triton, or forced); elsewhere the composed path runs. The arithmetic is the same for fp32 weights; a bf16 / fp16
  weight's update is computed in fp32 and rounded once by the kernel, where the composed path rounds the direction,
  the step and the decay each to the weight's dtype.
* ``round_seed`` / ``stochastic_round_into``: the group key ``bf16_stochastic_round`` rounds a bf16 parameter's
  update stochastically instead of to nearest (unbiased: a step far below half a bf16 ulp still moves the weight on
  average), in the kernel and in the composed path alike. The rounding bits are keyed by (parameter, step), so a
  resumed run rounds as the uninterrupted one on the same kind of device (the kernel draws Philox bits, the composed
  path torch's generator).
"""

from __future__ import annotations

import torch

from ..kernels import blockwise_8bit
from ..kernels.common import stochastic_round
from ..kernels.dispatch import use_triton
from .lifts import Lift
from .projectors import Projector
from .quantized import BlockwiseQuantStore
from .rules import AdamW

_MASK62 = (1 << 62) - 1


def round_seed(ordinal: int, step: int, chunk: int = 0) -> int:
    """The key of the rounding bits of parameter ``ordinal`` (its place in the param groups) at ``step``."""
    return (ordinal * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + chunk * 0x94D049BB133111EB) & _MASK62


def wants_rounding(group: dict, p: torch.Tensor) -> bool:
    """Whether ``p``'s updates are stochastically rounded (``bf16_stochastic_round`` on a bf16 parameter)."""
    return bool(group.get("bf16_stochastic_round")) and p.dtype == torch.bfloat16


#: Elements rounded at once (the rounding's temporaries, about 16 bytes per element, stay this size).
ROUND_CHUNK = 1 << 20


def stochastic_round_into(p: torch.Tensor, updated: torch.Tensor, seed: int) -> None:
    """Store fp32 ``updated`` into bf16 ``p``, rounded at random with the bits of generator seed ``seed`` (drawn in
    order, ``ROUND_CHUNK`` elements at a time)."""
    gen = torch.Generator(device=p.device).manual_seed(seed)
    if not p.is_contiguous():  # no flat view to write through: round it whole
        uniform = torch.rand(updated.shape, generator=gen, device=p.device, dtype=torch.float32)
        p.copy_(stochastic_round(updated, p.dtype, uniform))
        return
    target, source = p.view(-1), updated.reshape(-1)
    for start in range(0, source.numel(), ROUND_CHUNK):
        part = source[start:start + ROUND_CHUNK]
        uniform = torch.rand(part.shape, generator=gen, device=p.device, dtype=torch.float32)
        target[start:start + ROUND_CHUNK] = stochastic_round(part, p.dtype, uniform)


def fused_adamw_8bit(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, parts, ordinal: int) -> bool:
    """Update ``p`` with the fused 8-bit AdamW kernel if it applies here; whether it did."""
    rule, store = parts.rule, parts.store
    if not (type(rule) is AdamW and type(parts.projector) is Projector and type(parts.lift) is Lift
            and parts.lift.scale == 1.0 and isinstance(store, BlockwiseQuantStore)
            and store.blocksize == blockwise_8bit.QBLOCK and p.is_contiguous() and grad.is_contiguous()
            and use_triton(p, grad)):
        return False
    rule.init_state(state, store, grad)
    if "exp_avg_absmax" not in state or "exp_avg_sq_absmax" not in state:
        return False  # under min_8bit_size (fp32 moments), or an embedding's unquantized v: the composed path
    state["step"] = t = state.get("step", 0) + 1
    lr, wd = group["lr"], group["weight_decay"]
    seed = round_seed(ordinal, t) if wants_rounding(group, p) else None
    blockwise_8bit.adamw_8bit_update_(p, grad, state, beta1=rule.beta1, beta2=rule.beta2, eps=rule.eps,
                                      step_size=lr * rule._step_factor(t), decay=lr * wd,
                                      decay_after=rule.decay == "after", bias_div=rule._bias_div(t), round_seed=seed)
    return True
