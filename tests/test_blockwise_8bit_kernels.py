"""The blockwise 8-bit Triton kernels against their torch twins (Triton's CPU interpreter; see conftest), and the
fused 8-bit AdamW update inside the optimizer against the composed path."""

import pytest
import torch
from torch import nn

from lowmem.kernels import blockwise_8bit, codes_8bit, dispatch
from lowmem.optim import create_optimizer

pytest.importorskip("triton")

SIZES = (1, 255, 257, 4097, 70001)


def _values(n: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4  # wide dynamic range within blocks
    if n > 600:
        x[256:512] = 0.0  # a zero block
        x[512:768] = -x[512:768].abs()  # a block led by a negative value
    return x.to(dtype)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_and_dequantize_equal_the_twin(signed, dtype):
    code = codes_8bit.cached_map(signed)
    for n in SIZES:
        x = _values(n, dtype, seed=n)
        x = x if signed else x.abs()
        with dispatch.backend("triton"):
            codes, absmax = blockwise_8bit.quantize_blockwise(x, code)
            values = blockwise_8bit.dequantize_blockwise(codes, absmax, code)
        want_codes, want_absmax = codes_8bit.quantize_blockwise(x, code)
        assert codes.shape == x.shape and absmax.shape == want_absmax.shape
        assert torch.equal(codes, want_codes), n
        assert torch.equal(absmax, want_absmax), n
        assert torch.equal(values, codes_8bit.dequantize_blockwise(want_codes, want_absmax, code)), n


def _state(n: int, seed: int) -> dict:
    """8-bit AdamW moments after a few random updates (nonzero codes in every block)."""
    m, v = _values(n, seed=seed) * 1e-2, _values(n, seed=seed + 1).square() * 1e-4
    state = {}
    for key, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        state[key], state[key + "_absmax"] = codes_8bit.quantize_blockwise(value, codes_8bit.cached_map(signed))
    return state


def _clone(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def _assert_codes_close(got: dict, want: dict) -> None:
    """Equal codes, except where fp32 arithmetic's last bit puts a value on the other side of a midpoint: there
    the neighbouring code, on a handful of elements."""
    for key in ("exp_avg", "exp_avg_sq"):
        diff = (got[key].int() - want[key].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3, key
        torch.testing.assert_close(got[key + "_absmax"], want[key + "_absmax"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("decay_after", [True, False])
@pytest.mark.parametrize("n", [300, 4097])
def test_fused_adamw_update_equals_the_twin(decay_after, n):
    param, state = _values(n, seed=7), _state(n, seed=3)
    results = []
    for backend in ("triton", "torch"):
        p, s = param.clone(), _clone(state)
        with dispatch.backend(backend):
            for step in range(1, 4):
                grad = _values(n, seed=100 + step) * 1e-2
                blockwise_8bit.adamw_8bit_update_(p, grad, s, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3 * step,
                                                  decay=1e-4, decay_after=decay_after, bias_div=1.0)
        results.append((p, s))
    (p_kernel, s_kernel), (p_twin, s_twin) = results
    assert not torch.equal(p_kernel, param)
    torch.testing.assert_close(p_kernel, p_twin, rtol=1e-6, atol=1e-7)
    _assert_codes_close(s_kernel, s_twin)


def test_direction_mode_writes_the_direction_and_leaves_no_parameter():
    n = 1000
    grad, state = _values(n, seed=5) * 1e-2, _state(n, seed=9)
    outs = []
    for backend in ("triton", "torch"):
        s, out = _clone(state), torch.empty(n)
        with dispatch.backend(backend):
            blockwise_8bit.adamw_8bit_update_(None, grad, s, beta1=0.9, beta2=0.99, eps=1e-6, bias_div=0.3, out=out)
        outs.append((out, s))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-7)
    _assert_codes_close(outs[0][1], outs[1][1])
    m = codes_8bit.dequantize_blockwise(state["exp_avg"], state["exp_avg_absmax"], codes_8bit.cached_map(True))
    v = codes_8bit.dequantize_blockwise(state["exp_avg_sq"], state["exp_avg_sq_absmax"], codes_8bit.cached_map(False))
    m, v = 0.9 * m + 0.1 * grad, 0.99 * v + 0.01 * grad**2
    torch.testing.assert_close(outs[1][0], m / (v.sqrt() / 0.3 + 1e-6), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        blockwise_8bit.adamw_8bit_update_(None, grad, state, beta1=0.9, beta2=0.99, eps=1e-6)


def test_bf16_stochastic_rounding_matches_the_twin_and_is_unbiased():
    n = 8192
    # weights at 1.0 and a step of 1e-4: 40x below half a bf16 ulp (2**-8), lost by round-to-nearest
    grad = torch.full((n,), 1e-3)
    results = {}
    for backend in ("triton", "torch"):
        for seed in (11, None):
            p, s = torch.ones(n, dtype=torch.bfloat16), _state(n, seed=1)
            for key in ("exp_avg", "exp_avg_sq"):  # zero moments: the first direction is 1 (m / sqrt(v))
                s[key + "_absmax"].zero_()
            with dispatch.backend(backend):
                blockwise_8bit.adamw_8bit_update_(p, grad, s, beta1=0.0, beta2=0.0, eps=0.0, step_size=1e-4,
                                                  round_seed=seed)
            results[backend, seed] = p
    assert torch.equal(results["torch", None], torch.ones(n, dtype=torch.bfloat16))  # nearest: nothing moves
    assert torch.equal(results["triton", 11], results["torch", 11])
    moved = results["torch", 11].float()
    assert set(moved.unique().tolist()) == {1.0, 1.0 - 2**-8}
    assert abs(moved.mean().item() - (1.0 - 1e-4)) < 2e-5  # 1 - 1e-4 on average (binomial sd 0.4e-5)
    with pytest.raises(ValueError, match="bf16"):
        blockwise_8bit.adamw_8bit_update_(torch.ones(4), grad[:4], s, beta1=0.9, beta2=0.9, eps=0.0, round_seed=1)


def _model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(97, 64), nn.Linear(64, 96), nn.Tanh(), nn.Linear(96, 97)).to(dtype)


def _train(name: str, backend: str, steps: int = 3, dtype=torch.float32, **options) -> nn.Module:
    model = _model(dtype)
    opt = create_optimizer(name, model, **{"lr": 1e-2, "weight_decay": 0.1, **options})
    gen = torch.Generator().manual_seed(1)
    with dispatch.backend(backend):
        for _ in range(steps):
            ids = torch.randint(0, 97, (8, 5), generator=gen)
            loss = nn.functional.cross_entropy(model(ids).flatten(0, 1).float(), ids.roll(1, 1).flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("name", ["adamw_8bit", "galore_adamw_8bit"])
def test_optimizer_with_kernels_equals_the_composed_path(name, monkeypatch):
    calls = []
    launch = blockwise_8bit.adamw_8bit_update_
    monkeypatch.setattr(blockwise_8bit, "adamw_8bit_update_",
                        lambda param, *a, **k: calls.append(param is None) or launch(param, *a, **k))
    options = {"min_8bit_size": 1024}
    if name.startswith("galore"):
        # no projector refresh after step 1: an SVD of gradients 1e-8 apart may pick singular vectors of
        # another sign, which is not the kernel's doing
        options.update(rank=8, update_proj_gap=10, target_modules="all-linear", min_8bit_size=256)
    kernel_model, kernel_opt = _train(name, "triton", **options)
    eager_model, eager_opt = _train(name, "torch", **options)
    for (key, got), want in zip(kernel_model.state_dict().items(), eager_model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
    quantized_states = [s for s in kernel_opt.state.values() if "exp_avg_absmax" in s]
    # every 8-bit tensor, every step, through the kernel: the whole update (adamw), the direction (galore)
    assert calls and len(calls) == 3 * len(quantized_states)
    assert all(calls) == name.startswith("galore") and any(calls) == name.startswith("galore")


def test_fused_update_of_bf16_weights_is_the_composed_update_rounded_once():
    """The kernel computes a bf16 weight's update in fp32 and rounds once; the composed path rounds the direction,
    the step and the decay separately: after one step they are one bf16 ulp of the weight apart (here also because
    the interpreter's store truncates where a GPU rounds to nearest), plus the composed path's rounding of the
    direction to bf16 (half an ulp of a unit-size direction, times lr 1e-2). Later steps see different gradients."""
    kernel_model, _ = _train("adamw_8bit", "triton", steps=1, dtype=torch.bfloat16, min_8bit_size=1024)
    eager_model, _ = _train("adamw_8bit", "torch", steps=1, dtype=torch.bfloat16, min_8bit_size=1024)
    for (key, got), want in zip(kernel_model.state_dict().items(), eager_model.state_dict().values(), strict=True):
        got, want = got.float(), want.float()
        ulp = 2.0 ** (torch.floor(torch.log2(torch.maximum(got.abs(), want.abs()).clamp(min=1e-30))) - 7)
        assert ((got - want).abs() <= ulp + 1e-2 * 2**-8).all(), key


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_stochastic_round_option_keeps_steps_below_half_an_ulp(backend):
    """Steps of about 1e-5 on bf16 weights of magnitude >= 2**-6 (half an ulp: 6e-5): round-to-nearest drops every
    one of them, stochastic rounding moves a share of the weights."""
    def moved(**options):
        before = _model(torch.bfloat16).state_dict()
        model, _ = _train("adamw_8bit", backend, steps=1, dtype=torch.bfloat16, min_8bit_size=1024, lr=1e-5,
                          weight_decay=0.0, **options)
        weight, was = model.state_dict()["3.weight"], before["3.weight"]
        large = was.abs() >= 2**-6
        return (weight != was)[large].float().mean().item()

    if not (backend == "triton" and dispatch.interpreting()):  # the interpreter's fp32 -> bf16 store truncates
        assert moved() == 0.0
    assert 0.02 < moved(bf16_stochastic_round=True) < 0.5


@pytest.mark.parametrize("name", ["galore+came+8bit", "none+came+8bit"])
def test_other_8bit_rules_run_their_states_through_the_kernels(name):
    """CAME keeps its first moment in 8 bits: on the kernels' path its store (de)quantizes with them."""
    options = {"min_8bit_size": 256}
    if name.startswith("galore"):
        options.update(rank=8, update_proj_gap=10, target_modules="all-linear")
    kernel_model, kernel_opt = _train(name, "triton", **options)
    eager_model, _ = _train(name, "torch", **options)
    for (key, got), want in zip(kernel_model.state_dict().items(), eager_model.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)
    assert any(k.endswith("_absmax") for s in kernel_opt.state.values() for k in s)
