"""Weights stored as int8 codes with one fp32 scale per block (Q-GaLore / Q-APOLLO style), in pure torch.

The format: a tensor's flat elements in blocks of ``block`` (the last block may be shorter); block ``b`` holds codes
``c`` in [-127, 127] and a scale ``s_b = max|w| / 127`` over the block, and stands for ``w = c * s_b``. Symmetric, so
zero is exact and no zero point is stored: 1 byte per weight plus 4 bytes per block (1.6% at 256).

* ``quantize(w, block)``: codes and scales of a float tensor, rounded to the nearest code (the model's conversion);
* ``dequantize(codes, scales, dtype)``: the float tensor back, in ``dtype`` (forward and backward do this a matrix at
  a time): a Triton kernel on CUDA (``int8_weights_triton``), this module's twin elsewhere;
* ``requantize_(codes, scales, values, generator)``: store fp32 ``values`` back, each rounded **stochastically** to one
  of its two neighbouring codes with the probabilities that make the result unbiased (``E[c s] = value``), so an update
  far below one code step still moves the weight on average. Scales are recomputed from ``values`` first. The
  uniforms come from a seeded ``torch.Generator`` (drawn ``CHUNK`` elements at a time, in order), so a resumed run
  draws the same bits; torch's generator, not a Triton kernel, because it is the same on every device and fast on a
  CPU (Triton's Philox in torch costs about 1.7 us per element here).
* ``update_(codes, scales, apply, generator)``: ``requantize_`` of ``apply(dequantize(...))`` for an elementwise
  ``apply``, a piece at a time, so the float weight never exists whole; the same bits as the whole.
"""

from __future__ import annotations

import torch

from . import dispatch

#: Elements per block of one scale (Q-GaLore's group size; Q-APOLLO uses 128).
BLOCK = 256
#: The largest code: codes are symmetric, -127..127.
QMAX = 127
#: Elements handled at once by the twins and the rounding (their temporaries stay about 16 bytes x this).
CHUNK = 1 << 20


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def _check(codes: torch.Tensor, scales: torch.Tensor, block: int) -> None:
    if codes.dtype != torch.int8 or not codes.is_contiguous():
        raise ValueError(f"int8 weight codes must be a contiguous int8 tensor, got {codes.dtype}")
    if scales.dtype != torch.float32 or scales.numel() != n_blocks(codes.numel(), block):
        raise ValueError(f"int8 weights of {codes.numel()} elements in blocks of {block} need "
                         f"{n_blocks(codes.numel(), block)} fp32 scales, got {scales.numel()} {scales.dtype}")


def _pieces(numel: int, block: int):
    """(start, end) element ranges of at most ``CHUNK`` elements that start on a block boundary."""
    step = max(block, CHUNK - CHUNK % block)
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def _blocks(flat: torch.Tensor, block: int) -> list[torch.Tensor]:
    """``flat`` (a range starting on a block boundary) as ``(blocks, block)`` views: its whole blocks, then the
    shorter last one if any (one row)."""
    full = flat.numel() // block * block
    views = [flat[:full].view(-1, block)] if full else []
    return views + ([flat[full:].view(1, -1)] if full < flat.numel() else [])


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of float tensor ``w``, each element rounded to its nearest code."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(n_blocks(w.numel(), block), dtype=torch.float32, device=w.device)
    _store(codes, scales, w.detach(), None, block)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, block: int = BLOCK) -> torch.Tensor:
    """The float tensor ``codes * scale`` in ``dtype`` (fp32 arithmetic, one rounding to ``dtype``)."""
    _check(codes, scales, block)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    if codes.numel() == 0:
        return out
    if dispatch.use_triton(codes, scales):
        from . import int8_weights_triton

        int8_weights_triton.dequantize(codes, scales, out, block)
        return out
    flat_codes, flat_out = codes.view(-1), out.view(-1)
    for start, end in _pieces(codes.numel(), block):
        first = start // block
        for part, target in zip(_blocks(flat_codes[start:end], block), _blocks(flat_out[start:end], block),
                                strict=True):
            target.copy_(part.float().mul_(scales[first:first + len(part), None]))
            first += len(part)
    return out


def requantize_(codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor, generator: torch.Generator,
                block: int = BLOCK) -> None:
    """Store fp32 ``values`` (shaped like ``codes``) into ``codes`` and ``scales``: new block scales from ``values``,
    each element rounded down or up to a neighbouring code at random, unbiased. In place, ``CHUNK`` at a time."""
    _check(codes, scales, block)
    _store(codes, scales, values, generator, block)


def update_(codes: torch.Tensor, scales: torch.Tensor, apply, generator: torch.Generator,
            block: int = BLOCK) -> None:
    """``requantize_(codes, scales, values, generator)`` where ``values`` is the fp32 weight changed in place by an
    elementwise ``apply(values, start, end)`` (``values``: the flat elements ``[start, end)``), done a piece at a time
    in the pieces ``requantize_`` draws its uniforms in: the same bits, without the fp32 weight ever existing whole
    (4 bytes per weight at the peak of an update inside backward)."""
    _check(codes, scales, block)
    flat_codes = codes.view(-1)
    for start, end in _pieces(codes.numel(), block):
        piece_codes, piece_scales = flat_codes[start:end], scales[start // block:n_blocks(end, block)]
        values = dequantize(piece_codes, piece_scales, torch.float32, block)
        apply(values, start, end)
        _store(piece_codes, piece_scales, values, generator, block)


def _store(codes: torch.Tensor, scales: torch.Tensor, values: torch.Tensor, generator: torch.Generator | None,
           block: int) -> None:
    """``values`` into ``codes`` and ``scales``, ``CHUNK`` elements at a time: each block's scale from its largest
    magnitude, each element rounded to its nearest code (``generator`` None) or, with the uniforms ``generator``
    draws in order, down or up at random (``floor(x + u)``)."""
    flat_codes, flat = codes.view(-1), values.reshape(-1)
    for start, end in _pieces(codes.numel(), block):
        uniform = None if generator is None else torch.rand(end - start, generator=generator, device=codes.device,
                                                            dtype=torch.float32)
        values_blocks, codes_blocks = _blocks(flat[start:end], block), _blocks(flat_codes[start:end], block)
        noises = _blocks(uniform, block) if uniform is not None else [None] * len(values_blocks)
        first = start // block
        for part, noise, out in zip(values_blocks, noises, codes_blocks, strict=True):
            part = part.to(torch.float32, copy=True)  # divided in place below: never the caller's tensor
            scale = part.abs().amax(dim=1, keepdim=True) / QMAX
            scales[first:first + len(scale)] = scale.view(-1)
            first += len(scale)
            scaled = part.div_(scale).nan_to_num_(0.0)  # a zero block: 0 / 0 -> 0
            scaled = scaled.round_() if noise is None else scaled.add_(noise).floor_()
            out.copy_(scaled.clamp_(-QMAX, QMAX))
