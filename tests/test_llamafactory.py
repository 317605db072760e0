"""LLaMA-Factory's recipes run unchanged: its templates render the token ids its published formats give, its
``dataset_info.json`` datasets load (alpaca, sharegpt, per-dataset ``max_samples``, ``val_size``), its method keys
become lowmem's optimizers, and what lowmem does not do is one clear line. The recipes under
``tests/data/llamafactory/recipes`` keep LLaMA-Factory's example layout; only ``stand_in=tiny`` and ``dataset_dir``
(and the step count) are added."""

import copy
import itertools
from pathlib import Path

import pytest
import torch

from lowmem import cli
from lowmem.data import train_bpe_tokenizer
from lowmem.dataset_info import entry, to_conversation
from lowmem.recipe import parse_recipe, read_values
from lowmem.templates import IGNORE, TEMPLATES, encode_example, fix_tokenizer, infer_seqlen

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

HERE = Path(__file__).parent / "data" / "llamafactory"
RECIPES = HERE / "recipes"
DATA = HERE / "data"
MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
           "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<think>", "</think>"]
SYSTEM, USER, ANSWER = "Be brief.", "What is a list?", "An ordered sequence."
USER2, ANSWER2 = "And a set?", "Unordered."


@pytest.fixture(scope="module")
def base_tokenizer():
    text = (Path(__file__).read_text() + " ordered sequence unordered brief list set") * 3
    return train_bpe_tokenizer([text], 400)


def _tokenizer(base):
    """A BPE tokenizer that knows the templates' markers as special tokens, with a begin-of-text token."""
    tokenizer = copy.deepcopy(base)
    tokenizer.add_tokens(MARKERS, special_tokens=True)
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    return tokenizer


# Each template's published format for one conversation (system, two turns), as its pieces: "BOS" / "EOS" for the
# special tokens, strings for text that LLaMA-Factory tokenizes on its own; P marks the end of a prompt (not trained).
P = object()
LLAMA3_USER = ("<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")
QWEN_USER = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PUBLISHED = {
    "llama3": ["BOS", f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>", LLAMA3_USER.format(USER), P,
               f"{ANSWER}<|eot_id|>", LLAMA3_USER.format(USER2), P, f"{ANSWER2}<|eot_id|>"],
    "qwen": [f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", QWEN_USER.format(USER), P, f"{ANSWER}<|im_end|>\n",
             QWEN_USER.format(USER2), P, f"{ANSWER2}<|im_end|>\n"],
    "qwen3": [f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", QWEN_USER.format(USER), P, "<think>\n\n</think>\n\n",
              f"{ANSWER}<|im_end|>\n", QWEN_USER.format(USER2), P, "<think>\n\n</think>\n\n", f"{ANSWER2}<|im_end|>\n"],
    "chatml": [f"<|im_start|>system\n{SYSTEM}<|im_end|>\n", QWEN_USER.format(USER), P, f"{ANSWER}<|im_end|>\n",
               QWEN_USER.format(USER2), P, f"{ANSWER2}<|im_end|>\n"],
    "mistral": ["BOS", f"[INST] {SYSTEM}\n\n{USER}[/INST]", P, f" {ANSWER}", "EOS", f"[INST] {USER2}[/INST]", P,
                f" {ANSWER2}", "EOS"],
    "gemma": ["BOS", f"<start_of_turn>user\n{SYSTEM}\n\n{USER}<end_of_turn>\n<start_of_turn>model\n", P,
              f"{ANSWER}<end_of_turn>\n", f"<start_of_turn>user\n{USER2}<end_of_turn>\n<start_of_turn>model\n", P,
              f"{ANSWER2}<end_of_turn>\n"],
    "alpaca": [SYSTEM, f"### Instruction:\n{USER}\n\n### Response:\n", P, ANSWER, "EOS", "\n\n",
               f"### Instruction:\n{USER2}\n\n### Response:\n", P, ANSWER2, "EOS", "\n\n"],
    "default": [f"System: {SYSTEM}", "EOS", "\n", f"Human: {USER}", "EOS", "\nAssistant:", P, ANSWER, "EOS", "\n",
                f"Human: {USER2}", "EOS", "\nAssistant:", P, ANSWER2, "EOS", "\n"],
    "empty": [SYSTEM, USER, P, ANSWER, USER2, P, ANSWER2],
}
#: The end-of-text token each template trains with (``replace_eos``: its end-of-turn token).
EOS_OF = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>", "qwen3": "<|im_end|>", "chatml": "<|im_end|>",
          "gemma": "<end_of_turn>"}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_template_renders_its_published_format(name, base_tokenizer):
    tokenizer = _tokenizer(base_tokenizer)
    fix_tokenizer(TEMPLATES[name], tokenizer)
    assert tokenizer.eos_token == EOS_OF.get(name, "<|endoftext|>")
    ids, labels, prompt = [], [], True
    for piece in PUBLISHED[name]:
        if piece is P:
            prompt = False
            continue
        if piece in ("BOS", "EOS"):
            new = [tokenizer.bos_token_id if piece == "BOS" else tokenizer.eos_token_id]
        else:
            new = tokenizer.encode(piece, add_special_tokens=False)
            if piece.startswith(("[INST]", "<|start", "<|im_start|>user", "<start_of_turn>user", "### Instr",
                                 "Human", USER2)):
                prompt = True
        ids += new
        labels += [IGNORE] * len(new) if prompt else new
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                {"role": "assistant", "content": ANSWER}, {"role": "user", "content": USER2},
                {"role": "assistant", "content": ANSWER2}]
    encoded = encode_example(TEMPLATES[name], messages, tokenizer, cutoff_len=4096)
    assert encoded["input_ids"] == ids
    assert encoded["labels"] == labels


def test_qwen_brings_its_default_system_and_truncation_shares_the_budget(base_tokenizer):
    tokenizer = _tokenizer(base_tokenizer)
    fix_tokenizer(TEMPLATES["qwen"], tokenizer)
    plain = [{"role": "user", "content": USER}, {"role": "assistant", "content": ANSWER}]
    ids = encode_example(TEMPLATES["qwen"], plain, tokenizer, 4096)["input_ids"]
    system = tokenizer.encode("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                              "assistant.<|im_end|>\n", add_special_tokens=False)
    assert ids[:len(system)] == system
    assert infer_seqlen(100, 10, 50) == (40, 10) and infer_seqlen(10, 100, 50) == (10, 40)
    assert infer_seqlen(60, 40, 50) == (30, 20)
    cut = encode_example(TEMPLATES["qwen"], plain, tokenizer, 12)
    assert len(cut["input_ids"]) == 12 and any(label != IGNORE for label in cut["labels"])
    last = encode_example(TEMPLATES["qwen"], plain * 2, tokenizer, 4096, mask_history=True)["labels"]
    assert sum(label != IGNORE for label in last) == len(tokenizer.encode(f"{ANSWER}<|im_end|>\n",
                                                                          add_special_tokens=False))


def test_alpaca_and_sharegpt_records_become_chats_as_in_llamafactory():
    info = {"a": {"file_name": "alpaca_demo.json", "columns": {"prompt": "instruction", "response": "output",
                                                                "history": "history"}},
            "s": {"file_name": "sharegpt_demo.json", "formatting": "sharegpt"}}
    alpaca = entry(info, "a", DATA)
    assert alpaca["columns"]["query"] is None  # a columns block resets what it leaves out
    record = {"instruction": "Sum", "input": "1 2", "output": "3", "history": [["hi", "hello"]]}
    assert to_conversation(record, alpaca) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Sum"}, {"role": "assistant", "content": "3"}]
    alpaca["columns"]["query"] = "input"
    assert to_conversation(record, alpaca)[-2]["content"] == "Sum\n1 2"
    sharegpt = entry(info, "s", DATA)
    chat = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                              {"from": "gpt", "value": "a"}]}
    assert to_conversation(chat, sharegpt) == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "a"}]
    assert to_conversation({"conversations": chat["conversations"][2:]}, sharegpt) is None


def _recipe(name: str, *overrides: str):
    return parse_recipe(read_values(RECIPES / f"{name}.yaml", ["stand_in=tiny", f"dataset_dir={DATA}",
                                                               "max_steps=2", *overrides]))


@pytest.mark.parametrize("name,optim,options,note", [
    ("llama3_galore_full_sft", "galore_adamw_layerwise", {"rank": 128, "update_proj_gap": 200, "scale": 2.0},
     "use_galore -> optim=galore_adamw_layerwise rank=128"),
    ("llama3_apollo_full_sft", "apollo_adamw_layerwise", {"rank": 128, "scale": 32.0, "scale_type": "channel",
                                                          "proj": "random"}, "use_apollo -> optim=apollo_adamw"),
    ("qwen2_adam_mini_full_sft", "adam_mini", {}, "use_adam_mini -> optim=adam_mini"),
    ("llama3_badam_full_sft", "badam", {"switch_interval": 50, "switch_mode": "ascending", "start_block": None},
     "use_badam -> optim=badam switch_interval=50 switch_mode=ascending"),
    ("qwen3_muon_full_sft", "muon", {}, "use_muon -> optim=muon"),
])
def test_method_keys_become_lowmem_optimizers(name, optim, options, note):
    from lowmem.trainers import parse_optim_args

    recipe = _recipe(name)
    assert recipe.train.optim == optim and recipe.train.lowmem_optim == optim
    assert options.items() <= parse_optim_args(recipe.train.optim_args).items()
    assert any(line.startswith(note) for line in recipe.notes)


def test_datasets_templates_lora_and_freeze_are_applied():
    from lowmem.train import prepare

    tokenizer, (train, evaluation), _ = prepare(_recipe("llama3_full_sft"))
    assert (len(train), len(evaluation)) == (36, 4)  # 20 alpaca + 20 sharegpt records (max_samples each), 10% held
    assert tokenizer.eos_token == "<|eot_id|>"  # llama3's end of turn
    assert all(row["input_ids"][-1] == tokenizer.eos_token_id for row in train)
    _, (train, evaluation), model = prepare(_recipe("llama3_lora_sft_otfq"))
    assert len(train) == 24 and evaluation is None  # the sharegpt record with roles out of order is dropped
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha) == (8, 16)  # lora_alpha: 2 x rank, LLaMA-Factory's default
    assert {t.rsplit(".", 1)[-1] for t in config.target_modules} >= {"q_proj", "down_proj"}  # lora_target: all
    assert any("4bit" in type(m).__name__.lower() for m in model.modules())
    _, _, model = prepare(_recipe("llama3_freeze_sft"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".layers.1." in n for n in trained)  # the last of the stand-in's 2 layers
    _, (train, _), _ = prepare(_recipe("qwen3_lora_pretrain", "cutoff_len=64"))
    assert len(train) > 10 and len(train[0]["input_ids"]) == 64
    _, (train, _), _ = prepare(_recipe("llama3_full_sft", "mix_strategy=interleave_under", "val_size=0",
                                       "max_samples=5", "eval_strategy=no"))
    assert len(train) == 10  # alternating records of the two datasets until the first runs out


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES.glob("*.yaml")))
def test_every_llamafactory_recipe_runs_two_steps(name, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", str(RECIPES / f"{name}.yaml"), "stand_in=tiny", f"dataset_dir={DATA}", "max_steps=2",
                     "preprocessing_num_workers=null", "dataloader_num_workers=0", f"output_dir={out}",
                     *(["cutoff_len=64"] if "pretrain" in name else [])]) == 0
    assert (out / "model.safetensors").exists() or (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("override,message", [
    ("deepspeed=examples/deepspeed/ds_z3_config.json", "deepspeed: lowmem does not run DeepSpeed"),
    ("stage=dpo", "stage: dpo (DPO) is not a lowmem stage"),
    ("dataset=ranking_demo", "ranking: true"),
    ("dataset=alpaca_en_demo", "dataset alpaca_en_demo is not in"),
    ("template=vicuna", "template 'vicuna' is not available"),
    ("use_galore=false use_badam=true badam_mode=ratio", "badam_mode: ratio"),
    ("use_galore=false use_badam=true badam_switch_interval=-1", "badam_switch_interval: -1"),
    ("use_apollo=true", "use_galore and use_apollo: use one of GaLore, APOLLO or BAdam"),
    ("finetuning_type=lora", "GaLore, APOLLO and BAdam train full weights"),
    ("optim=sgd", "use_galore with optim: sgd"),
    ("flash_attn=fa2", "flash_attn: 'fa2' is a LLaMA-Factory setting lowmem does not have: LLaMA-Factory's own"),
    ("stage=ppo pref_beta=0.2", "stage: ppo (PPO) is not a lowmem stage"),
    ("val_size=0.1 eval_dataset=alpaca_demo", "give val_size or eval_dataset, not both"),
    ("use_adam_mini=true", "use_galore and use_adam_mini: give one optimizer"),
    ("mix_strategy=interleave_over interleave_probs=0.5,0.6", "one probability per dataset, summing to 1"),
    ("dataset_dir=ONLINE", "dataset_dir: ONLINE: lowmem reads a local dataset_info.json"),
])
def test_what_lowmem_does_not_do_is_one_line(override, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["train", str(RECIPES / "llama3_galore_full_sft.yaml"), "stand_in=tiny", f"dataset_dir={DATA}",
                     *override.split(), f"output_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lowmem: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert not out.exists()


def test_report_to_a_service_that_is_not_installed_is_refused(tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert cli.main(["train", str(RECIPES / "llama3_lora_sft.yaml"), "stand_in=tiny", f"dataset_dir={DATA}",
                     "report_to=wandb", f"output_dir={tmp_path / 'out'}"]) == 2
    assert "report_to: wandb needs the 'wandb' package" in capsys.readouterr().err


def test_lowmem_datasets_still_work_beside_a_dataset_info(tmp_path):
    from lowmem.train import prepare

    _, (train, _), _ = prepare(_recipe("qwen3_lora_pretrain", "dataset=python-stdlib", "max_bytes=100000",
                                       "cutoff_len=64"))
    assert len(train) > 10
    assert torch.tensor(train[0]["input_ids"]).shape == (64,)


def test_sft_packing_puts_several_chats_in_a_sequence_and_keeps_every_label(tmp_path):
    from lowmem.train import prepare

    _, (plain, _), _ = prepare(_recipe("llama3_lora_sft", "cutoff_len=255", "max_samples=12"))
    _, (packed, _), _ = prepare(_recipe("llama3_lora_sft", "cutoff_len=256", "max_samples=12", "packing=true"))
    assert len(packed) < len(plain) == 12
    assert all(len(row["input_ids"]) == len(row["position_ids"]) == 256 for row in packed)
    trained = sorted(label for row in plain for label in row["labels"] if label != IGNORE)
    assert sorted(label for row in packed for label in row["labels"] if label != IGNORE) == trained
    starts = sum(1 for row in packed for here, after in itertools.pairwise(row["position_ids"])
                 if (here, after) == (0, 1))
    assert starts == 12  # positions restart at every chat (the padding's stay 0)
    assert cli.main(["train", str(RECIPES / "llama3_lora_sft.yaml"), "stand_in=tiny", f"dataset_dir={DATA}",
                     "max_steps=2", "packing=true", "cutoff_len=256", "preprocessing_num_workers=null",
                     f"output_dir={tmp_path / 'out'}"]) == 0


def test_llamafactory_defaults_apply_to_its_recipes():
    """Where LLaMA-Factory's defaults differ from lowmem's, a recipe written for it gets LLaMA-Factory's: LoRA when
    finetuning_type is absent (said in a line), gradient checkpointing unless disable_gradient_checkpointing, GaLore on
    every linear but the head; BAdam with optim: adamw_8bit keeps 8-bit states."""
    recipe = _recipe("llama3_lora_sft")
    assert recipe.train.gradient_checkpointing or getattr(recipe.train, "activation_checkpointing", False)
    recipe = _recipe("llama3_lora_sft", "disable_gradient_checkpointing=true")
    assert not (recipe.train.gradient_checkpointing or getattr(recipe.train, "activation_checkpointing", False))
    values = read_values(RECIPES / "qwen3_lora_pretrain.yaml", ["stand_in=tiny", f"dataset_dir={DATA}"])
    del values["finetuning_type"]
    recipe = parse_recipe(values)
    assert recipe.method.finetuning_type == "lora" and any("finetuning_type not given" in n for n in recipe.notes)
    assert _recipe("llama3_galore_full_sft").train.optim_target_modules == "all-linear"
    recipe = _recipe("llama3_badam_full_sft", "optim=adamw_8bit")
    assert "state_dtype='8bit'" in recipe.train.optim_args
    import lowmem
    from lowmem.example import tiny_llama

    model = tiny_llama(hidden=256, layers=2)
    optimizer = lowmem.create_optimizer("badam", model, state_dtype="8bit", switch_interval=5)
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert any(s.get("exp_avg", torch.empty(0)).dtype == torch.uint8 for s in optimizer.state.values())


def test_history_reasoning_the_default_system_and_extra_frozen_modules(base_tokenizer):
    tokenizer = _tokenizer(base_tokenizer)
    fix_tokenizer(TEMPLATES["qwen3"], tokenizer)
    chat = [{"role": "user", "content": USER}, {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nBecause."},
            {"role": "user", "content": USER2}, {"role": "assistant", "content": ANSWER2}]
    masked = tokenizer.decode(encode_example(TEMPLATES["qwen3"], chat, tokenizer, 4096, mask_history=True)["input_ids"])
    assert "why" not in masked and masked.count("<think>") == 1  # history's reasoning dropped; the last answer's block
    plain = tokenizer.decode(encode_example(TEMPLATES["qwen3"], chat, tokenizer, 4096)["input_ids"])
    assert "why" in plain and plain.count("<think>") == 2
    fix_tokenizer(TEMPLATES["qwen"], tokenizer)
    empty_system = [{"role": "system", "content": ""}, *chat[:2]]
    assert "You are Qwen" in tokenizer.decode(encode_example(TEMPLATES["qwen"], empty_system, tokenizer, 4096)
                                              ["input_ids"])
    from lowmem.train import prepare

    _, _, model = prepare(_recipe("llama3_freeze_sft", "freeze_extra_modules=norm"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.norm.weight" in trained and "model.layers.0.input_layernorm.weight" in trained  # substrings


def test_the_default_dataset_dir_does_not_hide_lowmem_sources(tmp_path, monkeypatch):
    from lowmem.data import dataset_info_entries

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text('{"demo": {"file_name": "demo.json", "num_samples": 2}}')
    monkeypatch.chdir(tmp_path)
    assert dataset_info_entries("tatsu-lab/alpaca", None) is None  # not in the default data/: the Hub name as before
    with pytest.raises(ValueError, match="is not in"):
        dataset_info_entries("tatsu-lab/alpaca", "data")  # named explicitly: LLaMA-Factory's rule
    with pytest.raises(ValueError, match="num_samples"):
        dataset_info_entries("demo", None)


def test_the_held_out_split_is_evaluated_and_datasets_stream(tmp_path):
    import json

    base = ["train", str(RECIPES / "llama3_full_sft.yaml"), "stand_in=tiny", f"dataset_dir={DATA}", "max_steps=2",
            "preprocessing_num_workers=null", "dataloader_num_workers=0"]
    assert cli.main([*base, "eval_steps=1", f"output_dir={tmp_path / 'eval'}"]) == 0
    history = json.loads((tmp_path / "eval" / "trainer_state.json").read_text())["log_history"]
    assert len([entry for entry in history if "eval_loss" in entry]) == 2  # val_size: 0.1, eval_strategy: steps
    assert cli.main([*base, "streaming=true", "val_size=0", "eval_strategy=no", f"output_dir={tmp_path / 's'}"]) == 0


def test_the_docs_list_every_llamafactory_key():
    from lowmem import llamafactory

    text = (Path(__file__).parents[1] / "docs" / "llamafactory.md").read_text()
    keys = [k for table in llamafactory.UNSUPPORTED.values() for k in table]
    keys += [*llamafactory.GALORE, *llamafactory.APOLLO, *llamafactory.BADAM, "use_adam_mini", "use_muon"]
    assert [k for k in keys if f"`{k}`" not in text] == []
