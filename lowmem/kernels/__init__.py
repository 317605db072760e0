"""Fused kernels and their pure-torch twins. This package lives inside ``lowmem`` on purpose:
bitsandbytes and transformers both import a top-level ``kernels`` package.

* ``adam_8bit``: the Adam moment update on blockwise 8-bit states as two ``torch.compile`` kernels on CPU
  (the eager ``BlockwiseQuantStore`` path is its twin and the fallback). The Triton kernels (one-pass fused
  8-bit update, linear + cross-entropy without logits, seeded ZO perturbation) arrive with their own issue.
"""
