"""Generic optimizer names ``<method>+<rule>[+<precision>]``: every combination trains, builds the
parts it names, equals the fixed name it spells, and mistakes raise before any step."""

import pytest
import torch
from test_registry import tiny_llama

import lowmem
from lowmem.optim import composition_parts
from lowmem.optim.registry import METHODS, RULES, TARGET_RULES, check_options, get_spec

#: lr per rule for the training test: SGD needs a far larger step than the adaptive rules.
LR = {"adamw": 3e-3, "adafactor": 3e-3, "came": 1e-3, "adam_mini": 3e-3, "muon": 3e-3, "sinkgd": 1e-3, "sgd": 0.3,
      "sign_sgd": 1e-3}
#: Each method's parts as its target group should hold them after construction.
EXPECTED_PARTS = {
    "none": dict(projector="identity", lift="project_back"),
    "galore": dict(projector="svd", lift="project_back", scale=0.25, rank=16),
    "fira": dict(projector="svd", lift="fira", scale=0.25, rank=16),
    "apollo": dict(projector="gaussian", lift="apollo", scale_type="channel", scale=1.0, rank=16),
    "apollo_mini": dict(projector="gaussian", lift="apollo", scale_type="tensor", scale=128.0, rank=1),
    "frugal": dict(projector="blocks", lift="frugal", density=0.25, block_order="descending",
                   inactive_update_rule="sign_sgd"),
    "frugal_svd": dict(projector="svd", lift="frugal", density=0.25),
}


def rank_option(method: str) -> dict:
    """Methods with a fixed rank default of 128 need a smaller one on the 64-wide tiny LLaMA."""
    return {"rank": 16} if method in ("galore", "fira", "apollo") else {}


def batch():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))


def train(model, opt, steps: int) -> list[float]:
    ids, losses = batch(), []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def target_group(opt):
    return opt.param_groups[0]


COMBINATIONS = [(m, r) for m in METHODS for r in RULES]


@pytest.mark.parametrize("method,rule", COMBINATIONS, ids=[f"{m}+{r}" for m, r in COMBINATIONS])
def test_every_combination_trains_and_builds_its_parts(method, rule):
    model = tiny_llama()
    opt = lowmem.create_optimizer(f"{method}+{rule}", model, lr=LR[rule], **rank_option(method))
    core = METHODS[method][1]
    if rule in TARGET_RULES:  # Muon: the target matrices; the method's own AdamW keeps the rest
        assert target_group(opt)["rule"] == rule
        assert {g.get("rule") for g in opt.param_groups[1:]} <= {None, core}
    else:
        expected_rule = core if rule == "adamw" else rule
        assert {g["rule"] for g in opt.param_groups} == {expected_rule}
    group, unset = target_group(opt), {"projector": "identity", "lift": "project_back"}
    for key, value in EXPECTED_PARTS[method].items():
        assert group.get(key, unset.get(key)) == value, key
    if method != "none":  # embeddings, head and norms get the rule unprojected
        assert all(g.get("projector", "identity") == "identity" for g in opt.param_groups[1:])
    assert all(g["state_dtype"] is None for g in opt.param_groups)
    losses = train(model, opt, 12)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("name", ["galore+adamw+8bit", "apollo+adamw+8bit", "frugal+came+8bit",
                                  "none+adam_mini+8bit", "fira+adamw+8bit", "apollo_mini+adam_mini+8bit"])
def test_8bit_precision_keeps_uint8_codes(name):
    model = tiny_llama()
    method, rule, _ = name.split("+")
    opt = lowmem.create_optimizer(name, model, lr=LR[rule], min_8bit_size=0 if method == "galore" else 4096,
                                  **rank_option(method))
    embedding = model.get_input_embeddings().weight
    for group in opt.param_groups:  # embeddings keep fp32 states, as transformers does for bitsandbytes
        assert group["state_dtype"] == ("float32" if any(p is embedding for p in group["params"]) else "8bit")
    losses = train(model, opt, 12)
    assert losses[-1] < losses[0] - 0.3, losses
    codes = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dtype == torch.uint8]
    assert codes
    if method == "galore":  # min_8bit_size=0: even the small projected moments are 8-bit
        states = [opt.state[p] for p in target_group(opt)["params"]]
        assert all(s["exp_avg"].dtype == torch.uint8 and s["exp_avg"].numel() == 64 * 16 for s in states[:4])


@pytest.mark.parametrize("name,dtype", [("none+adafactor+bf16", torch.bfloat16),
                                        ("galore+came+bfloat16", torch.bfloat16),
                                        ("frugal_svd+adamw+fp32", torch.float32)])
def test_precision_sets_the_state_dtype(name, dtype):
    model = tiny_llama().to(torch.bfloat16) if dtype == torch.float32 else tiny_llama()
    opt = lowmem.create_optimizer(name, model, lr=1e-3, **rank_option(name.split("+")[0]))
    train(model, opt, 2)
    moments = [v for s in opt.state.values() for k, v in s.items() if k.startswith("exp_avg")]
    assert moments and all(v.dtype == dtype for v in moments)


def run_steps(name: str, steps: int = 4, **options) -> list[torch.Tensor]:
    model = tiny_llama()
    opt = lowmem.create_optimizer(name, model, **options)
    train(model, opt, steps)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("generic,fixed,options", [
    ("galore+adamw", "galore_adamw", dict(rank=8, weight_decay=0.1, update_proj_gap=2)),
    ("none+came", "came", dict(lr=1e-3, weight_decay=0.1)),
    ("galore+adafactor", "galore_adafactor", dict(rank=8, weight_decay=0.1)),
    ("none+adamw", "adamw", dict(weight_decay=0.1)),
    ("apollo+adamw", "apollo_adamw", dict(rank=8, weight_decay=0.1)),
    ("frugal+adamw", "frugal", dict(weight_decay=0.1, update_gap=2)),
    ("none+adam_mini", "adam_mini", dict(weight_decay=0.1)),
    ("none+adamw+8bit", "adamw_8bit", dict(weight_decay=0.1)),
    ("apollo+adamw+8bit", "apollo_adamw_8bit", dict(rank=8)),
    ("frugal_svd+adamw+8bit", "frugal_svd_8bit", dict(update_gap=2)),
])
def test_generic_name_equals_the_fixed_name_bit_for_bit(generic, fixed, options):
    ours, reference = run_steps(generic, **options), run_steps(fixed, **options)
    start = [p.detach() for p in tiny_llama().parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(ours, start, strict=True))  # the steps did move weights
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))


def test_galore_came_is_registered_as_galore_plus_came():
    names = lowmem.available_optimizers()
    assert "galore_came" in names and "galore_came_8bit" in names
    assert not any("+" in n for n in names)
    assert all(torch.equal(a, b) for a, b in zip(run_steps("galore_came", rank=8),
                                                 run_steps("galore+came", rank=8), strict=True))
    assert get_spec("galore_came_8bit").precision == "8bit"


def test_adam_mini_rows_on_projected_weights_and_the_partition_elsewhere():
    opt = lowmem.create_optimizer("galore+adam_mini", tiny_llama(), rank=8, target_modules=["v_proj", "o_proj"])
    target = target_group(opt)
    assert target["mini_block"] == "rows" and target["projector"] == "svd"
    blocks = {name: g["mini_block"] for g in opt.param_groups[1:] for name in g["param_names"]}
    assert blocks["model.layers.0.self_attn.q_proj.weight"] == "heads"
    assert blocks["model.embed_tokens.weight"] == "rows" and blocks["model.norm.weight"] == "tensor"
    heads = [g for g in opt.param_groups if g.get("mini_block") == "heads"]
    assert {g["head_numel"] for g in heads} == {64 * 64 // 4}
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups[1:] if "norm" in g["param_names"][0])


def test_rule_options_default_to_the_rule_and_can_be_changed():
    opts = check_options("galore+came", {"rank": 8})
    assert opts["eps"] == (1e-30, 1e-16) and opts["betas"] == (0.9, 0.999, 0.9999) and opts["rank"] == 8
    assert check_options("apollo+adafactor", {})["eps"] == (1e-30, 1e-3)
    assert check_options("galore+adamw", {})["eps"] == 1e-6 and check_options("frugal+adamw", {})["eps"] == 1e-8
    opt = lowmem.create_optimizer("fira+came", tiny_llama(), rank=8, betas=(0.8, 0.99, 0.999), clip_threshold=2.0)
    assert all(g["betas"] == (0.8, 0.99, 0.999) and g["clip_threshold"] == 2.0 for g in opt.param_groups)
    assert target_group(opt)["scale"] == 0.25


def test_aliases_case_and_dashes():
    for name in ("dense+came", "identity+came", "None+CAME", "apollo-mini+sign-sgd"):
        assert get_spec(name).rule in ("came", "sign_sgd")
    assert get_spec("apollo-mini+adamw").group["rank"] == 1


def test_composition_parts_lists_every_position():
    parts = composition_parts()
    assert set(parts) == {"method", "rule", "precision"}
    assert {"none", "dense", "galore", "frugal_svd", "apollo_mini"} <= set(parts["method"])
    assert set(parts["rule"]) == {"adamw", "adafactor", "came", "adam_mini", "muon", "sinkgd", "sgd", "sign_sgd"}
    assert {"fp32", "bf16", "8bit"} <= set(parts["precision"])


@pytest.mark.parametrize("name,message", [
    ("galroe+came", r"unknown method 'galroe' in optimizer 'galroe\+came'.*Did you mean 'galore'.*"
                    r"Valid methods: none, galore, .*frugal_svd"),
    ("galore+cam", r"unknown rule 'cam'.*Did you mean 'came'.*Valid rules: adamw, adafactor, came"),
    ("galore+came+8bits", r"unknown precision '8bits'.*Did you mean '8bit'.*Valid precisions: fp32"),
    ("galore+came+8bit+fp32", r"has 4 parts.*'<method>\+<rule>\[\+<precision>\]'.*rules: adamw"),
    ("galore", r"unknown optimizer 'galore'.*Did you mean 'galore_.*Or compose one as '<method>\+<rule>.*"
               r"methods: none.*rules: adamw.*precisions: fp32"),
])
def test_bad_names(name, message):
    with pytest.raises(ValueError, match=message):
        lowmem.create_optimizer(name, tiny_llama())


def test_option_the_combination_does_not_take():
    with pytest.raises(ValueError,
                       match=r"'none\+came' has no option 'rank'.*Its options: betas, bf16_stochastic_round, clip_thr"):
        lowmem.create_optimizer("none+came", tiny_llama(), rank=8)
    with pytest.raises(ValueError,
        match=r"no option 'betas'.*Its options: bf16_stochastic_round, dense_rule, dense_state_dtype, "
              r"layerwise, .*, lr, .*proj_type, rank"):
        lowmem.create_optimizer("galore+sgd", tiny_llama(), rank=8, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match=r"no option 'clip_treshold'.*Did you mean 'clip_threshold'"):
        lowmem.create_optimizer("galore+came", tiny_llama(), rank=8, clip_treshold=1.0)
    with pytest.raises(ValueError, match=r"no option 'min_8bit_size'"):  # only with the 8bit precision
        lowmem.create_optimizer("galore+came", tiny_llama(), rank=8, min_8bit_size=0)


def test_state_dtype_conflicting_with_the_name_precision():
    with pytest.raises(ValueError, match=r"keeps its states in '8bit' but state_dtype='bfloat16'.*drop state_dtype"):
        lowmem.create_optimizer("galore+came+8bit", tiny_llama(), rank=8, state_dtype="bfloat16")
    same = lowmem.create_optimizer("galore+came+bf16", tiny_llama(), rank=8, state_dtype=torch.bfloat16)
    assert all(g["state_dtype"] == "bfloat16" for g in same.param_groups)
    plain = lowmem.create_optimizer("galore+came", tiny_llama(), rank=8, state_dtype="bfloat16")
    assert all(g["state_dtype"] == "bfloat16" for g in plain.param_groups)


def test_rule_option_checks():
    with pytest.raises(ValueError, match=r"came's betas takes 3 values, e.g. betas=\(0.9, 0.999, 0.9999\)"):
        lowmem.create_optimizer("galore+came", tiny_llama(), rank=8, betas=(0.9, 0.999))
    with pytest.raises(ValueError, match=r"adafactor's eps takes 2 values"):
        lowmem.create_optimizer("none+adafactor", tiny_llama(), eps=1e-8)
    with pytest.raises(ValueError, match=r"adamw_hf's betas takes 2 values"):
        lowmem.create_optimizer("galore+adamw", tiny_llama(), rank=8, betas=(0.9, 0.99, 0.999))
    with pytest.raises(ValueError, match=r"both lr and relative_step=True"):
        lowmem.create_optimizer("none+adafactor", tiny_llama(), relative_step=True)
    with pytest.raises(ValueError, match=r"'frugal\+adafactor' needs an lr"):
        lowmem.create_optimizer("frugal+adafactor", tiny_llama(), lr=None, relative_step=True)
    with pytest.raises(ValueError, match=r"'galore\+came' needs an lr"):
        lowmem.create_optimizer("galore+came", tiny_llama(), rank=8, lr=None)
    relative = lowmem.create_optimizer("galore+adafactor", tiny_llama(), rank=8, lr=None, relative_step=True)
    assert target_group(relative)["relative_step"] is True
