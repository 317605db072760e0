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

Extra memory: one block of fp32 logits (``BLOCK_BYTES``) and the fp32 hidden gradient, instead of several
``tokens x vocab`` tensors. The cost: the logits' product twice (once in forward, once in backward). This is the
pure-torch twin (CPU and any device); a Triton kernel with the same signature will be dispatched on CUDA.
"""

from __future__ import annotations

import torch

#: The most bytes of fp32 logits one block holds (the block's rows = this / (4 x tokens), at least 128).
BLOCK_BYTES = 32 << 20
REDUCTIONS = ("mean", "sum", "none")


def _blocks(vocab: int, tokens: int):
    rows = max(128, BLOCK_BYTES // (4 * max(tokens, 1)))
    return [(start, min(start + rows, vocab)) for start in range(0, vocab, rows)]


def _logits(x: torch.Tensor, weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``start:end`` of the logits for every token, in fp32 (the product in the inputs' dtype, as F.linear)."""
    return (x @ weight[start:end].t()).float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, reduction: str):
        x = hidden.reshape(-1, hidden.shape[-1])
        y = labels.reshape(-1)
        tokens, vocab = x.shape[0], weight.shape[0]
        valid = y != ignore_index
        lse = torch.full((tokens,), -torch.inf, dtype=torch.float32, device=x.device)
        target = torch.zeros(tokens, dtype=torch.float32, device=x.device)
        for start, end in _blocks(vocab, tokens):
            logits = _logits(x, weight, start, end)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside = valid & (y >= start) & (y < end)
            rows = inside.nonzero().squeeze(1)
            target[rows] = logits[rows, y[rows] - start]
        losses = torch.where(valid, lse - target, 0.0)
        count = valid.sum()
        ctx.save_for_backward(x, weight, y, lse, count)
        ctx.ignore_index, ctx.reduction, ctx.hidden_shape = ignore_index, reduction, hidden.shape
        if reduction == "none":
            return losses.view(labels.shape).to(hidden.dtype)
        total = losses.sum()
        return (total / count if reduction == "mean" else total).to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, y, lse, count = ctx.saved_tensors
        valid = y != ctx.ignore_index
        if ctx.reduction == "none":
            share = grad_output.reshape(-1).float()
        else:
            share = grad_output.float().expand(y.shape[0])
            if ctx.reduction == "mean":
                share = share / count
        share = torch.where(valid, share, 0.0)
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        x32 = x.float()
        for start, end in _blocks(weight.shape[0], x.shape[0]):
            g = _logits(x, weight, start, end).sub_(lse[:, None]).exp_()  # softmax over the whole vocabulary
            inside = (valid & (y >= start) & (y < end)).nonzero().squeeze(1)
            g[inside, y[inside] - start] -= 1.0
            g.mul_(share[:, None])
            if grad_w is not None:
                grad_w[start:end] = g.t() @ x32
            if grad_x is not None:
                grad_x += g @ weight[start:end].float()
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype).view(ctx.hidden_shape)
        return grad_x, grad_w, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=..., reduction=...)`` without materializing
    the logits (see the module docstring). ``hidden``: ``(..., H)``; ``weight``: ``(V, H)``; ``labels``: ``(...)``,
    already aligned with ``hidden`` (shift them first for a causal LM). A mean over no valid label is NaN, as in
    torch."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; use one of {REDUCTIONS}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden {tuple(hidden.shape)} without its last "
                         "dimension (shift the labels of a causal LM first)")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight {tuple(weight.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction)
