"""The output head's and the input embedding's layer-wise updates, streamed a range of rows at a time inside their
own backward, so their whole gradients never exist.

In layer-wise mode each weight's gradient exists whole until its hook has applied it. The vocabulary-sized ones are
the largest of a step (LLaMA-1.1B: 32000 x 2048 in bf16, 131 MB each): the head's lands at the step's peak beside
the loss's logits, the embedding's at the end of backward (dense, though only the rows of the batch's tokens are not
zero). ``LayerwiseUpdates.stream_rows(model)`` gives both modules a forward whose backward produces the weight
gradient a range of ``CHUNK`` elements (whole rows around it) at a time and hands each range to the tensor's ordinary
chunked update (``LowMemOptimizer.update_param_in_chunks``):

* the head's range is a product of the logits' gradient and the hidden states over those rows; the embedding's is
  zero but for the rows of the batch's tokens, summed by torch's own embedding backward over the range;
* two passes over the ranges, as the hooks test the whole gradient before any update: the first adds each range's
  squared norm to the step's norm and finds its largest magnitude (a NaN or inf anywhere skips the update, counted as
  usual), the second updates. The head's product runs twice (for the 1.1B head about 67 GFLOP, a few tenths of a
  second on two CPU cores);
* a gradient accumulated in ``.grad`` by earlier micro-batches is added range by range, then dropped;
* on a model patched for the loss without logits (``linear_cross_entropy``), whose loss bypasses the head's forward,
  the head's weight carries a ``RowsConsumer`` instead, and that loss's backward hands it the rows (recomputing the
  logits of a range's rows from the weight: a row two ranges share is computed once, before either updates it);
* it streams where the update is the chunked one anyway (no projection, an elementwise rule: the AdamW of every
  low-rank name's dense group, 8-bit AdamW, ...), in the step's last micro-batch, in one process, for an untied head
  and a plain embedding (no ``max_norm``, ``scale_grad_by_freq`` or sparse gradient). Otherwise the gradient is the
  whole one, as before.

Each range sums over the same tokens as the whole gradient, so the update equals the whole-gradient one up to the
rounding of those sums (``tests/test_streamed_rows.py`` compares them).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.codes_8bit import CHUNK
from .compose import updates_in_chunks
from .int8_weights import int8_linear_of
from .layerwise import squared_norm
from .sharded import is_sharded


def can_stream(updates, module: nn.Module | None, tied_to: torch.Tensor | None = None) -> bool:
    """Whether ``module`` (an output head or input embedding) can update its weight streamed (see the module doc)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            return False
    elif isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return False
    else:
        return False
    p = module.weight
    if p not in updates._group_index or not p.requires_grad or p is tied_to or is_sharded(p) \
            or int8_linear_of(p) is not None or not p.is_contiguous() or p.dim() != 2:
        return False
    parts = updates.optimizer.parts_for_step(updates._group_index[p], choose_blocks=False)
    return updates_in_chunks(parts, p.shape)


def stream(updates, module: nn.Module) -> None:
    """Replace ``module``'s forward (on this instance) by the streamed one; ``del module.forward`` undoes it."""
    if isinstance(module, nn.Linear):
        def forward(self, x):
            return _StreamedHead.apply(x, self.weight, updates)
    else:
        def forward(self, ids):
            return _StreamedEmbedding.apply(ids, self.weight, updates, self.padding_idx)
    module.forward = types.MethodType(forward, module)


class _StreamedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, updates):
        ctx.save_for_backward(x, weight)
        ctx.updates = updates
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        if not ctx.needs_input_grad[1]:
            return grad_x, None, None
        rows_out, rows_in = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if not _streams_now(ctx.updates):
            return grad_x, (rows_out.t() @ rows_in).to(weight.dtype), None

        def rows(first: int, last: int) -> torch.Tensor:
            return rows_out[:, first:last].t() @ rows_in

        with torch.no_grad():
            _update(ctx.updates, weight, rows)
        return grad_x, None, None


class _StreamedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, updates, padding_idx):
        ctx.save_for_backward(ids, weight)
        ctx.updates, ctx.padding_idx = updates, -1 if padding_idx is None else padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        ids, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        if not _streams_now(ctx.updates):
            grad = torch.ops.aten.embedding_dense_backward(grad_out, ids, weight.shape[0], ctx.padding_idx, False)
            return None, grad, None, None
        flat_ids, rows_out = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])

        def rows(first: int, last: int) -> torch.Tensor:
            inside = (flat_ids >= first) & (flat_ids < last)
            padding = ctx.padding_idx - first if first <= ctx.padding_idx < last else -1
            return torch.ops.aten.embedding_dense_backward(rows_out[inside], flat_ids[inside] - first, last - first,
                                                           padding, False)

        with torch.no_grad():
            _update(ctx.updates, weight, rows)
        return None, None, None, None


class RowsConsumer:
    """Set on a head's weight (``linear_ce.STREAM_ATTR``) for the loss without logits: its backward hands the weight
    gradient's rows to ``__call__`` instead of forming the whole gradient, when ``ready()``."""

    def __init__(self, updates, p: torch.Tensor):
        self.updates, self.p = updates, p

    def ready(self) -> bool:
        return _streams_now(self.updates)

    def __call__(self, rows) -> None:
        with torch.no_grad():
            _update(self.updates, self.p, rows)


def _streams_now(updates) -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    return updates.sync and updates.ddp is None and not distributed


def _update(updates, p: torch.Tensor, rows) -> None:
    """``p``'s update from its gradient, given by ``rows(first, last)`` (that range of rows), plus any accumulated
    ``p.grad``, a range of flat elements at a time: first the norm and finiteness, then the update."""
    width = p.shape[1]
    accumulated = p.grad.view(-1) if p.grad is not None else None
    straddling: dict[int, torch.Tensor] = {}  # a row the previous range ended inside: its gradient, computed once

    def grad_range(start: int, end: int) -> torch.Tensor:
        first, last = start // width, -(-end // width)
        known = straddling.pop(first, None)
        # a row that straddles two ranges is taken from the first one's computation: by the second, the update may
        # have changed its first part, and the loss without logits recomputes the gradient from the weight
        skip = known is not None
        block = rows(first + skip, last).to(p.dtype) if last > first + skip else None
        if skip:
            block = known[None] if block is None else torch.cat([known[None], block])
        if end % width:
            straddling[last - 1] = block[-1]
        block = block.view(-1)[start - first * width:end - first * width]
        return block + accumulated[start:end] if accumulated is not None else block

    index = updates._group_index[p]
    squared, peak = [], []
    for start in range(0, p.numel(), CHUNK):
        part = grad_range(start, min(start + CHUNK, p.numel()))
        squared.append(squared_norm(part))
        peak.append(torch.linalg.vector_norm(part, ord=float("inf")).float())
    straddling.clear()
    if updates._finite(p, index, torch.stack(peak)):
        updates._add_squared_norm(torch.stack(squared).sum())
        optimizer = updates.optimizer
        optimizer.update_param_in_chunks(p, optimizer.param_groups[index], optimizer.parts_for_step(index), grad_range)
    p.grad = None
