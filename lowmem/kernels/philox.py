"""Triton's counter-based random numbers (``tl.randint4x``, ``tl.rand``, ``tl.randn``) reproduced in torch.

A kernel that draws its noise inside the kernel from ``(seed, offset)`` needs a torch twin that draws the same
numbers, so the twin and the kernel can be compared and either can regenerate the other's noise. Triton uses
Philox-4x32 with 10 rounds: the counter is ``(offset low 32 bits, offset high 32 bits, 0, 0)``, the key
``(seed low 32 bits, seed high 32 bits)``. ``rand`` maps the first output word to [0, 1); ``randn`` is Box-Muller on
the first two words, keeping the cosine branch. The integer words are bit-identical to Triton's; the floats go
through ``log``, ``sqrt`` and ``cos``, whose last bit may differ between libraries.

uint32 arithmetic runs on int64 tensors: a 32 x 32-bit product is assembled from two 32 x 16-bit products, each
under 2**48, so nothing overflows.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10
#: ``tl.rand``'s scale: the largest value with ``(2**31 - 1) * scale < 1`` in fp32.
UNIFORM_SCALE = 4.6566127342e-10
TWO_PI = 6.283185307179586


def _mul32(c: torch.Tensor, const: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of ``c * const`` for ``c`` in [0, 2**32) (int64) and a 32-bit constant."""
    upper = c * (const >> 16)  # c * const = upper * 2**16 + lower
    lower = c * (const & 0xFFFF)
    high = (upper + (lower >> 16)) >> 16
    low = (((upper & 0xFFFF) << 16) + lower) & _M32
    return high, low


def randint4x(seed: int, offsets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tl.randint4x(seed, offsets)``: four words per offset, as int64 tensors holding uint32 values."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed {seed} must be in [0, 2**64)")
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(ROUNDS):
        high_b, low_b = _mul32(c2, _ROUND_B)
        high_a, low_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = high_b ^ c1 ^ k0, low_b, high_a ^ c3 ^ k1, low_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def to_uniform(word: torch.Tensor) -> torch.Tensor:
    """A uint32 word (in int64) to fp32 in [0, 1), as ``tl.rand``: the word as int32, negatives complemented."""
    signed = torch.where(word >= 1 << 31, word - (1 << 32), word)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def rand(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.rand(seed, offsets)``: fp32 uniform in [0, 1)."""
    return to_uniform(randint4x(seed, offsets)[0])


def randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """``tl.randn(seed, offsets)``: fp32 standard normal (Box-Muller, cosine branch)."""
    c0, c1, _, _ = randint4x(seed, offsets)
    u1 = to_uniform(c0).clamp_(min=1e-7)
    theta = to_uniform(c1) * TWO_PI
    return (-2.0 * u1.log_()).sqrt_() * theta.cos_()
