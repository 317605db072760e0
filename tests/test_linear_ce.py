"""Linear + cross-entropy: its Triton kernels (run by Triton's CPU interpreter, see conftest) and its torch twin give
the loss and gradients of ``F.cross_entropy(F.linear(...))``, over several vocabulary blocks (the last one partial,
and walked in several kernel tiles when ``MAX_BLOCK`` is small), with ignored labels, for every reduction.

Tolerances: in fp32, 1e-5 against the unfused loss. In fp16 / bf16 the products round the logits alike in all
three, but the unfused loss also rounds the logits' gradient to the input dtype before its backward products (the
block implementations keep it in fp32 and round once): against it, ``LOW_PRECISION`` below; the kernels and the
twin differ only in the last fp32 bits before the final rounding, so by at most one ulp of the input dtype.
"""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowmem.kernels import dispatch, linear_ce
from lowmem.kernels.linear_ce import linear_cross_entropy

#: (rtol, atol) against the unfused loss (measured worst case for "mean": 4e-3 / 1.5e-5 fp16, 3.5e-2 / 2.4e-4 bf16
#: on the weight's gradient, the largest of the three).
LOW_PRECISION = {torch.float16: (1e-2, 1e-4), torch.bfloat16: (5e-2, 1e-3)}
#: One ulp of the input dtype, relative: the kernels against the twin.
ULP = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
BACKENDS = ["torch", "triton"]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the Triton kernels' block calls (a kernel test that ran the twin instead would fail)."""
    pytest.importorskip("triton")
    from lowmem.kernels import linear_ce_triton

    calls = {"forward": 0, "backward": 0}
    for name in calls:
        original = getattr(linear_ce_triton, f"{name}_block")

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(linear_ce_triton, f"{name}_block", counted)
    return calls


def on(backend, request):
    """``dispatch.backend(backend)``, with the kernel counter for ``triton`` (skipped without Triton)."""
    calls = request.getfixturevalue("kernel_calls") if backend == "triton" else None
    return dispatch.backend(backend), calls


def inputs(dtype, tokens=(3, 37), hidden=24, vocab=1000):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(*tokens, hidden, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.2).to(dtype).requires_grad_()
    y = torch.randint(vocab, tokens, generator=gen)
    y[0, :5] = -100
    y[2, -1] = vocab - 1  # a label in the last, partial block
    return h, w, y


def seven_blocks(monkeypatch):
    monkeypatch.setattr(linear_ce, "BLOCK_BYTES", 4 * 111 * 150)  # 150 rows: 7 blocks, the last of 100


def ours(dtype, reduction, backend, request, ignore_index=-100):
    h, w, y = inputs(dtype)
    context, calls = on(backend, request)
    with context:
        loss = linear_cross_entropy(h, w, y, ignore_index=ignore_index, reduction=reduction)
        (loss.float() * weights(loss)).sum().backward()
    if calls is not None:
        assert calls == {"forward": 7, "backward": 7}
    return loss, h.grad, w.grad


def unfused(dtype, reduction, ignore_index=-100, **shape):
    h, w, y = inputs(dtype, **shape)
    logits = F.linear(h, w).float()
    loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=ignore_index, reduction=reduction)
    loss = (loss.view(y.shape) if reduction == "none" else loss).to(dtype)
    (loss.float() * weights(loss)).sum().backward()
    return loss, h.grad, w.grad


def weights(loss):
    """The gradient flowing into the loss: random per token for ``none``, 1 otherwise."""
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)) if loss.dim() else 1.0


def assert_all_close(ours_, ref, rtol, atol):
    for a, b, what in zip(ours_, ref, ("loss", "hidden grad", "weight grad"), strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=what)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend,max_block", [("torch", None), ("triton", None), ("triton", 64)])
def test_fp32_value_and_gradients_match_to_1e5(backend, max_block, reduction, monkeypatch, request):
    """``max_block=64``: the kernels walk each 150-wide block in three tiles, the last of 22 columns (by default
    one 256-wide tile, masked)."""
    seven_blocks(monkeypatch)
    if max_block is not None:
        monkeypatch.setattr(pytest.importorskip("lowmem.kernels.linear_ce_triton"), "MAX_BLOCK", max_block)
    got = ours(torch.float32, reduction, backend, request)
    assert len(linear_ce._blocks(1000, 111, 24)) == 7
    assert_all_close(got, unfused(torch.float32, reduction), rtol=1e-5, atol=1e-5)
    assert got[2][0].abs().sum() > 0 and got[1][0, :5].abs().sum() == 0  # ignored tokens get no gradient


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_its_rounding(backend, dtype, monkeypatch, request):
    seven_blocks(monkeypatch)
    assert_all_close(ours(dtype, "mean", backend, request), unfused(dtype, "mean"), *LOW_PRECISION[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_equal_the_twin_to_one_ulp(dtype, reduction, monkeypatch, request):
    seven_blocks(monkeypatch)
    kernels = ours(dtype, reduction, "triton", request)
    twin = ours(dtype, reduction, "torch", request)
    for a, b in zip(kernels, twin, strict=True):
        assert a.dtype == b.dtype == dtype
    assert_all_close(kernels, twin, rtol=ULP[dtype], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ignore_index_inside_the_vocabulary(backend, monkeypatch, request):
    """Tokens labelled with ``ignore_index`` = 3, a word of the first block, count for nothing."""
    seven_blocks(monkeypatch)
    h, w, y = inputs(torch.float32)
    y = y.clamp(min=0)  # -100 is now a word index like any other: out of range, an error
    assert (y == 3).sum() == 0
    y[1, :4] = 3
    context, calls = on(backend, request)
    with context:
        loss = linear_cross_entropy(h, w, y, ignore_index=3)
    assert calls is None or calls["forward"] == 7
    ref = F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten(), ignore_index=3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    plain = F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten())
    assert (loss - plain).abs() > 1e-3  # the label 3 did change the loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_label_ignored(backend, request):
    h, w, y = inputs(torch.float32)
    y.fill_(-100)
    context, calls = on(backend, request)
    with context:
        total = linear_cross_entropy(h, w, y, reduction="sum")
        total.backward()
        mean = linear_cross_entropy(h, w, y)
    assert calls is None or calls == {"forward": 2, "backward": 1}
    assert total.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    assert mean.isnan()  # as torch's mean over nothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_computes_the_products_in_its_dtype(backend, request):
    """Under autocast, as ``F.linear``: the logits of the bf16 product (forward and backward alike), fp32 gradients
    for fp32 inputs."""
    h, w, y = inputs(torch.float32)
    context, calls = on(backend, request)
    with context, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, y, loss_dtype=torch.float32)
        ref = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), y.flatten())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)  # the same bf16 logits
    grads = torch.autograd.grad(loss, (h, w))
    assert calls is None or calls == {"forward": 1, "backward": 1}
    ref_grads = torch.autograd.grad(ref, (h, w))
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **dict(zip(("rtol", "atol"), LOW_PRECISION[torch.bfloat16], strict=True)))


def test_kernel_blocks_equal_the_twin_directly(request):
    """One block, straight: a running log-sum-exp already set, labels in and out of the block, an ignored one
    inside it, a row of -inf logits, and 45 tokens (not a multiple of the tile's rows)."""
    request.getfixturevalue("kernel_calls")
    from lowmem.kernels import linear_ce_triton

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(45, 300, generator=gen) * 4
    logits[7] = -torch.inf
    y = torch.randint(0, 1000, (45,), generator=gen)
    y[:6] = torch.tensor([200, 200 + 299, 199, 500, 250, 260])
    lse, target = torch.randn(45, generator=gen), torch.full((45,), 5.0)
    lse[:3] = -torch.inf
    results = []
    for module in (linear_ce, linear_ce_triton):
        out_lse, out_target = lse.clone(), target.clone()
        module.forward_block(logits.clone(), 200, y, 260, out_lse, out_target)
        share = torch.rand(45, generator=torch.Generator().manual_seed(4))
        grad = module.backward_block(logits.clone(), 200, y, 260, out_lse, share)
        results.append((out_lse, out_target, grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert results[1][1][5] == 5.0 and results[1][1][0] == logits[0, 0]  # ignored: untouched; inside: picked


def test_lowmem_imports_and_runs_without_triton():
    """Triton is imported only for a kernel: with it missing, the twin runs on CPU tensors."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\nfrom lowmem.kernels.linear_ce import linear_cross_entropy\n"
            "loss = linear_cross_entropy(torch.randn(4, 8), torch.randn(50, 8), torch.tensor([1, 2, -100, 49]))\n"
            "assert loss.isfinite() and 'lowmem.kernels.linear_ce_triton' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_mistakes_are_named():
    h, w, y = inputs(torch.float32)
    with pytest.raises(ValueError, match="shift the labels"):
        linear_cross_entropy(h, w, y[:, 1:])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="hidden size"):
        linear_cross_entropy(h[..., :10], w, y)


def test_a_block_holds_at_most_block_bytes_of_fp32_weight_rows(monkeypatch):
    """Few tokens and a wide hidden size: the blocks are bounded by the weight's fp32 rows (the hidden gradient's
    operand), not only by the logits, so backward never copies the whole head to fp32 (it did: 0.24 GiB at the
    1.1B model's peak)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(linear_ce, "BLOCK_BYTES", 4 * 64 * 150)  # 150 rows of 64 fp32 features
    assert linear_ce.block_rows(24, 64) == 150 and linear_ce.block_rows(300, 64) == 128
    h, w, y = inputs(torch.bfloat16, tokens=(3, 8), hidden=64)

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.dtype == torch.float32:
                    LargestFloat32.largest = max(LargestFloat32.largest, t.numel() * 4)
            return out

    loss = linear_cross_entropy(h, w, y)
    with LargestFloat32():
        loss.backward()
    assert 0 < LargestFloat32.largest <= 4 * 64 * 150 < w.numel() * 4
    assert_all_close((loss, h.grad, w.grad), unfused(torch.bfloat16, "mean", tokens=(3, 8), hidden=64),
                     *LOW_PRECISION[torch.bfloat16])
