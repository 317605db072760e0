"""The memory planner (lowmem.memory): exact optimizer-state bytes for every registered name, predicted peak within
10% of MemTracker's measurement on small LLaMAs, clear errors for a missing config."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem
from lowmem import memory
from lowmem.kernels import adam_8bit

TINY = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=False)


def _options(name):
    return {"rank": 8} if "rank" in lowmem.optim.registry.get_spec(name).options() else {}


@pytest.fixture
def eager_8bit():
    """The compiled 8-bit kernels keep the same state layout; skipping their compilation keeps the test fast."""
    adam_8bit.set_enabled(False)
    yield
    adam_8bit.set_enabled(True)


@pytest.mark.parametrize("name", [*lowmem.available_optimizers(), "galore+muon", "apollo+muon", "muon+8bit",
                                  "galore+muon+8bit", "galore+sinkgd"])
def test_state_bytes_exact(name, eager_8bit):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY)
    optimizer = lowmem.create_optimizer(name, model, **_options(name))
    tokens = torch.randint(TINY.vocab_size, (2, 16))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    predicted = memory.optimizer_state_bytes(name, memory.meta_model(TINY), **_options(name))
    assert sum(predicted.values()) == optimizer.state_bytes()


def _llama(hidden, layers, vocab):
    return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)


@pytest.mark.parametrize("config, name, batch, seq, ckpt", [
    (_llama(256, 4, 8000), "adamw", 2, 128, True),  # 7.3M params; peak in optimizer.step()
    (_llama(192, 3, 4000), "apollo_mini_layerwise", 1, 256, False),  # peak in backward
    (_llama(128, 2, 4000), "galore_adamw", 2, 128, False),
    (_llama(192, 3, 4000), "adamw_8bit", 1, 64, False),  # a chunked 8-bit update (lm_head > CHUNK_8BIT)
    (_llama(256, 4, 8000), "came_8bit", 2, 128, False),  # a whole 8-bit first moment dequantized to fp32
])
def test_peak_within_10_percent(config, name, batch, seq, ckpt, eager_8bit):
    measured = memory.measure_peak(config, name, batch, seq, ckpt, **_options(name))
    estimate = memory.peak_bytes(memory.meta_model(config), name, batch, seq, ckpt, **_options(name))
    assert sum(memory.optimizer_state_bytes(name, memory.meta_model(config), **_options(name)).values()) \
        == measured["state_bytes"]
    assert abs(estimate.total / measured["Total"] - 1) < 0.10, (estimate, measured)


@pytest.mark.parametrize("name, ckpt, dtype", [("adamw", False, torch.float32),
                                               ("apollo_mini_layerwise", True, torch.bfloat16)])
def test_linear_ce_peak_within_2_percent(name, ckpt, dtype):
    """The loss without logits (``linear_ce``): the planned peak against a measured step of the patched model, and
    far below the unpatched plan (the vocabulary dominates this model, as Llama 3's does a 1B one)."""
    config = _llama(128, 2, 32000)
    measured = memory.measure_peak(config, name, 2, 256, ckpt, dtype=dtype, linear_ce=True)
    meta = memory.meta_model(config, dtype)
    estimate = memory.peak_bytes(meta, name, 2, 256, ckpt, linear_ce=True)
    assert abs(estimate.total / measured["Total"] - 1) < 0.02, (estimate, measured)
    assert estimate.total < 0.7 * memory.peak_bytes(meta, name, 2, 256, ckpt).total


@pytest.mark.parametrize("quantized, ckpt", [(False, False), (True, True)])
def test_lora_and_qlora_peak_within_10_percent(quantized, ckpt):
    """LoRA on all linear layers; QLoRA: the base loaded through bitsandbytes in 4 bits (nf4, double quantization),
    its quantization constants counted."""
    config = _llama(192, 3, 4000)
    measured = memory.measure_peak(config, "adamw", 2, 128, ckpt, lora=memory.LORA, quantized=quantized)
    meta = memory.meta_model(config, lora=memory.LORA)
    estimate = memory.peak_bytes(meta, "adamw", 2, 128, ckpt, quantized=quantized)
    assert estimate.states == measured["state_bytes"]
    assert abs(estimate.total / measured["Total"] - 1) < 0.10, (estimate, measured)
    if quantized:  # the 4-bit weights: their codes (MemTracker's parameters) plus the constants
        assert abs(estimate.weights / (measured["Parameter"] + measured["QuantConstants"]) - 1) < 0.01
        assert estimate.weights < 0.7 * memory.weight_bytes(meta)


def test_recommended_recipe_command():
    """The plan names the bundled recipe nearest to the recommended row, by its bundled name (it runs from any
    folder), with the keys that differ overridden."""
    rows = memory.plan(dict(TINY.to_dict()), seq_len=64, batch_size=2, card_gib=1, modes=[("adamw", True, "qlora")])
    command = memory.recipe_command(rows[0], "org/model", 64, 2, bf16=True)
    assert command == "lowmem train finetune-llama-3.1-8b-12gb-qlora model_name_or_path=org/model cutoff_len=64"
    full = memory.Row("apollo_mini_layerwise", True, None, rows[0].estimate)
    assert memory.recipe_command(full, "meta-llama/Llama-3.1-8B-Instruct", 1024, 1, bf16=True) == \
        "lowmem train finetune-llama-3.1-8b-24gb-apollo-mini"
    scratch = memory.recipe_command(memory.Row("galore_adamw", False, None, rows[0].estimate), "cfg.json", 256, 8,
                                    bf16=True)
    assert scratch.startswith("lowmem train pretrain-llama-") and "model_config=cfg.json" in scratch
    assert "optim=" not in scratch  # a GaLore pretraining recipe keeps its own optim_args
    assert "MODEL" not in scratch  # pretraining names no weights, so no placeholder either
    other = memory.recipe_command(memory.Row("adamw_8bit", False, None, rows[0].estimate), "org/m", 1024, 4, True)
    assert "optim=adamw_8bit" in other and "optim_args=null" not in other
    # planned without logits: a recipe that has the key keeps it (every GPU recipe sets it)
    assert "linear_cross_entropy" not in scratch
    assert memory.recipe_command(full, "meta-llama/Llama-3.1-8B-Instruct", 1024, 1, bf16=True, linear_ce=True) == \
        "lowmem train finetune-llama-3.1-8b-24gb-apollo-mini"
    mezo = memory.recipe_command(memory.Row("mezo", False, None, rows[0].estimate), "org/m", 512, 4, True, True)
    assert "linear_cross_entropy" not in mezo and "mezo" in mezo  # MeZO refuses the option


LLAMA_1B = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
LLAMA_3B = LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True)
LLAMA_30B = LlamaConfig(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52,
                        num_key_value_heads=52, vocab_size=32000)


def test_recipe_command_picks_a_recipe_for_the_same_model_size(tmp_path):
    """A 1B model on a 24 GiB card (AdamW fits) runs a 1B recipe with only optim= changed, never the 8B one with
    optim_args cleared; a size no recipe has (30B) gets the closest one with the model overridden; from a config JSON,
    the placeholder the command explains is in the command."""
    estimate = memory.Estimate(0, 0, 0, 0, 0, 0, "-")
    adamw = memory.Row("adamw", False, None, estimate)
    command = memory.recipe_command(adamw, "meta-llama/Llama-3.2-1B-Instruct", 1024, 1, True, config=LLAMA_1B)
    assert command.startswith("lowmem train finetune-llama-3.2-1b-") and " optim=adamw" in command
    assert "optim_args" not in command and "model_name_or_path" not in command and ".yaml" not in command
    qlora = memory.Row("adamw", True, "qlora", estimate)
    command = memory.recipe_command(qlora, "org/llama-30b", 1024, 1, True, config=LLAMA_30B)
    assert command.startswith("lowmem train finetune-llama-3.1-8b-12gb-qlora model_name_or_path=org/llama-30b")
    command = memory.recipe_command(qlora, "org/llama-3b", 1024, 1, True, config=LLAMA_3B)  # a 3B recipe exists
    assert command.startswith("lowmem train finetune-llama-3.2-3b-") and "finetuning_type=lora" in command
    assert "quantization_bit=4" in command and "optim_args= " in command  # its int8 options cleared
    config_json = str(tmp_path / "config.json")
    command = memory.recipe_command(memory.Row("adamw", True, "lora", estimate), config_json, 1024, 1, True,
                                    config=LLAMA_1B)
    assert command.startswith("lowmem train finetune-llama-3.2-1b-") and "model_name_or_path=MODEL" in command
    assert command.endswith("(MODEL: the hub id or directory of the weights)")
    assert "finetuning_type=lora" in command and "lora_rank=16" in command  # the adapters the plan priced
    scratch = memory.recipe_command(adamw, config_json, 256, 8, True, config=LLAMA_1B)
    assert scratch.startswith("lowmem train pretrain-llama-1b-") and f"model_config={config_json}" in scratch
    assert "optim=adamw optim_args= " in scratch  # the 1B pretraining recipes' options are another optimizer's
    from lowmem.recipe import RECIPES_DIR

    for path in RECIPES_DIR.glob("*.yaml"):  # every recipe but the CPU demo says its model size in its name
        assert path.stem == "cpu-tiny" or memory._RECIPE_SIZE.search(path.stem), path.stem


def test_recipe_command_adds_linear_ce_to_a_recipe_without_it(tmp_path, monkeypatch):
    """Planned without logits, the command turns the loss without logits on where the nearest recipe lacks it."""
    import lowmem.recipe

    source = lowmem.recipe.RECIPES_DIR / "finetune-llama-3.2-1b-16gb-adam-mini.yaml"
    text = "\n".join(line for line in source.read_text().splitlines() if "linear_cross_entropy" not in line)
    (tmp_path / source.name).write_text(text + "\n")
    monkeypatch.setattr(lowmem.recipe, "RECIPES_DIR", tmp_path)
    row = memory.Row("adam_mini", True, None, memory.Estimate(0, 0, 0, 0, 0, 0, "-"))
    with_it = memory.recipe_command(row, "meta-llama/Llama-3.2-1B-Instruct", 1024, 4, True, linear_ce=True)
    assert with_it == f"lowmem train {source.stem} linear_cross_entropy=true"
    assert memory.recipe_command(row, "meta-llama/Llama-3.2-1B-Instruct", 1024, 4, True) == \
        f"lowmem train {source.stem}"  # planned with the logits: either fits, nothing forced


def test_plan_table_and_recommendation():
    rows = memory.plan(dict(TINY.to_dict()), seq_len=64, batch_size=1, card_gib=1)
    assert all(r.fits for r in rows if not r.notes)
    text = memory.format_plan(rows, 1)
    assert "Recommended" in text and "adamw" in text


def test_missing_config_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        memory.load_config(tmp_path / "nope" / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        memory.load_config(tmp_path)


def test_config_from_dir(tmp_path):
    TINY.save_pretrained(tmp_path)
    assert memory.load_config(tmp_path).hidden_size == 64


def test_lowmem_plan_command(tmp_path, capsys):
    from lowmem import cli

    TINY.save_pretrained(tmp_path)
    assert cli.main(["plan", str(tmp_path / "config.json"), "--seq", "64", "--card-gib", "1"]) == 0
    out = capsys.readouterr().out
    assert "galore_adamw_8bit_layerwise" in out and "Recommended on a 1 GiB card" in out
    assert "adamw + QLoRA + ckpt" in out and "Run it: lowmem train " in out and ".yaml" not in out
    assert out.splitlines()[2].split() == ["GiB"] * 7  # the columns' unit
    assert "loss without logits" in out  # a LLaMA: priced with linear_cross_entropy by default
    assert cli.main(["plan", str(tmp_path / "config.json"), "--seq", "64", "--card-gib", "1", "--no-linear-ce"]) == 0
    assert "loss without logits" not in capsys.readouterr().out
    assert cli.main(["plan", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("lowmem: error: config file")


def test_lowmem_plan_per_gpu_under_fsdp2(tmp_path, capsys):
    """``--gpus 2``: full-parameter rows priced per GPU (sharded weights, states and reduced gradients), and the
    torchrun command with fsdp=true; an impossible count is one clear line."""
    from lowmem import cli

    TINY.save_pretrained(tmp_path)
    config = str(tmp_path / "config.json")
    rows = {gpus: {row.label: row.estimate for row in memory.plan(config, 64, 1, 1.0, gpus=gpus)} for gpus in (1, 2)}
    assert set(rows[2]) == {name for name, ckpt, adapters in memory.DEFAULT_MODES
                            if not ckpt and not adapters and name != "mezo"}
    assert rows[2]["adamw"].states * 2 == rows[1]["adamw"].states  # elementwise moments split in two
    assert rows[2]["adamw"].total < rows[1]["adamw"].total
    assert cli.main(["plan", config, "--seq", "64", "--card-gib", "1", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "per GPU over 2 GPUs" in out and "Run it: torchrun --nproc_per_node=2 -m lowmem.cli train " in out
    assert out.rstrip().endswith("fsdp=true") or "fsdp=true   (" in out
    assert cli.main(["plan", config, "--gpus", "0"]) == 2
    assert capsys.readouterr().err.startswith("lowmem: error: --gpus=0: give a whole number of 1 or more")


@pytest.mark.parametrize("dtype,offload", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_mezo_peak_within_10_percent(dtype, offload, tmp_path):
    """MeZO's row against a measured step: the inference-like peak; offloaded (disk store, so only the blocks in
    flight are materialized), the weights outside the blocks, three blocks and the doubled batch."""
    from lowmem.optim.zo import MeZO, pair_loss

    config = _llama(128, 3, 8000)
    torch.manual_seed(0)
    model = memory._real_model(config, dtype, quantized=False).eval()
    options = {"offload": "disk", "offload_dir": str(tmp_path)} if offload else {}
    opt = MeZO(model, lr=1e-6, **options)
    ids = torch.randint(8000, (2, 128), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    loss = (lambda: pair_loss(model, inputs)) if offload else (lambda: model(**inputs).loss)
    measured = memory.forward_peak_bytes(model, lambda fresh: opt.step(fresh(loss)))
    estimate = memory.peak_bytes(memory.meta_model(config, dtype), "mezo", 2, 128, offload=offload)
    assert abs(estimate.total / measured - 1) < 0.10, (estimate, measured)
    assert estimate.states == estimate.gradients == 0


def test_mezo_rows_are_recommended_only_when_nothing_with_gradients_fits():
    rows = memory.plan(dict(TINY.to_dict()), seq_len=64, batch_size=1, card_gib=1)
    assert memory.recommend(rows).optimizer != "mezo"
    for row in rows:
        row.fits = row.optimizer == "mezo"
    best = memory.recommend(rows)
    assert best.optimizer == "mezo" and best.adapters is None
    assert memory.recipe_command(best, "org/m", 512, 4, True).startswith(
        "lowmem train finetune-llama-3.2-1b-8gb-mezo")
    offloaded = next(r for r in rows if r.adapters == "offload")
    assert offloaded.label == "mezo + offload (blocks in RAM)"
    assert memory.recipe_command(offloaded, "org/m", 512, 2, True).startswith(
        "lowmem train finetune-qwen2.5-14b-12gb-mezo-offload")
