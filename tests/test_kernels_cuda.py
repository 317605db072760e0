"""The compiled Triton kernels on a GPU against their torch twins on the CPU (the rest of the suite checks the kernels
in Triton's interpreter). Runs only where CUDA is present and the interpreter is off:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_kernels_cuda.py

Elsewhere (CI, this project's CPU machines) every test here is skipped, and says why.
"""

import os

import pytest
import torch

from lowmem.kernels import blockwise_8bit, codes_8bit, dispatch, linear_cross_entropy, zo_noise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA device and TRITON_INTERPRET=0 (compiled kernels)")


def _values(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_and_dequantize(signed):
    x = _values(70001)
    x = x if signed else x.abs()
    code = codes_8bit.cached_map(signed)
    with dispatch.backend("triton"):
        codes, absmax = blockwise_8bit.quantize_blockwise(x.cuda(), code.cuda())
        values = blockwise_8bit.dequantize_blockwise(codes, absmax, code.cuda())
    want_codes, want_absmax = codes_8bit.quantize_blockwise(x, code)
    assert (codes.cpu() != want_codes).float().mean() < 1e-4  # a value on a midpoint may round either way
    torch.testing.assert_close(absmax.cpu(), want_absmax, rtol=0, atol=0)
    torch.testing.assert_close(values.cpu(), codes_8bit.dequantize_blockwise(codes.cpu(), absmax.cpu(), code))


def test_fused_adamw_update():
    n = 100_003
    param, grad = _values(n, 1), _values(n, 2) * 1e-2
    state = {}
    for key, value, signed in (("exp_avg", _values(n, 3) * 1e-2, True), ("exp_avg_sq", _values(n, 4) ** 2, False)):
        state[key], state[key + "_absmax"] = codes_8bit.quantize_blockwise(value, codes_8bit.cached_map(signed))
    gpu_param, gpu_state = param.cuda(), {k: v.cuda() for k, v in state.items()}
    options = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, decay=1e-4)
    with dispatch.backend("triton"):
        blockwise_8bit.adamw_8bit_update_(gpu_param, grad.cuda(), gpu_state, **options)
    with dispatch.backend("torch"):
        blockwise_8bit.adamw_8bit_update_(param, grad, state, **options)
    close = (gpu_param.cpu() - param).abs() <= 1e-6
    assert close.float().mean() > 0.99  # the rest: blocks where a moment took the neighbouring code
    for key in ("exp_avg", "exp_avg_sq"):
        assert (gpu_state[key].cpu() != state[key]).float().mean() < 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zo_perturbation_and_update(dtype):
    w = _values(4097).to(dtype)
    with dispatch.backend("triton"):
        (gpu,) = zo_noise.perturbed(w.cuda(), 123, 7, (1e-3,))
        updated = zo_noise.update_(w.cuda(), [5, 6], [0.5, -0.25], 1e-3, 0.1, 9, 7)
    with dispatch.backend("torch"):
        (cpu,) = zo_noise.perturbed(w, 123, 7, (1e-3,))
        zo_noise.update_(w, [5, 6], [0.5, -0.25], 1e-3, 0.1, 9, 7)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(gpu.cpu(), cpu, **tol)  # tl.randn's approximate sqrt: a few fp32 ulps of z
    torch.testing.assert_close(updated.cpu(), w, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy(dtype):
    torch.manual_seed(0)
    hidden = torch.randn(333, 64, dtype=dtype, requires_grad=True)
    weight = (torch.randn(5000, 64) * 0.1).to(dtype).requires_grad_()
    labels = torch.randint(5000, (333,))
    labels[::7] = -100
    gpu_hidden, gpu_weight = hidden.detach().cuda().requires_grad_(), weight.detach().cuda().requires_grad_()
    with dispatch.backend("triton"):
        loss = linear_cross_entropy(gpu_hidden, gpu_weight, labels.cuda())
        loss.backward()
    want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden.float(), weight.float()), labels)
    want.backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-3)
    torch.testing.assert_close(loss.float().cpu(), want, **tol)  # tf32 products on the GPU: 1e-4
    torch.testing.assert_close(gpu_hidden.grad.float().cpu(), hidden.grad.float(), **tol)
    torch.testing.assert_close(gpu_weight.grad.float().cpu(), weight.grad.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_weights_dequantize(dtype):
    from lowmem.kernels import int8_weights

    codes, scales = int8_weights.quantize(_values(70007).view(7, 10001))
    with dispatch.backend("triton"):
        kernel = int8_weights.dequantize(codes.cuda(), scales.cuda(), dtype)
    with dispatch.backend("torch"):
        twin = int8_weights.dequantize(codes, scales, dtype)
    assert torch.equal(kernel.cpu(), twin)  # one multiply in fp32 and one rounding to dtype, as the twin


@pytest.mark.parametrize("name", ["adamw", "galore_adamw_8bit_layerwise", "apollo_mini_layerwise"])
def test_offloaded_states_train_the_same_with_less_device_memory(name):
    import lowmem
    from lowmem.example import tiny_llama

    results, peaks = [], []
    for offload in (False, True):
        torch.manual_seed(0)
        model = tiny_llama(hidden=256, layers=2).cuda()
        optimizer = lowmem.create_optimizer(name, model, rank=8, offload_states=offload) if "galore" in name else \
            lowmem.create_optimizer(name, model, offload_states=offload)
        ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        peaks.append(torch.cuda.max_memory_allocated())
        state = optimizer.state_dict()["state"]
        devices = {v.device.type for s in state.values() for v in s.values() if torch.is_tensor(v)}
        assert devices == ({"cpu"} if offload else {"cuda"})
        results.append([p.detach().cpu() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert peaks[1] < peaks[0]
