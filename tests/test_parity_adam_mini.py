"""Adam-mini vs adam-mini 1.1.1 on tiny LLaMA (GQA, with biases) and GPT-2 models: same partition, <= 1e-5.

The reference is given dim / n_heads / n_kv_heads by hand; lowmem reads them from ``model.config``.
"""

import warnings

import pytest
import torch
from adam_mini import Adam_mini
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lowmem
from lowmem.optim import AdamMini

pytestmark = pytest.mark.filterwarnings("ignore")

LLAMA = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, attention_bias=True)
GPT2 = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)


def trajectories(make_model, reference_kwargs, steps=30):
    runs = []
    for ours in (True, False):
        torch.manual_seed(0)
        model = make_model()
        if ours:
            opt = AdamMini(model.named_parameters(), lr=1e-2, weight_decay=0.1, model=model)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                opt = Adam_mini(model.named_parameters(), lr=1e-2, weight_decay=0.1, verbose=False,
                                **reference_kwargs)
        gen = torch.Generator().manual_seed(1)
        for step in range(steps):
            for p in model.parameters():
                p.grad = (1 + step % 3) * torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(({n: p.detach().clone() for n, p in model.named_parameters()}, opt))
    return runs


@pytest.mark.parametrize("arch", ["llama_gqa", "gpt2"])
def test_matches_adam_mini(arch):
    make, kwargs = {
        "llama_gqa": (lambda: LlamaForCausalLM(LLAMA), dict(dim=64, n_heads=4, n_kv_heads=2)),
        "gpt2": (lambda: GPT2LMHeadModel(GPT2), dict(dim=64, n_heads=4)),
    }[arch]
    (ours, opt), (ref, _) = trajectories(make, kwargs)
    start = {n: p.detach() for n, p in make().named_parameters()}
    for name in ref:
        assert not torch.equal(ours[name], start[name]), name
        diff = ((ours[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
        assert diff <= 1e-5, (name, diff)
    kinds = {g["param_names"][0]: g["mini_block"] for g in opt.param_groups}
    assert set(kinds.values()) >= {"rows", "tensor"}


def test_partition_and_state_shapes_on_llama():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LLAMA)
    opt = AdamMini(model.named_parameters(), model=model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    by_name = {g["param_names"][0]: opt.state[g["params"][0]] for g in opt.param_groups}
    head_dim = 64 // 4
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["exp_avg_sq"].shape == (4, 1)  # per head
    assert by_name["model.layers.0.self_attn.k_proj.weight"]["exp_avg_sq"].shape == (2, 1)  # GQA: kv heads
    assert by_name["model.layers.0.self_attn.k_proj.weight"]["exp_avg"].shape == (2, head_dim * 64)
    assert by_name["model.layers.0.mlp.up_proj.weight"]["exp_avg_sq"].shape == (128, 1)  # per row
    assert by_name["model.embed_tokens.weight"]["exp_avg_sq"].shape == (128, 1)  # per token
    assert by_name["model.norm.weight"]["exp_avg_sq"].shape == ()  # one scalar
    assert by_name["model.layers.0.self_attn.q_proj.bias"]["exp_avg_sq"].shape == (64,)  # plain Adam
    n = sum(p.numel() for p in model.parameters())
    assert opt.state_bytes() < 4.2 * n  # about 4 B/param (Adam: 8)


def test_heads_cannot_be_inferred_is_a_clear_error():
    model = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "mlp": nn.Linear(8, 8)})
    with pytest.raises(ValueError, match=r"q_proj.weight.*pass dim= and n_heads="):
        AdamMini(model.named_parameters())
    with pytest.raises(ValueError, match="cannot split.*check dim= and n_heads="):
        AdamMini(model.named_parameters(), dim=8, n_heads=3)


def test_registry_name_reads_the_config():
    """create_optimizer("adam_mini") takes dim and heads from model.config (training through the registry
    is covered by tests/test_registry.py::test_every_name_trains_a_tiny_llama[adam_mini])."""
    model = LlamaForCausalLM(LLAMA)
    opt = lowmem.create_optimizer("adam_mini", model, lr=3e-3)
    heads = [g for g in opt.param_groups if g["mini_block"] == "heads"]
    assert len(heads) == 2 * 2  # q and k weights of both layers
    assert all(g["head_numel"] == 64 * 64 // 4 for g in heads)


@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_resume_is_bit_identical(tmp_path, state_dtype):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    template = LlamaForCausalLM(LLAMA)
    grads = [{n: torch.randn(p.shape, generator=gen) for n, p in template.named_parameters()} for _ in range(6)]

    def fresh():
        model = LlamaForCausalLM(LLAMA)
        model.load_state_dict(template.state_dict())
        return model, AdamMini(model.named_parameters(), lr=1e-2, weight_decay=0.1, model=model,
                               state_dtype=state_dtype)

    def run(model, opt, steps):
        for g in steps:
            for n, p in model.named_parameters():
                p.grad = g[n].clone()
            opt.step()

    straight, opt = fresh()
    run(straight, opt, grads)
    first, opt = fresh()
    run(first, opt, grads[:3])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    second, opt2 = fresh()
    second.load_state_dict(first.state_dict())
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    run(second, opt2, grads[3:])
    for (name, a), b in zip(straight.named_parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("model_dtype, state_dtype", [(torch.float32, "bfloat16"), (torch.bfloat16, "8bit")])
def test_states_in_another_dtype_than_the_gradient(model_dtype, state_dtype):
    """bf16 states of an fp32 model, and 8-bit states (dequantized to fp32) of a bf16 model, both step."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LLAMA).to(model_dtype)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdamMini(model.named_parameters(), lr=1e-2, model=model, state_dtype=state_dtype)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    for name, p in model.named_parameters():
        assert p.dtype == model_dtype and torch.isfinite(p).all() and not torch.equal(p, start[name]), name
