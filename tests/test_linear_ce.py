"""The linear + cross-entropy twin: the same loss and gradients as ``F.cross_entropy(F.linear(...))``, over several
vocabulary blocks (the last one partial), with ignored labels, for every reduction."""

import pytest
import torch
import torch.nn.functional as F

from lowmem.kernels import linear_ce
from lowmem.kernels.linear_ce import linear_cross_entropy


def inputs(dtype, tokens=(3, 37), hidden=24, vocab=1000):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(*tokens, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.2).to(dtype).requires_grad_()
    y = torch.randint(vocab, tokens, generator=gen)
    y[0, :5] = -100
    y[2, -1] = vocab - 1  # a label in the last, partial block
    return h, w, y


def both(dtype, reduction, monkeypatch):
    monkeypatch.setattr(linear_ce, "BLOCK_BYTES", 4 * 111 * 150)  # 150 rows: 7 blocks, the last of 100
    h, w, y = inputs(dtype)
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ours = linear_cross_entropy(h, w, y, reduction=reduction)
    logits = F.linear(ref_h, ref_w).float()
    ref = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction).to(dtype)
    ref = ref.view(y.shape) if reduction == "none" else ref
    seed = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1)) if reduction == "none" else 1.0
    (ours.float() * seed).sum().backward()
    (ref.float() * seed).sum().backward()
    return (ours, h.grad, w.grad), (ref, ref_h.grad, ref_w.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_value_and_gradients_match_to_1e5(reduction, monkeypatch):
    ours, ref = both(torch.float32, reduction, monkeypatch)
    assert len(linear_ce._blocks(1000, 111)) == 7
    for a, b, what in zip(ours, ref, ("loss", "hidden grad", "weight grad"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=what)
    assert ours[2][0].abs().sum() > 0 and ours[1][0, :5].abs().sum() == 0  # ignored tokens get no gradient


def test_bf16_within_bf16_rounding(monkeypatch):
    """In bf16 the reference rounds the logits to bf16 before its fp32 loss; the twin keeps them in fp32."""
    ours, ref = both(torch.bfloat16, "mean", monkeypatch)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_mistakes_are_named():
    h, w, y = inputs(torch.float32)
    with pytest.raises(ValueError, match="shift the labels"):
        linear_cross_entropy(h, w, y[:, 1:])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="hidden size"):
        linear_cross_entropy(h[..., :10], w, y)
