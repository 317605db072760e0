"""int8 weights (``weight_dtype="int8"``): the format and its kernel, stochastic rounding that keeps small updates in
expectation, training with the projected names (plain and layer-wise), bit-exact resume through the Trainer, and
the way back to a float model."""

import copy

import pytest
import torch
from trainer_helpers import StdlibText, args, losses, small_options

import lowmem
from lowmem.example import tiny_llama
from lowmem.kernels import dispatch
from lowmem.kernels import int8_weights as codes_int8
from lowmem.optim.int8_weights import Int8Linear, dequantize_linears, quantize_linears, weight_bytes
from lowmem.trainers import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

NAMES = ["galore_adamw", "apollo_adamw", "apollo_mini", "frugal", "galore_adamw_8bit", "fira_adamw"]


def test_nearest_quantization_is_within_half_a_step_and_zero_is_exact():
    w = torch.randn(37, 100) * torch.logspace(-3, 1, 100)  # blocks of very different magnitudes; a partial last one
    w[3] = 0.0
    codes, scales = codes_int8.quantize(w, 256)
    assert codes.dtype == torch.int8 and scales.numel() == -(-w.numel() // 256)
    back = codes_int8.dequantize(codes, scales, torch.float32, 256)
    step = scales.repeat_interleave(256)[:w.numel()].view_as(w)
    assert ((back - w).abs() <= step / 2 * (1 + 1e-6)).all()
    assert (back[3] == 0).all()
    assert codes.abs().max() == codes_int8.QMAX


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel_matches_its_twin(dtype):
    w = torch.randn(300, 257)
    codes, scales = codes_int8.quantize(w, 256)
    with dispatch.backend("torch"):
        twin = codes_int8.dequantize(codes, scales, dtype, 256)
    with dispatch.backend("triton"):
        kernel = codes_int8.dequantize(codes, scales, dtype, 256)
    if dtype == torch.float32:
        assert torch.equal(kernel, twin)
    else:  # the interpreter truncates fp32 -> bf16 where the twin rounds to nearest: at most one bf16 ulp
        assert torch.allclose(kernel.float(), twin.float(), rtol=2 ** -7, atol=0)


def test_stochastic_rounding_keeps_small_updates_in_expectation():
    """An update of 3% of a code step: nearest rounding loses all of it; the mean of many stochastically rounded
    stores equals the fp32 value within its standard error (each store is the value's lower or upper code)."""
    torch.manual_seed(0)
    codes, scales = codes_int8.quantize(torch.randn(4, 256), 256)
    updated = codes_int8.dequantize(codes, scales, torch.float32) + 0.03 * scales.repeat_interleave(256).view(4, 256)
    assert torch.equal(codes_int8.quantize(updated, 256)[0], codes)  # nearest rounding: nothing moved
    draws = 4000
    total = torch.zeros_like(updated, dtype=torch.float64)
    for seed in range(draws):
        c, s = codes.clone(), scales.clone()
        codes_int8.requantize_(c, s, updated, torch.Generator().manual_seed(seed))
        total += codes_int8.dequantize(c, s, torch.float32).double()
    mean = total / draws
    step = (updated.abs().amax(dim=1, keepdim=True) / codes_int8.QMAX).double()
    frac = (updated.double() / step) - torch.floor(updated.double() / step)
    stderr = step * torch.sqrt(frac * (1 - frac) / draws)
    z = (mean - updated.double()) / stderr.clamp_min(1e-30)
    moving = frac > 0.01
    assert moving.sum() > 900
    assert z[moving].abs().max() < 5.5  # 1000 elements: a 5.5-sigma miss has odds of about 4e-5
    assert abs(z[moving].mean()) < 4 / moving.sum().sqrt()  # and no bias overall
    assert (mean - codes_int8.dequantize(codes, scales, torch.float32)).mean() > 0  # the update survived


def test_int8_linear_gradients_equal_a_float_linear_with_the_same_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear)
    float_linear = torch.nn.Linear(64, 48)
    float_linear.weight.data = layer.dequantized(torch.float32)
    float_linear.bias.data = linear.bias.data.clone()
    x = torch.randn(3, 5, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    layer(x).square().sum().backward()
    float_linear(x2).square().sum().backward()
    assert torch.allclose(layer.weight.grad, float_linear.weight.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer.bias.grad, float_linear.bias.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.untyped_storage().nbytes() == 4  # the stand-in holds one element


def _model():
    torch.manual_seed(0)
    return tiny_llama(hidden=64, layers=2).to(torch.bfloat16)


@pytest.mark.parametrize("layerwise", [False, True], ids=["plain", "layerwise"])
@pytest.mark.parametrize("name", NAMES)
def test_every_projected_name_trains_int8_weights(name, layerwise):
    model = _model()
    before = weight_bytes(model)
    optimizer = lowmem.create_optimizer(name + ("_layerwise" if layerwise else ""), model, weight_dtype="int8",
                                        lr=1e-3, **small_options(name))
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 14 and weight_bytes(model) < 0.75 * before
    codes = [m.weight_codes.clone() for m in layers]
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    first = None
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else loss.item()
        assert all(m.weight.grad is None for m in layers)
    assert loss.item() < first - 0.05
    assert all(not torch.equal(c, m.weight_codes) for c, m in zip(codes, layers, strict=True))
    assert all(m.weight.untyped_storage().nbytes() <= 4 for m in layers)


def _whole_update_(layer, apply, seed):
    """``Int8Linear.update_`` done on the whole fp32 weight at once (what the pieces must reproduce)."""
    values = layer.dequantized(torch.float32)
    apply(values.view(-1), 0, values.numel())
    layer.store_(values, seed)


def _int8_codes_after_steps(name, dtype, monkeypatch, whole):
    torch.manual_seed(0)
    model = tiny_llama(hidden=80, layers=2).to(dtype)  # rows of 80 and 208: pieces end mid-row
    optimizer = lowmem.create_optimizer(name, model, weight_dtype="int8", lr=1e-2, weight_decay=0.1,
                                        **small_options(name))
    if whole:
        monkeypatch.setattr(Int8Linear, "update_", _whole_update_)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    monkeypatch.undo()
    return [(m.weight_codes, m.weight_scales) for m in model.modules() if isinstance(m, Int8Linear)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["apollo_mini", "apollo_adamw_layerwise", "galore_adamw", "galore_adamw_8bit",
                                  "frugal", "fira_adamw"])
def test_the_update_a_piece_at_a_time_is_bit_identical_to_the_whole(name, dtype, monkeypatch):
    """The update is recorded and replayed on pieces of the weight that end mid-row (the per-row APOLLO scales and
    the bf16 update's fp32 promotion sliced to them); codes and scales equal those of the whole fp32 update."""
    monkeypatch.setattr(codes_int8, "CHUNK", 1000)  # pieces of 768 elements
    pieces = _int8_codes_after_steps(name, dtype, monkeypatch, whole=False)
    monkeypatch.setattr(codes_int8, "CHUNK", 1000)
    whole = _int8_codes_after_steps(name, dtype, monkeypatch, whole=True)
    for (codes, scales), (codes_whole, scales_whole) in zip(pieces, whole, strict=True):
        assert torch.equal(codes, codes_whole) and torch.equal(scales, scales_whole)


def test_the_optimizer_never_dequantizes_a_whole_weight(monkeypatch):
    """The step holds one piece of an int8 weight in fp32 at a time, not the matrix (4 bytes per weight more)."""
    monkeypatch.setattr(codes_int8, "CHUNK", 1000)
    model = tiny_llama(hidden=80, layers=2).to(torch.bfloat16)
    optimizer = lowmem.create_optimizer("apollo_mini", model, weight_dtype="int8", lr=1e-2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    sizes = []
    dequantize = codes_int8.dequantize
    monkeypatch.setattr(codes_int8, "dequantize", lambda codes, *a, **k: sizes.append(codes.numel()) or
                        dequantize(codes, *a, **k))
    optimizer.step()
    assert len(sizes) > 14 and max(sizes) == 768


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="weight_dtype='int8'"):
        lowmem.create_optimizer("galore_adamw", _model(), weight_dtype="int4")
    with pytest.raises(ValueError, match="no option 'weight_dtype'"):
        lowmem.create_optimizer("adamw", _model(), weight_dtype="int8")


def test_state_dict_round_trip_and_back_to_a_float_model(tmp_path):
    model = _model()
    lowmem.create_optimizer("apollo_mini", model, weight_dtype="int8")
    state = model.state_dict()
    assert not any(k.endswith("q_proj.weight") for k in state)
    assert state["model.layers.0.self_attn.q_proj.weight_codes"].dtype == torch.int8
    other = _model()
    quantize_linears(other)
    other.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(other(input_ids=ids).logits, logits)
        assert dequantize_linears(other) == 14
        assert not any(isinstance(m, Int8Linear) for m in other.modules())
        assert torch.equal(other(input_ids=ids).logits, logits)  # the same weights, now plain bf16 linears
    other.save_pretrained(tmp_path)  # an ordinary float checkpoint
    again = type(other).from_pretrained(tmp_path, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(again[k], v) for k, v in other.state_dict().items())


def test_loading_a_float_checkpoint_quantizes_it():
    float_model = _model()
    model = copy.deepcopy(float_model)
    quantize_linears(model)
    fresh = _model()
    quantize_linears(fresh)
    for layer in fresh.modules():
        if isinstance(layer, Int8Linear):
            layer.weight_codes.zero_()
    fresh.load_state_dict(float_model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.buffers(), model.buffers(), strict=True))


def _trainer_run(tmp_path, name, resume=None, steps=6, **kw):
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2).to(torch.bfloat16)
    a = args(tmp_path, optim=name, optim_args={"weight_dtype": "int8", **small_options(name)}, max_steps=steps,
             save_strategy="steps", save_steps=3, learning_rate=1e-3, logging_steps=1, **kw)
    trainer = Trainer(model=model, args=a, train_dataset=StdlibText(64))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("name,kw", [("galore_adamw", {}),
                                     ("apollo_mini_layerwise", dict(gradient_accumulation_steps=2))])
def test_trainer_resume_is_bit_exact(tmp_path, name, kw):
    straight, trainer = _trainer_run(tmp_path / "a", name, **kw)
    assert all(isinstance(m, Int8Linear) for n, m in straight.named_modules() if n.endswith("q_proj"))
    resumed, _ = _trainer_run(tmp_path / "b", name, resume=str(tmp_path / "a" / "checkpoint-3"), **kw)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert len(losses(trainer)) == 6


def test_trainer_refuses_int8_weights_on_several_processes(monkeypatch):
    from lowmem.trainers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))  # as under torchrun
    with pytest.raises(ValueError, match="int8 weights are not"):
        TrainingArguments(output_dir="x", optim="galore_adamw", optim_args="weight_dtype=int8", use_cpu=True)


def test_planner_prices_int8_weights_exactly():
    from lowmem.memory import meta_model, peak_bytes

    model = _model()
    float_plan = peak_bytes(meta_model(model.config, torch.bfloat16), "apollo_mini_layerwise", 1, 32)
    int8_plan = peak_bytes(meta_model(model.config, torch.bfloat16), "apollo_mini_layerwise", 1, 32,
                           weight_dtype="int8")
    assert float_plan.weights == weight_bytes(model)
    lowmem.create_optimizer("apollo_mini_layerwise", model, weight_dtype="int8")
    assert int8_plan.weights == weight_bytes(model) < float_plan.weights
    with pytest.raises(ValueError, match="no option 'weight_dtype'"):
        peak_bytes(meta_model(model.config, torch.bfloat16), "adamw", 1, 32, weight_dtype="int8")


def test_llama_7b_with_int8_weights_plans_under_10_gib():
    """Issue 18's moonshot: LLaMA-7B, int8 weights, APOLLO-Mini layer-wise, the loss without logits, 1 x 256."""
    from lowmem.memory import GIB, plan

    config = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=2048)
    rows = plan(config, 256, 1, 12.0, "bf16", modes=[("apollo_mini_layerwise", False, None)], linear_ce=True,
                weight_dtype="int8")
    assert len(rows) == 1 and rows[0].fits
    assert rows[0].estimate.total <= 10 * GIB
    assert rows[0].estimate.weights < 6.7 * GIB  # 6.5B linear weights at 1.016 bytes, embedding and head in bf16
