"""Fused kernels and their pure-torch twins. This package lives inside ``lowmem`` on purpose:
bitsandbytes and transformers both import a top-level ``kernels`` package.

Each Triton kernel sits next to a torch twin with the same signature; ``dispatch`` runs the kernel on CUDA tensors
when Triton imports and the twin otherwise (``LOWMEM_KERNELS=triton|torch|auto`` or ``dispatch.set_backend``).
Triton modules (``*_triton``) are imported only when a kernel runs.

* ``blockwise_8bit``: blockwise 8-bit quantize / dequantize and the fused 8-bit AdamW update (optionally with bf16
  stochastic rounding), used by the optimizers' 8-bit states on CUDA.
* ``linear_ce``: ``linear_cross_entropy(hidden, weight, labels)``, the loss and its gradients a block of vocabulary
  rows at a time, never the logits.
* ``zo_noise``: seeded Gaussian perturbations and zeroth-order updates, the noise drawn inside the kernel from
  (seed, element), used by MeZO on CUDA.
* ``philox``: Triton's Philox random numbers in torch, so twins draw the kernels' noise.
* ``adam_8bit``: the 8-bit Adam moment update compiled by ``torch.compile`` for the CPU.
* ``codes_8bit``: the blockwise 8-bit format in pure torch (dynamic maps, nearest code, quantize / dequantize).
* ``common``: torch arithmetic the twins share with ``lowmem.optim`` (``adam_moments_``, ``stochastic_round``).

The layers point one way: ``lowmem.optim`` imports ``lowmem.kernels``, never the reverse (``tests/test_layers.py``).
"""

from .linear_ce import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
