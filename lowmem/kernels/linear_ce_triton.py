"""Triton kernels for ``linear_cross_entropy``: the work on one vocabulary block of fp32 logits between the two
products (which stay torch matmuls, cuBLAS on a GPU). Imported only when a kernel is about to run, so lowmem
imports without Triton; ``linear_ce`` holds the torch twin of each function here and the loop around them.

* ``forward_block``: a program takes ``ROWS`` tokens and walks their logits ``BLOCK`` columns at a time with an
  online max / sum of exponentials in fp32, merges the block's log-sum-exp into the running one in place, and
  picks the label's logit where the (not ignored) label falls in the block;
* ``backward_block``: the same tiling, writing ``(exp(logit - lse) - onehot) * share`` over the logits in place.

A block's width need not be a multiple of ``BLOCK`` (the last tile is masked), and neither need the tokens be of
``ROWS``. A program's tile is ``TILE`` elements: ``BLOCK`` = the block's width rounded up to a power of two (at
most ``MAX_BLOCK``), ``ROWS`` = what is left of the tile. The kernels use only ``tl.exp`` / ``tl.log`` (no
libdevice) and upcast what they load to fp32, so Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements of logits one program holds at once (ROWS x BLOCK).
TILE = 4096
#: The widest tile of columns (a block wider than this is walked in several tiles).
MAX_BLOCK = 4096


@triton.jit
def _rows(logits_ptr, stride, tokens, ROWS: tl.constexpr):
    """The program's token rows, which of them exist, and a pointer to each row's first logit."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    return rows, rows < tokens, logits_ptr + rows.to(tl.int64)[:, None] * stride


@triton.jit
def _labels_in_block(labels_ptr, rows, row_ok, ignore_index, start, width):
    """Each row's label, and whether it is a (not ignored) word of the block ``start...start + width``."""
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    return labels, row_ok & (labels != ignore_index) & (labels >= start) & (labels < start + width)


@triton.jit
def _merge_lse_kernel(logits_ptr, stride, tokens, width, start, labels_ptr, ignore_index, lse_ptr, target_ptr,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, row_ok, base = _rows(logits_ptr, stride, tokens, ROWS)
    cols = tl.arange(0, BLOCK)
    high = tl.full((ROWS,), float("-inf"), tl.float32)  # running max of the block's row
    total = tl.zeros((ROWS,), tl.float32)  # running sum of exp(logit - safe high)
    for first in range(0, width, BLOCK):
        c = first + cols
        mask = row_ok[:, None] & (c < width)[None, :]
        x = tl.load(base + c[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        new_high = tl.maximum(high, tl.max(x, axis=1))
        safe = tl.where(new_high == float("-inf"), 0.0, new_high)  # a row of -inf so far: no NaN from inf - inf
        total = total * tl.exp(high - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
        high = new_high
    # total >= 1 (the row's max contributes exp(0)) unless the row is all -inf, whose log-sum-exp is -inf
    block_lse = tl.where(total > 0, high + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    before = tl.load(lse_ptr + rows, mask=row_ok, other=float("-inf"))
    top = tl.maximum(before, block_lse)
    finite = top > float("-inf")
    top = tl.where(finite, top, 0.0)
    both = tl.where(finite, tl.exp(before - top) + tl.exp(block_lse - top), 1.0)  # >= 1 where finite
    merged = tl.where(finite, top + tl.log(both), float("-inf"))
    tl.store(lse_ptr + rows, merged, mask=row_ok)
    labels, inside = _labels_in_block(labels_ptr, rows, row_ok, ignore_index, start, width)
    column = tl.where(inside, labels - start, 0)
    picked = tl.load(logits_ptr + rows.to(tl.int64) * stride + column, mask=inside, other=0.0).to(tl.float32)
    tl.store(target_ptr + rows, picked, mask=inside)


@triton.jit
def _softmax_grad_kernel(logits_ptr, stride, tokens, width, start, labels_ptr, ignore_index, lse_ptr, share_ptr,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, row_ok, base = _rows(logits_ptr, stride, tokens, ROWS)
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    share = tl.load(share_ptr + rows, mask=row_ok, other=0.0)
    labels, inside = _labels_in_block(labels_ptr, rows, row_ok, ignore_index, start, width)
    column = tl.where(inside, labels - start, -1)  # -1: no column of this block is the label
    for first in range(0, width, BLOCK):
        c = first + cols
        mask = row_ok[:, None] & (c < width)[None, :]
        x = tl.load(base + c[None, :], mask=mask, other=0.0).to(tl.float32)
        onehot = tl.where(c[None, :] == column[:, None], 1.0, 0.0)
        grad = (tl.exp(x - lse[:, None]) - onehot) * share[:, None]
        tl.store(base + c[None, :], grad, mask=mask)


def _tiling(tokens: int, width: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, programs) for ``tokens`` rows of ``width`` logits."""
    block = min(triton.next_power_of_2(max(width, 1)), MAX_BLOCK)
    rows = max(1, min(TILE // block, triton.next_power_of_2(max(tokens, 1))))
    return rows, block, triton.cdiv(tokens, rows)


def _check(logits: torch.Tensor, *rows: torch.Tensor) -> None:
    if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"the kernels take a tokens x width fp32 block of logits with unit column stride, got "
                         f"{logits.dtype} {tuple(logits.shape)} strides {logits.stride()}")
    if any(not t.is_contiguous() or t.shape != logits.shape[:1] for t in rows):
        raise ValueError("labels, log-sum-exp, targets and shares must be contiguous, one value per token")


def forward_block(logits: torch.Tensor, start: int, y: torch.Tensor, ignore_index: int, lse: torch.Tensor,
                  target: torch.Tensor) -> None:
    """Merge one block's fp32 logits (``tokens x width``, words ``start...``) into the running log-sum-exp ``lse``
    and write the label's logit into ``target`` for the tokens whose label is in the block (both in place)."""
    _check(logits, y, lse, target)
    tokens, width = logits.shape
    if tokens == 0 or width == 0:
        return
    rows, block, programs = _tiling(tokens, width)
    _merge_lse_kernel[(programs,)](logits, logits.stride(0), tokens, width, start, y, ignore_index, lse, target,
                                   ROWS=rows, BLOCK=block, num_warps=8 if rows * block >= 4096 else 4)


def backward_block(logits: torch.Tensor, start: int, y: torch.Tensor, ignore_index: int, lse: torch.Tensor,
                   share: torch.Tensor) -> torch.Tensor:
    """One block's fp32 logits turned, in place, into the loss's gradient for them: ``(softmax - onehot) * share``
    per token (``share`` is 0 for ignored tokens)."""
    _check(logits, y, lse, share)
    tokens, width = logits.shape
    if tokens and width:
        rows, block, programs = _tiling(tokens, width)
        _softmax_grad_kernel[(programs,)](logits, logits.stride(0), tokens, width, start, y, ignore_index, lse,
                                          share, ROWS=rows, BLOCK=block, num_warps=8 if rows * block >= 4096 else 4)
    return logits
