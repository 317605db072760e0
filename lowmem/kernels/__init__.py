"""Fused kernels and their pure-torch twins. This package lives inside ``lowmem`` on purpose:
bitsandbytes and transformers both import a top-level ``kernels`` package.

* ``adam_8bit``: the Adam moment update on blockwise 8-bit states as two ``torch.compile`` kernels on CPU
  (the eager ``BlockwiseQuantStore`` path is its twin and the fallback).
* ``linear_ce``: ``linear_cross_entropy(hidden, weight, labels)``, the loss and its gradients a block of vocabulary
  rows at a time, never the logits (the pure-torch twin; its Triton kernel, the fused 8-bit update and the seeded
  ZO perturbation arrive with their own issue).
"""
