"""The seeded ZO kernels (``lowmem.kernels.zo_noise``) in Triton's interpreter against their torch twins: the same
noise for every dtype, size and offset, independent of how a tensor is cut; the same stochastic rounding decisions;
N(0, 1) noise and unbiased rounding; and MeZO with the Philox noise, kernel run against twin run."""

import copy

import pytest
import torch
from torch import nn

from lowmem.kernels import dispatch, philox, zo_noise
from lowmem.optim.perturb import Noise, Perturbation, PhiloxNoise, block_key, row_blocks
from lowmem.optim.zo import MeZO, pair_loss

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 1000, 4097]
OFFSETS = [0, 12345, (1 << 33) + 7]  # the last one uses the counter's high word
SEED = 0xDEADBEEF12345  # above 2**32: the key's high word matters too


def both(fn):
    """``fn()`` with the Triton kernel (interpreted) and with the torch twin."""
    with dispatch.backend("triton"):
        kernel = fn()
    with dispatch.backend("torch"):
        twin = fn()
    return kernel, twin


def weights(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int = 1) -> float:
    """Every element of ``got`` within ``ulps`` units in the last place of ``want`` (in ``want``'s dtype); returns
    the largest difference."""
    magnitude = want.abs()
    spacing = (torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))).float() - magnitude.float())
    diff = (got.float() - want.float()).abs()
    assert bool((diff <= ulps * spacing).all()), f"max diff {diff.max().item()} beyond {ulps} ulp"
    return diff.max().item()


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturbed_kernel_equals_twin(dtype, n, offset):
    w = weights(n, dtype)
    before = w.clone()
    kernel, twin = both(lambda: zo_noise.perturbed(w, SEED, offset, (1e-2, -1e-2)))
    assert torch.equal(w, before)  # a scratch copy: the weights are not written
    for k, t in zip(kernel, twin, strict=True):
        assert k.dtype == dtype and k.shape == w.shape
        if dtype == torch.float32:
            torch.testing.assert_close(k, t, rtol=1e-6, atol=1e-6)
        else:  # fp16: z's last bits may move the rounding; bf16: the interpreter's cast truncates
            assert_within_ulps(k, t)
    assert not torch.equal(kernel[0], kernel[1])


@pytest.mark.parametrize("offset", OFFSETS[:2])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_kernel_equals_twin(dtype, n, offset):
    w = weights(n, dtype)
    seeds, grads = [SEED, (1 << 64) - 3], [0.7, -1.3]  # two samples; a key above 2**63
    kernel, twin = both(lambda: zo_noise.update_(w.clone(), seeds, grads, 0.1, 0.1, 99, offset))
    assert kernel.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(kernel, twin, rtol=1e-6, atol=1e-7)
    else:  # the same decisions, except where z's last bit moves the fp32 value across one
        assert_within_ulps(kernel, twin)
        assert (kernel != twin).float().mean().item() < 0.01
    assert (kernel != w).float().mean().item() > 0.5 or n == 1  # steps of about 0.1: most weights move


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_update_kernel_rounds_exactly_as_stochastic_round(dtype):
    """With no noise term, kernel and twin round the same fp32 values with the same uniforms: bit-identical,
    including zeros, subnormals, negatives and values exact in ``dtype``."""
    special = torch.tensor([0.0, -0.0, 2e-8, -2e-8, 6e-8, -6e-8, 1e-5, -1e-5, 1.0, -1.0, 65504.0, 3.0e-3])
    w = torch.cat([special, weights(5000, torch.float32)]).to(dtype)
    kernel, twin = both(lambda: zo_noise.update_(w.clone(), [SEED], [0.0], 0.3, 1.0, 7, 11))
    assert torch.equal(kernel, twin)
    assert not torch.equal(kernel, w)  # the decay did change the weights
    exact, _ = both(lambda: zo_noise.update_(w.clone(), [SEED], [0.0], 0.0, 0.0, 7, 11))
    assert torch.equal(exact, w)  # values exact in the dtype stay themselves


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_noise_does_not_depend_on_how_the_tensor_is_cut(backend):
    whole = torch.zeros(4097)
    cuts = [(0, 1), (1, 1000), (1000, 4097)]
    with dispatch.backend(backend):
        z = zo_noise.perturbed(whole, SEED, 5, (1.0,))[0]
        pieces = torch.cat([zo_noise.perturbed(whole[a:b], SEED, 5 + a, (1.0,))[0] for a, b in cuts])
        updated = zo_noise.update_(torch.ones(4097), [SEED], [0.5], 0.1, 0.0, 3, 5)
        parts = torch.cat([zo_noise.update_(torch.ones(b - a), [SEED], [0.5], 0.1, 0.0, 3, 5 + a) for a, b in cuts])
    assert torch.equal(z, pieces)
    assert torch.equal(updated, parts)
    assert torch.allclose(z, philox.randn(SEED, torch.arange(5, 4102)), atol=1e-6)  # the contract: tl.randn


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_perturbation_and_update_draw_the_same_noise(backend):
    with dispatch.backend(backend):
        z = zo_noise.perturbed(torch.zeros(3000), SEED, 17, (1.0,))[0]
        stepped = zo_noise.update_(torch.zeros(3000), [SEED], [1.0], 1.0, 0.0, 1, 17)  # 0 - 1 * 1 * z
        moved = zo_noise.perturb_(torch.zeros(3000), SEED, 17, 2.0)
    assert torch.equal(stepped, -z)
    assert torch.equal(moved, 2.0 * z)


def test_perturb_in_place_then_back_restores_fp32_to_rounding():
    w = weights(4097, torch.float32)
    moved = w.clone()
    with dispatch.backend("triton"):
        zo_noise.perturb_(moved, SEED, 0, 1e-2)
        assert not torch.allclose(moved, w, atol=1e-4)
        zo_noise.perturb_(moved, SEED, 0, -1e-2)
    torch.testing.assert_close(moved, w, rtol=0, atol=1e-6)  # each add rounds (to an ulp of |w + s z| < 8)


def test_kernel_noise_is_standard_normal_and_keyed_by_the_seed():
    zeros = torch.zeros(100_000)
    with dispatch.backend("triton"):
        z = zo_noise.perturbed(zeros, SEED, 0, (1.0,))[0]
        other = zo_noise.perturbed(zeros, SEED + 1, 0, (1.0,))[0]
    assert abs(z.mean().item()) < 0.015  # the mean of 1e5 normals: std 0.003
    assert abs(z.std().item() - 1.0) < 0.015
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 0.015


@pytest.mark.parametrize("dtype, neighbours", [(torch.bfloat16, (1.4921875, 1.5)),
                                               (torch.float16, (1.498046875, 1.4990234375))])
def test_kernel_stochastic_rounding_is_unbiased(dtype, neighbours):
    """1.5 decayed to 1.4985, between two neighbours of ``dtype``: each element rounds with its own uniform, the
    mean is the fp32 value (round-to-nearest would be off by 0.0015 in bf16, 0.00045 in fp16)."""
    w = torch.full((100_000,), 1.5, dtype=dtype)
    with dispatch.backend("triton"):
        zo_noise.update_(w, [SEED], [0.0], 1e-3, 1.0, 42, 0)
    target = 1.5 * (1 - 1e-3)
    assert set(w.float().unique().tolist()) == set(neighbours)
    spacing = neighbours[1] - neighbours[0]
    assert abs(w.float().mean().item() - target) < 0.02 * spacing  # std of the mean: 0.0016 spacings


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="float64"):
        zo_noise.perturbed(torch.zeros(4, dtype=torch.float64), 1, 0, (1.0,))
    with pytest.raises(ValueError, match="contiguous"):
        zo_noise.perturb_(torch.zeros(4, 4).t(), 1, 0, 1.0)
    with pytest.raises(ValueError, match="one or two scales"):
        zo_noise.perturbed(torch.zeros(4), 1, 0, (1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="one projected gradient per seed"):
        zo_noise.update_(torch.zeros(4), [1, 2], [0.5], 1.0, 0.0, 3)


# --- MeZO with the Philox noise ---


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 16), nn.LayerNorm(16), nn.Linear(16, 64))


def run_mezo(backend: str, noise: str, steps: int = 3) -> tuple[nn.Module, list[float]]:
    model = tiny_model()
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    with dispatch.backend(backend):
        opt = MeZO(model, lr=1e-2, weight_decay=0.1, zo_eps=1e-2, zo_samples=2, seed=3, noise=noise)
        grads = []
        for _ in range(steps):
            opt.step(lambda: nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()))
            grads.append(opt.last_projected_grad)
    return model, grads


def test_mezo_philox_kernel_run_equals_its_twin_run_and_differs_from_the_torch_noise():
    kernel, kernel_grads = run_mezo("triton", "philox")
    twin, twin_grads = run_mezo("torch", "philox")
    generator, _ = run_mezo("torch", "torch")
    start = tiny_model()
    assert kernel_grads == pytest.approx(twin_grads, rel=1e-4, abs=1e-4)
    for (name, k), t, g, s in zip(kernel.named_parameters(), twin.parameters(), generator.parameters(),
                                  start.parameters(), strict=True):
        torch.testing.assert_close(k, t, rtol=1e-5, atol=1e-6, msg=name)
        assert (k - s).abs().max() > 1e-3, name  # the steps moved the weights...
        assert (k - g).abs().max() > 1e-3, name  # ... along another noise than the generators'


def test_auto_noise_is_philox_where_the_kernels_run():
    model = tiny_model()
    assert type(MeZO(model).zo.noise) is Noise  # CPU, backend auto: the twins would run, keep the generators
    assert type(MeZO(model, noise="philox").zo.noise) is PhiloxNoise
    with dispatch.backend("triton"):
        assert type(MeZO(model).zo.noise) is PhiloxNoise
        assert type(MeZO(model, noise="torch").zo.noise) is Noise
    with pytest.raises(ValueError, match="noise='gauss' is unknown"):
        MeZO(model, noise="gauss")


def test_philox_perturbed_forward_is_the_forward_of_perturbed_weights_whatever_the_row_blocks(monkeypatch):
    model = tiny_model()
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    zo = MeZO(model, noise="philox").zo
    twin = copy.deepcopy(model)
    with torch.no_grad():
        wanted = [zo_noise.perturbed(p.data, block_key(7, i, 0), 0, (-1e-2,))[0]  # each whole tensor's z, by key
                  for i, p in enumerate(model.parameters())]
        for p, w in zip(twin.parameters(), wanted, strict=True):
            p.copy_(w)
        expected = twin(ids)
        with zo.perturbed(7, -1e-2):
            whole = model(ids)
        monkeypatch.setattr("lowmem.optim.perturb.Z_BLOCK", 100)  # several row blocks per tensor
        with zo.perturbed(7, -1e-2):
            blocked = model(ids)
        perturbation = Perturbation(7, (-1e-2,), zo.noise)
        for i, (p, w) in enumerate(zip(model.parameters(), wanted, strict=True)):
            assert len(row_blocks(p)) > 1 or p.dim() == 1
            assert torch.equal(perturbation.perturbed(p.data, i)[0], w)
    assert torch.equal(whole, expected)
    torch.testing.assert_close(blocked, expected, rtol=1e-6, atol=1e-6)  # the same weights, products in pieces


def test_offloaded_mezo_with_philox_noise_equals_plain_mezo(tmp_path):
    import transformers

    def build():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                          num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64)
        return transformers.LlamaForCausalLM(config)

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    plain, offloaded = build(), build()
    opt_plain = MeZO(plain, lr=1e-3, zo_eps=1e-2, weight_decay=0.1, seed=4, noise="philox")
    opt_off = MeZO(offloaded, lr=1e-3, zo_eps=1e-2, weight_decay=0.1, seed=4, noise="philox", offload="disk",
                   offload_dir=str(tmp_path / "blocks"))
    assert type(opt_off.zo.noise) is PhiloxNoise
    for _ in range(2):
        opt_plain.step(lambda: plain(**inputs).loss)
        opt_off.step(lambda: pair_loss(offloaded, inputs))
        assert opt_off.last_projected_grad == pytest.approx(opt_plain.last_projected_grad, rel=1e-3, abs=1e-3)
    with opt_off.streamer.gathered():
        for (name, p), q, s in zip(offloaded.named_parameters(), plain.parameters(), build().parameters(),
                                   strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
            assert not torch.equal(q, s), name
    opt_off.streamer.close()
