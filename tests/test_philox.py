"""``lowmem.kernels.philox`` draws Triton's random numbers: a kernel's ``tl.randint4x`` / ``tl.rand`` /
``tl.randn`` against the torch twin (Triton's CPU interpreter; see conftest)."""

import pytest
import torch

from lowmem.kernels import philox

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _draw(words_ptr, uniform_ptr, normal_ptr, seed, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c0, c1, c2, c3 = tl.randint4x(seed, offs)
    for i, word in enumerate((c0, c1, c2, c3)):
        tl.store(words_ptr + offs * 4 + i, word.to(tl.uint32).to(tl.int64), mask=mask)
    tl.store(uniform_ptr + offs, tl.rand(seed, offs), mask=mask)
    tl.store(normal_ptr + offs, tl.randn(seed, offs), mask=mask)


@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, 2**63 - 25])
def test_twin_draws_the_kernels_numbers(seed):
    n = 5000
    words, uniform, normal = torch.zeros(n, 4, dtype=torch.int64), torch.zeros(n), torch.zeros(n)
    _draw[(triton.cdiv(n, 4096),)](words, uniform, normal, seed, n, BLOCK=4096)
    offsets = torch.arange(n)
    assert torch.equal(torch.stack(philox.randint4x(seed, offsets), 1), words)  # bit-identical words
    assert torch.equal(philox.rand(seed, offsets), uniform)
    torch.testing.assert_close(philox.randn(seed, offsets), normal, rtol=0, atol=1e-6)  # log / cos / sqrt ulps
    assert abs(normal.mean().item()) < 0.05 and abs(normal.std().item() - 1) < 0.05


def test_offsets_past_32_bits_use_the_high_word():
    low, high = philox.randint4x(7, torch.tensor([5, 5 + 2**32]))[0].tolist()
    assert low != high
    with pytest.raises(ValueError, match="seed"):
        philox.randint4x(-1, torch.arange(3))
