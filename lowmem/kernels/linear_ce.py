"""Linear + cross-entropy without the logits: ``F.cross_entropy(F.linear(hidden, weight), labels)``, its value and
its gradients for ``hidden`` and ``weight``, computed a block of vocabulary rows at a time.

The unfused loss keeps ``tokens x vocab`` logits, their fp32 copy and the log-softmax for backward (at 4096 tokens
and Llama-3's 128256 words: 1 GiB of bf16 logits and 4 GiB of fp32 beside them). Here:

* forward: for each block of ``weight``'s rows, the block's logits (``tokens x block``, fp32) update a running
  log-sum-exp per token, and the label's logit is picked where it falls in the block; only the log-sum-exp
  (4 bytes per token) is saved for backward;
* backward: the block's logits are computed again, ``softmax - onehot`` scaled by each token's share of the loss
  gives the block's rows of the weight gradient (one product, rounded once to the weight's dtype) and adds to the
  hidden gradient (fp32, ``tokens x hidden``).

Extra memory: one block of fp32 logits and the block's fp32 weight rows (at most ``BLOCK_BYTES`` each) and the fp32
hidden gradient, instead of several ``tokens x vocab`` tensors. The cost: the logits' product twice (once in forward,
once in backward).

The products are torch matmuls (cuBLAS on a GPU) in both implementations; what happens to a block of logits
between them (``forward_block``, ``backward_block``) is torch code here, the twin, and Triton kernels in
``linear_ce_triton`` where ``dispatch.use_triton`` says so (CUDA tensors, or the interpreter in the tests).
Under autocast the inputs are cast to its dtype first, so the backward recomputes the logits the forward saw.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from . import dispatch

#: The weight attribute through which a layer-wise optimizer takes the weight gradient's rows instead of the whole
#: gradient (``lowmem.optim.streamed_rows.RowsConsumer``: ``ready()``, then called with ``rows(first, last)``).
STREAM_ATTR = "_lowmem_stream_rows"
#: The most bytes of fp32 logits, and of fp32 weight rows, one block holds (at least 128 rows).
BLOCK_BYTES = 32 << 20
REDUCTIONS = ("mean", "sum", "none")


def block_rows(tokens: int, hidden: int) -> int:
    """Vocabulary rows per block for ``tokens`` tokens of ``hidden`` features: at most ``BLOCK_BYTES`` of fp32
    logits (``tokens x rows``) and of the rows' fp32 copy for the hidden gradient (``rows x hidden``); at least 128."""
    return max(128, BLOCK_BYTES // (4 * max(tokens, hidden, 1)))


def _blocks(vocab: int, tokens: int, hidden: int):
    rows = block_rows(tokens, hidden)
    return [(start, min(start + rows, vocab)) for start in range(0, vocab, rows)]


def _logits(x: torch.Tensor, weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``start:end`` of the logits for every token, in fp32 (the product in the inputs' dtype, as F.linear)."""
    return (x @ weight[start:end].t()).float()


def _in_block(y: torch.Tensor, ignore_index: int, start: int, end: int) -> torch.Tensor:
    """The tokens whose (not ignored) label is one of the block's words."""
    return ((y != ignore_index) & (y >= start) & (y < end)).nonzero().squeeze(1)


def forward_block(logits: torch.Tensor, start: int, y: torch.Tensor, ignore_index: int, lse: torch.Tensor,
                  target: torch.Tensor) -> None:
    """Merge one block's fp32 logits (``tokens x width``, words ``start...``) into the running log-sum-exp ``lse``
    and write the label's logit into ``target`` for the tokens whose label is in the block (both in place)."""
    torch.logaddexp(lse, torch.logsumexp(logits, dim=-1), out=lse)
    rows = _in_block(y, ignore_index, start, start + logits.shape[1])
    target[rows] = logits[rows, y[rows] - start]


def backward_block(logits: torch.Tensor, start: int, y: torch.Tensor, ignore_index: int, lse: torch.Tensor,
                   share: torch.Tensor) -> torch.Tensor:
    """One block's fp32 logits turned, in place, into the loss's gradient for them: ``(softmax - onehot) * share``
    per token (``share`` is 0 for ignored tokens)."""
    g = logits.sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary
    rows = _in_block(y, ignore_index, start, start + logits.shape[1])
    g[rows, y[rows] - start] -= 1.0
    return g.mul_(share[:, None])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, reduction: str, ops, loss_dtype):
        x = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1).contiguous()
        tokens, vocab = x.shape[0], weight.shape[0]
        lse = torch.full((tokens,), -torch.inf, dtype=torch.float32, device=x.device)
        target = torch.zeros(tokens, dtype=torch.float32, device=x.device)
        for start, end in _blocks(vocab, tokens, x.shape[1]):
            ops.forward_block(_logits(x, weight, start, end), start, y, ignore_index, lse, target)
        valid = y != ignore_index
        losses = torch.where(valid, lse - target, 0.0)
        count = valid.sum()
        ctx.save_for_backward(x, weight, y, lse, count)
        ctx.ignore_index, ctx.reduction, ctx.hidden_shape, ctx.ops = ignore_index, reduction, hidden.shape, ops
        if reduction == "none":
            return losses.view(labels.shape).to(loss_dtype)
        total = losses.sum()
        return (total / count if reduction == "mean" else total).to(loss_dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, y, lse, count = ctx.saved_tensors
        share = _shares(grad_output, y != ctx.ignore_index, count, ctx.reduction)
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[0] else None
        consumer = getattr(weight, STREAM_ATTR, None) if ctx.needs_input_grad[1] else None
        streams = consumer is not None and consumer.ready()  # the rows go to a layer-wise update, never whole
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] and not streams else None
        # only the weight's gradient reads it (a frozen head: none)
        x32 = x.float() if grad_w is not None or streams else None
        with _without_autocast(x.device.type):  # the forward's products again, not autocast's
            for start, end in _blocks(weight.shape[0], x.shape[0], x.shape[1]):
                g = ctx.ops.backward_block(_logits(x, weight, start, end), start, y, ctx.ignore_index, lse, share)
                if grad_w is not None and grad_w.dtype == torch.float32:  # straight into the gradient's rows
                    torch.mm(g.t(), x32, out=grad_w[start:end])
                elif grad_w is not None:
                    grad_w[start:end] = g.t() @ x32
                if grad_x is not None:
                    grad_x.addmm_(g, weight[start:end].float())
                del g  # before the next block's logits exist: one block at a time
        if streams:
            def rows(first: int, last: int) -> torch.Tensor:
                with _without_autocast(x.device.type):
                    logits = _logits(x, weight, first, last)
                    return ctx.ops.backward_block(logits, first, y, ctx.ignore_index, lse, share).t() @ x32
            consumer(rows)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype).view(ctx.hidden_shape)
        return grad_x, grad_w, None, None, None, None, None


def _shares(grad_output: torch.Tensor, valid: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    """Each token's fp32 weight in the loss's gradient: the incoming gradient, divided by the valid tokens for a
    mean, and 0 for ignored tokens."""
    if reduction == "none":
        share = grad_output.reshape(-1).float()
    else:
        share = grad_output.float().expand(valid.shape[0])
        if reduction == "mean":
            share = share / count
    return torch.where(valid, share, 0.0)


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast computes products in on ``device`` (None when it is off, or the device has none)."""
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # e.g. meta: no autocast at all
        return None
    return torch.get_autocast_dtype(device) if enabled else None


def _without_autocast(device: str):
    """Autocast off for ``device`` if it is on."""
    return torch.autocast(device, enabled=False) if _autocast_dtype(device) else contextlib.nullcontext()


def _block_ops(hidden: torch.Tensor, weight: torch.Tensor):
    """The module with ``forward_block`` / ``backward_block``: the Triton kernels' (imported only then) or these."""
    if dispatch.use_triton(hidden, weight):
        from . import linear_ce_triton

        return linear_ce_triton
    return sys.modules[__name__]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", loss_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=..., reduction=...)`` without materializing
    the logits (see the module docstring). ``hidden``: ``(..., H)``; ``weight``: ``(V, H)``; ``labels``: ``(...)``,
    already aligned with ``hidden`` (shift them first for a causal LM). The loss comes in ``loss_dtype`` (default:
    the product's dtype; transformers' causal-LM loss is fp32). A mean over no valid label is NaN, as in torch."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; use one of {REDUCTIONS}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} without its last "
                         "dimension (shift the labels of a causal LM first)")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight {tuple(weight.shape)}")
    device = hidden.device.type
    dtype = _autocast_dtype(device)
    if dtype is not None:  # as F.linear under autocast: the product in autocast's dtype
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    ops = _block_ops(hidden, weight)
    with _without_autocast(device):
        return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, ops,
                                         loss_dtype or hidden.dtype)
