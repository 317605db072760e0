"""Blockwise 8-bit state storage, checked against bitsandbytes 0.50.2 on CPU.

bnb has two CPU quantizers: the native ``libbitsandbytes_cpu`` kernel (what ``F.quantize_blockwise``
and bnb's 8-bit optimizers call) and the pure-torch ``default`` backend (nearest code by
``bucketize`` on the midpoints, ties to the lower code). We match the pure-torch backend exactly.
The native kernel's code search is coarser (see ``test_quantize_vs_bnb_native_cpu``); there we check
that absmax agrees and that every code that differs is bnb's, not ours, being farther from the value.
Codes handed to bnb are cloned, so nothing bnb does can touch our cached maps.
"""

import bitsandbytes.functional as F
import pytest
import torch

from lowmem.kernels.codes_8bit import cached_map, dequantize_blockwise, dynamic_map, quantize_blockwise
from lowmem.optim.quantized import BlockwiseQuantStore
from lowmem.optim.states import state_bytes


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cases():
    """(name, tensor, signed): odd sizes, an all-zero block, tiny values, a non-negative tensor."""
    g = _gen(0)
    with_zero_block = torch.randn(40 * 256, generator=g)
    with_zero_block[256:512] = 0
    return [
        ("gauss_tail_block", torch.randn(64, 3 * 256 + 17, generator=g), True),
        ("zero_block", with_zero_block, True),
        ("tiny_values", torch.randn(5000, generator=g) * 1e-5, True),
        ("nonneg_unsigned", torch.rand(4000, 7, generator=g) ** 4, False),
    ]


CASES = _cases()
IDS = [c[0] for c in CASES]


def _bnb_torch_quantize(x, code):
    """bnb's pure-torch ``default`` kernel, skipping the native CPU kernel that normally wins dispatch."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, 256)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bnb(signed):
    ours, theirs = dynamic_map(signed), F.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs)
    assert torch.all(ours[1:] > ours[:-1]) and ours[-1] == 1.0
    assert int((ours < 0).sum()) == (127 if signed else 0) and int((ours == 0).sum()) == 1
    assert cached_map(signed) is cached_map(signed, torch.device("cpu"))
    assert torch.equal(cached_map(signed), ours)


@pytest.mark.parametrize("name,x,signed", CASES, ids=IDS)
def test_quantize_matches_bnb_torch_backend(name, x, signed):
    code = cached_map(signed)
    codes, absmax = quantize_blockwise(x, code)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-x.numel() // 256),)
    ref_codes, ref_absmax = _bnb_torch_quantize(x, code)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    deq = dequantize_blockwise(codes, absmax, code)
    assert deq.dtype == torch.float32 and deq.shape == x.shape
    assert torch.equal(deq, F.dequantize_blockwise(ref_codes, absmax=ref_absmax, code=code, blocksize=256))


@pytest.mark.parametrize("name,x,signed", CASES, ids=IDS)
def test_quantize_vs_bnb_native_cpu(name, x, signed):
    """bnb's native CPU kernel: same absmax; where codes differ, ours is the nearer one.

    Its code search resolves values only to about 1.5e-5 of the block absmax: near a midpoint it may
    pick the farther neighbour, and values below ~1e-4 of the absmax get coarse codes. An all-zero
    block gets code index 0 (times absmax 0: still 0). Elsewhere the codes agree.
    """
    code = cached_map(signed)
    codes, absmax = quantize_blockwise(x, code)
    ref = F.quantize_blockwise(x, code=code.clone(), blocksize=256)
    ref_codes, ref_absmax = ref[0], ref[1].absmax
    assert torch.equal(absmax, ref_absmax)
    scaled = x.reshape(-1) / absmax.clamp(min=1e-38).repeat_interleave(256)[: x.numel()]
    ours, theirs = codes.reshape(-1).long(), ref_codes.reshape(-1).long()
    assert torch.all((code[ours] - scaled).abs() <= (code[theirs] - scaled).abs() + 1e-7)
    deq = dequantize_blockwise(codes, absmax, code).reshape(-1)
    ref_deq = F.dequantize_blockwise(ref_codes, ref[1]).reshape(-1)
    off = ours != theirs
    assert torch.equal(deq[~off], ref_deq[~off])
    in_zero_block = (absmax == 0).repeat_interleave(256)[: x.numel()]
    assert torch.all(deq[in_zero_block] == 0) and torch.all(ref_deq[in_zero_block] == 0)
    # Away from the tiny values, disagreements are one code apart and within 2e-5 of the midpoint.
    large = off & (scaled.abs() >= 1e-2)
    assert torch.all((ours - theirs)[large].abs() == 1)
    midpoint = (code[ours] + code[theirs]) / 2
    assert torch.all((scaled - midpoint)[large].abs() <= 2e-5)
    assert large.sum() <= 0.01 * (scaled.abs() >= 1e-2).sum()


def test_ties_go_to_the_lower_code():
    code = cached_map(True)
    midpoints = (code[:-1] + code[1:]) / 2
    x = torch.cat([torch.ones(1), midpoints])  # absmax 1: the midpoints are scaled exactly
    codes, absmax = quantize_blockwise(x, code)
    assert absmax.tolist() == [1.0]
    assert codes[1:].tolist() == list(range(255))
    assert torch.equal(codes, _bnb_torch_quantize(x, code)[0])


@pytest.mark.parametrize("name,x,signed", CASES, ids=IDS)
def test_error_within_half_largest_gap(name, x, signed):
    code = cached_map(signed)
    codes, absmax = quantize_blockwise(x, code)
    deq = dequantize_blockwise(codes, absmax, code)
    per_element_absmax = absmax.repeat_interleave(256)[: x.numel()].view(x.shape)
    half_gap = (code[1:] - code[:-1]).max() / 2
    assert torch.all((deq - x).abs() <= half_gap * per_element_absmax * (1 + 1e-5))
    if name == "zero_block":
        assert (absmax == 0).tolist() == [i == 1 for i in range(40)]
        assert torch.all(code[codes[256:512].long()] == 0) and torch.all(deq[256:512] == 0)


@pytest.mark.parametrize("signed", [True, False])
def test_store_round_trip(signed, tmp_path):
    store = BlockwiseQuantStore()
    like = torch.empty(40, 256)
    state = {}
    store.init(state, "m", like, signed=signed)
    assert state["m"].dtype == torch.uint8 and state["m"].shape == like.shape
    assert state["m_absmax"].dtype == torch.float32 and state["m_absmax"].shape == (40,)
    assert torch.all(cached_map(signed)[state["m"].long()] == 0)
    assert state_bytes(state) == 10240 + 4 * 40
    assert torch.equal(store.load(state, "m"), torch.zeros(40, 256))

    x = torch.randn(40, 256, generator=_gen(1))
    x = x if signed else x.square()
    work = store.load(state, "m")
    work.copy_(x)
    store.save(state, "m", work, signed=signed)
    codes, absmax = quantize_blockwise(x, cached_map(signed))
    expected = dequantize_blockwise(codes, absmax, cached_map(signed))
    assert torch.equal(state["m"], codes) and torch.equal(state["m_absmax"], absmax)
    assert torch.equal(store.load(state, "m"), expected)

    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert torch.equal(store.load(loaded, "m"), expected)
    assert state_bytes(loaded) == 10240 + 4 * 40

    store.zero(state, "m")
    fresh = {}
    store.init(fresh, "m", like, signed=signed)
    assert torch.equal(state["m"], fresh["m"]) and torch.equal(state["m_absmax"], fresh["m_absmax"])
    assert torch.equal(store.load(state, "m"), torch.zeros(40, 256))


def test_store_two_moments_bytes_per_param():
    store, state, like = BlockwiseQuantStore(), {}, torch.empty(1000, 77)
    store.init(state, "exp_avg", like, signed=True)
    store.init(state, "exp_avg_sq", like, signed=False)
    assert state_bytes(state) == 2 * (77000 + 4 * 301)
    assert state_bytes(state) / like.numel() <= 2.04


def test_small_tensors_stay_fp32_and_exact():
    store, state = BlockwiseQuantStore(), {}
    like = torch.empty(63, 65)  # 4095 elements: one below min_8bit_size
    store.init(state, "m", like, signed=True)
    assert state["m"].dtype == torch.float32 and "m_absmax" not in state
    work = store.load(state, "m")
    assert work is state["m"] and torch.equal(work, torch.zeros(63, 65))
    x = torch.randn(63, 65, generator=_gen(2))
    work.copy_(x)
    store.save(state, "m", work, signed=True)
    other = x * 3
    store.save(state, "m", other, signed=True)
    assert torch.equal(store.load(state, "m"), other)
    store.zero(state, "m")
    assert torch.equal(state["m"], torch.zeros(63, 65))


@pytest.mark.parametrize("signed", [True, False])
def test_requantize_is_idempotent(signed):
    """save(load()) reproduces codes and absmax for non-negative data and positive-led signed blocks."""
    store, state = BlockwiseQuantStore(), {}
    x = torch.randn(64 * 256 + 100, generator=_gen(3))
    if signed:  # make each block's largest-magnitude value positive
        for start in range(0, x.numel(), 256):
            x[start] = x[start : start + 256].abs().max() * 1.5
    else:
        x = x.square()
    store.init(state, "m", x, signed=signed)
    store.save(state, "m", x.clone(), signed=signed)
    first = state["m"].clone(), state["m_absmax"].clone()
    for _ in range(2):
        store.save(state, "m", store.load(state, "m"), signed=signed)
        assert torch.equal(state["m"], first[0]) and torch.equal(state["m_absmax"], first[1])


def test_negative_led_block_shrinks_like_bnb():
    """The signed map lacks -1.0: a block led by a negative value loses ~0.7% per requantization (bnb too)."""
    code = cached_map(True)
    x = torch.randn(512, generator=_gen(4))
    x[0] = -10.0  # leads block 0
    x[256] = 10.0  # leads block 1
    codes, absmax = quantize_blockwise(x, code)
    again = quantize_blockwise(dequantize_blockwise(codes, absmax, code), code)[1]
    assert again[0] == (code[0] * absmax[0]).abs() < absmax[0] and again[1] == absmax[1]
    ref = F.quantize_blockwise(x, code=code.clone(), blocksize=256)
    ref_again = F.quantize_blockwise(F.dequantize_blockwise(ref[0], ref[1]), code=code.clone(), blocksize=256)
    assert torch.equal(ref_again[1].absmax, again)


@pytest.mark.parametrize("signed", [True, False])
def test_table_lookup_equals_bucketize_exactly(signed):
    """nearest_code is a faster search; it must agree with bucketize on the midpoints everywhere."""
    from lowmem.kernels.codes_8bit import nearest_code

    code = dynamic_map(signed)
    bounds = (code[:-1] + code[1:]) / 2
    gen = torch.Generator().manual_seed(3)
    values = [torch.rand(200_000, generator=gen) ** 8, torch.rand(200_000, generator=gen), bounds,
              torch.nextafter(bounds, torch.full_like(bounds, 2.0)), torch.nextafter(bounds, torch.zeros_like(bounds)),
              code, torch.tensor([0.0, -0.0, 1.0, 1e-30, 1e-40])]
    x = torch.cat([v.reshape(-1) for v in values]).clamp(-1, 1)
    if signed:
        x = torch.cat([x, -x])
    else:
        x = x.abs()
    assert torch.equal(nearest_code(x, code).long(), torch.bucketize(x, bounds))


@pytest.mark.parametrize("numel", [5 * 256, 5 * 256 + 77])
def test_chunked_quantization_is_bit_identical(monkeypatch, numel):
    """(De)quantizing CHUNK elements at a time bounds the temporaries and changes nothing."""
    from lowmem.kernels import codes_8bit

    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)) ** 3
    code = codes_8bit.cached_map(True, x.device)
    whole = codes_8bit.quantize_blockwise(x, code)
    monkeypatch.setattr(codes_8bit, "CHUNK", 512)
    chunked = codes_8bit.quantize_blockwise(x, code)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    restored = codes_8bit.dequantize_blockwise(*chunked, code)
    monkeypatch.setattr(codes_8bit, "CHUNK", 1 << 30)
    assert torch.equal(restored, codes_8bit.dequantize_blockwise(*whole, code))
