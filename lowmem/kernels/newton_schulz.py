"""Muon's orthogonalization: the quintic Newton-Schulz iteration that maps a matrix ``G = U S V^T`` to about
``U V^T`` (singular values pushed into roughly [0.7, 1.2]) with matrix products only.

Each step is ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, on ``X = G / ||G||_F`` in bf16, taken on the wide
orientation (rows <= columns, so ``A`` is the smaller Gram matrix). The coefficients (3.4445, -4.775, 2.0315) and 5
steps are Keller Jordan's and ``torch.optim.Muon``'s; this reproduces that iteration product for product (the parity
test compares the two bit for bit), so on a GPU it runs as three bf16 matmuls per step (cuBLAS: no kernel of ours
would beat them).

Memory: the bf16 copy of the input, ``A`` and ``b A + c A^2`` (each ``min(m, n)^2``), and the step's result.
"""

from __future__ import annotations

import torch

#: (a, b, c) of the quintic step, and the steps: torch.optim.Muon's defaults.
COEFFICIENTS = (3.4445, -4.7750, 2.0315)
STEPS = 5
#: The Frobenius norm's floor in the normalization.
EPS = 1e-7


def orthogonalize(g: torch.Tensor, coefficients=COEFFICIENTS, steps: int = STEPS, eps: float = EPS) -> torch.Tensor:
    """The Newton-Schulz orthogonalization of matrix ``g``, in bf16 (shaped like ``g``)."""
    if g.dim() != 2:
        raise ValueError(f"Muon orthogonalizes matrices; got a tensor of shape {tuple(g.shape)}")
    if not 0 <= steps < 100:
        raise ValueError(f"ns_steps={steps}: give 0 to 99 Newton-Schulz steps (5 is Muon's)")
    a, b, c = coefficients
    tall = g.shape[0] > g.shape[1]
    x = g.to(torch.bfloat16, copy=True)  # a copy even of bf16 input: the caller's tensor (a momentum) stays as it is
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x.T if tall else x
