"""Names, options, target selection and users' mistakes: clear errors before any step."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem
from lowmem.example import tiny_llama as example_llama
from lowmem.optim import FRUGAL, GaLoreAdamW, split_parameters
from lowmem.optim.compose import build_parts
from lowmem.optim.states import state_bytes


def tiny_llama(tie=False):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def test_registered_names():
    names = lowmem.available_optimizers()
    for required in ("galore_adamw", "apollo_adamw", "apollo_mini", "fira_adamw", "frugal", "frugal_svd"):
        assert required in names


@pytest.mark.parametrize("name", ["galore_adamw", "apollo_adamw", "apollo_mini", "fira_adamw", "frugal",
                                  "frugal_svd", "adamw", "adafactor", "came", "galore_adafactor",
                                  "adamw_8bit", "galore_adamw_8bit", "came_8bit", "apollo_adamw_8bit",
                                  "frugal_8bit", "adam_mini", "adam_mini_8bit"])
def test_every_name_trains_a_tiny_llama(name):
    model = tiny_llama()
    rank = {"rank": 16} if name.startswith(("galore", "apollo_adamw", "fira")) else {}
    opt = lowmem.create_optimizer(name, model, lr=3e-3, **rank)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    if name.endswith("_8bit"):  # the 64x64 (4096-element) weights really hold 8-bit codes
        assert any(v.dtype == torch.uint8 for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def test_default_targets_are_attention_and_mlp_linears_only():
    split = split_parameters(tiny_llama())
    names = [n for n, _ in split.targets]
    assert len(names) == 2 * 7
    assert all(("self_attn" in n or "mlp" in n) and n.endswith("weight") for n in names)
    others = [n for n, _ in split.decay + split.no_decay]
    assert "model.embed_tokens.weight" in others and "lm_head.weight" in others
    assert all("norm" in n for n, _ in split.no_decay)


def test_target_forms_substrings_regex_all_linear():
    model = tiny_llama()
    assert len(split_parameters(model, ["q_proj", "v_proj"]).targets) == 4
    assert len(split_parameters(model, r".*layers\.0\..*proj").targets) == 7
    all_linear = [n for n, _ in split_parameters(model, "all-linear").targets]
    assert len(all_linear) == 14 and "lm_head.weight" not in all_linear


def test_frozen_parameters_are_skipped():
    model = tiny_llama()
    model.model.layers[0].requires_grad_(False)
    opt = lowmem.create_optimizer("galore_adamw", model, rank=8)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.model.layers[0].parameters())
    assert len(split_parameters(model).targets) == 7


def test_tied_embeddings_appear_once():
    model = tiny_llama(tie=True)
    opt = lowmem.create_optimizer("galore_adamw", model, rank=8)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_biases_and_norms_get_no_weight_decay():
    opt = lowmem.create_optimizer("galore_adamw", tiny_llama(), rank=8, weight_decay=0.1)
    for group in opt.param_groups:
        expected = 0.0 if all(p.dim() == 1 for p in group["params"]) else 0.1
        assert group["weight_decay"] == expected


def test_an_optimizer_shows_the_name_it_was_created_with():
    """A composed name is built on a preset's class (GaLoreAdamW here) but reports its own name."""
    composed = lowmem.create_optimizer("galore+came+8bit", tiny_llama(), rank=8)
    assert type(composed) is GaLoreAdamW and repr(composed).startswith("galore+came+8bit (\nParameter Group 0")
    assert repr(GaLoreAdamW(tiny_llama().parameters())).startswith("GaLoreAdamW (")  # a class built directly


def test_unknown_name_lists_valid_names_and_closest():
    with pytest.raises(ValueError, match=r"unknown optimizer 'galor_adamw'.*Did you mean 'galore_adamw'.*apollo_mini"):
        lowmem.create_optimizer("galor_adamw", tiny_llama())


def test_unknown_option_names_closest():
    with pytest.raises(ValueError, match=r"no option 'rnk'.*Did you mean 'rank'"):
        lowmem.create_optimizer("galore_adamw", tiny_llama(), rnk=8)


def test_rank_at_or_above_a_dimension_projects_at_that_dimension_with_one_warning():
    """As galore-torch (and transformers' docs, rank=128 on any model): no error; the state is priced at min(m, n)."""
    expected = r"rank=128 is at least min\(m, n\) for 14 matrices \('model.layers.0.self_attn.q_proj.weight' \(64, 64\)"
    with pytest.warns(UserWarning, match=expected + r".* and 10 more\)") as seen:
        opt = lowmem.create_optimizer("galore_adamw", tiny_llama())  # the default rank on a 64-wide model
    assert len([w for w in seen if "rank=" in str(w.message)]) == 1
    parts = build_parts(opt.param_groups[0])
    assert parts.projector.rank_for((64, 32)) == 32 and parts.projector.rank_for((256, 512)) == 128
    with pytest.raises(ValueError, match=r"rank=0 must be at least 1 .*q_proj"):
        lowmem.create_optimizer("galore_adamw", tiny_llama(), rank=0)


def test_unknown_proj_type():
    with pytest.raises(ValueError, match="unknown proj_type 'middle'"):
        lowmem.create_optimizer("galore_adamw", tiny_llama(), rank=8, proj_type="middle")
    w = nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="unknown proj_type"):
        GaLoreAdamW([{"params": [w], "rank": 2, "proj_type": "diagonal"}])


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"matched no trainable nn.Linear.*q_proj"):
        lowmem.create_optimizer("galore_adamw", tiny_llama(), rank=8, target_modules=["conv"])


def test_non_2d_target_is_rejected():
    with pytest.raises(ValueError, match=r"matched 'model.norm'.*2-D nn.Linear"):
        lowmem.create_optimizer("galore_adamw", tiny_llama(), rank=8, target_modules="model.norm")
    b = nn.Parameter(torch.randn(16))
    with pytest.raises(ValueError, match=r"shape \(16,\).*2-D"):
        GaLoreAdamW([{"params": [b], "rank": 4}])


def test_bad_frugal_options():
    w = nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="unknown FRUGAL projection"):
        FRUGAL([{"params": [w], "is_proj_params": True}], projection="pca")
    with pytest.raises(ValueError, match="density must be in"):
        FRUGAL([{"params": [w], "is_proj_params": True}], density=1.5)
    with pytest.raises(ValueError, match="inactive_update_rule"):
        FRUGAL([{"params": [w], "is_proj_params": True}], inactive_update_rule="adam")
    ws = [nn.Parameter(torch.randn(4, 4)) for _ in range(3)]
    with pytest.raises(ValueError, match="mirror.*even"):
        FRUGAL([{"params": ws, "is_proj_params": True}], projection="blocks", block_order="mirror", density=0.34)


def test_bad_state_dtype():
    with pytest.raises(ValueError, match="unknown state_dtype 'int4'"):
        lowmem.create_optimizer("galore_adamw", tiny_llama(), rank=8, state_dtype="int4")


@pytest.mark.parametrize("name", ["adamw_8bit", "adam_mini_8bit", "galore+adamw+8bit"])
def test_8bit_names_keep_embedding_states_in_fp32(name):
    """A rare token's tiny second moment rounds to zero in an 8-bit block shared with frequent tokens and its
    Adam step explodes; transformers keeps bitsandbytes' embedding states in 32-bit for this reason."""
    torch.manual_seed(0)
    model = tiny_llama()
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    opt = lowmem.create_optimizer(name, model, lr=1e-3, **({"rank": 8} if name.startswith("galore") else {}))
    assert [g["state_dtype"] for g in opt.param_groups if any(p is embedding for p in g["params"])] == ["float32"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        ids = torch.randint(0, 32, (2, 16), generator=gen)  # a quarter of the vocabulary is ever seen
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert (embedding - before).abs().max() < 0.05  # 4 steps of lr 1e-3; an exploded step moves it by ~1


def _embedding_move(name: str, default: str, precision: str) -> tuple[float, dict]:
    """30 steps of ``name`` on a bf16 LLaMA whose batches see an eighth of the vocabulary (hidden 256: each 256-element
    block within one token's row), the embedding's group first checked to hold state ``default``, then set to
    ``precision``: the largest move of an embedding weight, and its state."""
    torch.manual_seed(0)
    model = example_llama(hidden=256).to(torch.bfloat16)
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().float()
    opt = lowmem.create_optimizer(name, model, lr=1e-3)
    group = next(g for g in opt.param_groups if any(p is embedding for p in g["params"]))
    assert group["state_dtype"] == default
    group["state_dtype"] = precision
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        ids = torch.randint(0, 32, (2, 16), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return (embedding.float() - before).abs().max().item(), opt.state[embedding]


def test_8bit_states_of_a_bf16_embedding_explode_where_bf16_states_do_not():
    """bf16 has fp32's range, so a bf16 embedding's states hold tiny second moments too, in half fp32's bytes; in
    8 bits the same run explodes even where each 256-element block lies within one token's row (hidden 256)."""
    assert _embedding_move("adamw_8bit", "8bit+bfloat16", "bfloat16")[0] < 0.05 < \
        _embedding_move("adamw_8bit", "8bit+bfloat16", "8bit")[0]


@pytest.mark.parametrize("name", ["adamw_8bit", "galore_adamw_8bit", "adam_mini_8bit"])
def test_embeddings_keep_an_8bit_first_moment_and_stay_stable(name):
    """An 8-bit group keeps an embedding's first moment in 8 bits (each block within one token's row) and its second
    moment (AdamW's per element, Adam-mini's per token) in bf16: the run that explodes with 8-bit states
    (``test_8bit_states_of_a_bf16_embedding_explode_where_bf16_states_do_not``) moves the embedding as bf16 states
    do. Rows that blocks would straddle keep full-precision states."""
    mixed, state = _embedding_move(name, "8bit+bfloat16", "8bit+bfloat16")
    full, _ = _embedding_move(name, "8bit+bfloat16", "bfloat16")
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.bfloat16
    assert mixed < 0.05 and mixed == pytest.approx(full, rel=0.1)
    model = example_llama(hidden=128)  # rows of 128: half a block
    odd, embedding = lowmem.create_optimizer(name, model, lr=1e-3), model.get_input_embeddings().weight
    assert [g["state_dtype"] for g in odd.param_groups if any(p is embedding for p in g["params"])] == ["float32"]


def test_came_embeddings_keep_full_precision_states():
    """CAME's factored moments are not per element: an 8-bit CAME group keeps its embedding's states unquantized."""
    model = example_llama(hidden=256).to(torch.bfloat16)
    opt, embedding = lowmem.create_optimizer("galore_came_8bit", model), model.get_input_embeddings().weight
    assert [g["state_dtype"] for g in opt.param_groups if any(p is embedding for p in g["params"])] == ["bfloat16"]


def test_dense_rule_gives_the_unprojected_tensors_adam_minis_partition():
    """``dense_rule="adam_mini"``: one second moment per token of the embedding and head (and per norm), the
    projected weights untouched; the planner prices the same state, byte for byte."""
    from lowmem.memory import meta_model, optimizer_state_bytes

    model = example_llama(hidden=256).to(torch.bfloat16)
    opt = lowmem.create_optimizer("apollo_mini", model, dense_rule="adam_mini", dense_state_dtype="8bit")
    head, embedding = model.lm_head.weight, model.get_input_embeddings().weight
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert group[id(head)]["rule"] == group[id(embedding)]["rule"] == "adam_mini"
    assert group[id(head)]["mini_block"] == group[id(embedding)]["mini_block"] == "rows"
    assert group[id(model.model.norm.weight)]["mini_block"] == "tensor"
    assert group[id(model.model.layers[0].self_attn.q_proj.weight)]["rule"] == "adamw_hf"
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.state[head]["exp_avg_sq"].shape == (head.shape[0], 1)
    assert opt.state[head]["exp_avg"].dtype == torch.uint8  # 8-bit m
    # the embedding's per-token second moment stays bf16 (a rare token's would round to zero in 8 bits), its m 8-bit
    assert opt.state[embedding]["exp_avg"].dtype == torch.uint8
    assert opt.state[embedding]["exp_avg_sq"].dtype == torch.bfloat16
    planned = optimizer_state_bytes("apollo_mini", meta_model(model.config, torch.bfloat16), dense_rule="adam_mini",
                                    dense_state_dtype="8bit")
    names = {id(p): n for n, p in model.named_parameters()}
    for p in (head, embedding):
        assert planned[names[id(p)]] == state_bytes(opt.state[p]), names[id(p)]
    adamw = optimizer_state_bytes("apollo_mini", meta_model(model.config, torch.bfloat16))
    assert planned["model.embed_tokens.weight"] < 0.51 * adamw["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="dense_rule='came' is not a rule lowmem gives"):
        lowmem.create_optimizer("apollo_mini", model, dense_rule="came")
    with pytest.raises(ValueError, match="no option 'dense_rule'"):
        lowmem.create_optimizer("adamw", model, dense_rule="adam_mini")


def test_dense_state_dtype_sets_the_unprojected_tensors_precision():
    model = example_llama(hidden=256).to(torch.bfloat16)
    opt = lowmem.create_optimizer("apollo_mini", model, dense_state_dtype="8bit")
    head, embedding = model.lm_head.weight, model.get_input_embeddings().weight
    dtypes = {id(p): g["state_dtype"] for g in opt.param_groups for p in g["params"]}
    assert dtypes[id(head)] == "8bit" and dtypes[id(embedding)] == "8bit+bfloat16"  # an AdamW embedding's v: bf16
    assert dtypes[id(model.model.layers[0].self_attn.q_proj.weight)] is None  # the projected ones keep state_dtype
    from lowmem.memory import meta_model, optimizer_state_bytes

    plain = optimizer_state_bytes("apollo_mini", meta_model(model.config, torch.bfloat16))
    lean = optimizer_state_bytes("apollo_mini", meta_model(model.config, torch.bfloat16), dense_state_dtype="8bit")
    assert lean["lm_head.weight"] < 0.6 * plain["lm_head.weight"]
    assert lean["model.embed_tokens.weight"] < 0.8 * plain["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match="unknown state_dtype 'int4'"):
        lowmem.create_optimizer("apollo_mini", model, dense_state_dtype="int4")
    with pytest.raises(ValueError, match="no option 'dense_state_dtype'"):
        lowmem.create_optimizer("adamw", model, dense_state_dtype="8bit")


def test_the_fused_8bit_kernel_leaves_an_embeddings_mixed_state_to_the_composed_update(monkeypatch):
    """The fused 8-bit AdamW kernel reads both moments as 8-bit codes: an embedding's 8-bit m with a bf16 v goes the
    composed way, while the head's plain 8-bit state still takes the kernel (a spy stands in for it on this CPU)."""
    from lowmem.optim import fused

    calls = []
    monkeypatch.setattr(fused, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(fused.blockwise_8bit, "adamw_8bit_update_", lambda p, *args, **kwargs: calls.append(p))
    model = example_llama(hidden=256).to(torch.bfloat16)
    opt = lowmem.create_optimizer("adamw_8bit", model)
    for p in (model.get_input_embeddings().weight, model.lm_head.weight):
        index = next(i for i, g in enumerate(opt.param_groups) if any(q is p for q in g["params"]))
        grad = torch.randn_like(p)
        fused.fused_adamw_8bit(p, grad, opt.state[p], opt.param_groups[index], opt.parts_for_step(index), 0)
    assert calls == [model.lm_head.weight]
