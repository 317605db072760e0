"""Triton kernels and their pure-torch twins (fused 8-bit update, linear + cross-entropy, seeded ZO
perturbation). Empty for now: the kernels arrive with their own issue. This package lives inside
``lowmem`` on purpose: bitsandbytes and transformers both import a top-level ``kernels`` package.
"""
