"""``lowmem train`` and its recipes: every bundled recipe runs with the tiny stand-in model, and a mistake in the
input is one line on stderr, exit status 2, and nothing written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowmem import cli
from lowmem.recipe import RECIPES_DIR, adapt_overrides, parse_recipe, read_values

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
#: Every recipe with the documented stand-in, on local text, for 2 steps (the GPU recipes stream C4 from the Hub).
QUICK = ["stand_in=tiny", "dataset=python-stdlib", "streaming=false", "max_steps=2", "max_bytes=200000",
         "cutoff_len=64", "logging_steps=1", "per_device_train_batch_size=2", "gradient_accumulation_steps=1",
         "save_strategy=no"]


def test_cpu_tiny_is_bundled_and_linked_from_the_repo():
    assert (RECIPES_DIR / "cpu-tiny.yaml").is_file()
    assert (Path(__file__).parents[1] / "recipes" / "cpu-tiny.yaml").is_file()


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_runs_two_steps_with_the_tiny_stand_in(recipe, tmp_path, capsys):
    out = tmp_path / "out"
    quick = QUICK
    if read_values(recipe).get("stage") == "sft":  # instruction records instead of the Hub's
        quick = [*QUICK, f"dataset={instruction_files(tmp_path)[0]}", "cutoff_len=256", "max_samples=8"]
    assert cli.main(["train", str(recipe), *quick, f"output_dir={out}"]) == 0
    report = json.loads((out / "memory.json").read_text())
    zeroth_order = read_values(recipe).get("optim") == "mezo"  # no optimizer state at all
    assert (report["optimizer_state_bytes"] == 0) == zeroth_order and report["peak_rss_bytes"] > 0
    assert report["parameters"] > 100_000  # offloaded blocks count too
    saved = "adapter_model" if read_values(recipe).get("finetuning_type") in ("lora", "prefix") else "model"
    assert (out / "loss.png").stat().st_size > 1000 and (out / f"{saved}.safetensors").is_file()
    assert "optimizer state:" in capsys.readouterr().out


@pytest.mark.parametrize("finetuning_type", ["lora", "prefix"])
def test_mezo_recipe_trains_adapters(tmp_path, finetuning_type, capsys):
    """MeZO's three variants from one recipe: full (above), LoRA and prefix tuning."""
    out = tmp_path / "out"
    recipe = RECIPES_DIR / "finetune-llama-3.2-1b-8gb-mezo.yaml"
    quick = [*QUICK, f"dataset={instruction_files(tmp_path)[0]}", "cutoff_len=256", "max_samples=8"]
    assert cli.main(["train", str(recipe), *quick, f"finetuning_type={finetuning_type}", "optim_args=zo_eps=1e-2",
                     "learning_rate=1e-4", f"output_dir={out}"]) == 0
    report = json.loads((out / "memory.json").read_text())
    assert 0 < report["trainable_parameters"] < report["parameters"] / 5
    assert (out / "adapter_model.safetensors").is_file()


def test_cpu_tiny_trains_galore_from_scratch(tmp_path):
    """The embedded default without the stand-in, shortened: GaLore, a BPE tokenizer trained on the fly, the
    vocabulary and pad id of the model following the tokenizer, and the loss going down."""
    out = tmp_path / "out"
    overrides = ["max_steps=30", "max_bytes=300000", "logging_steps=10", "save_strategy=no", f"output_dir={out}"]
    assert cli.main(["train", "cpu-tiny", *overrides]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 4096 and config["pad_token_id"] is not None
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 30 and len(losses) == 3 and losses[-1] < losses[0] - 1.0, losses
    report = json.loads((out / "memory.json").read_text())
    assert report["parameters"] > 1_000_000


@pytest.mark.parametrize("text,overrides,message", [
    ("dataset: python-stdlib\nlearning_rat: 1.0e-3\n", [], "unknown recipe key 'learning_rat'. Did you mean "
                                                          "'learning_rate'?"),
    ("dataset: [unclosed\n", [], "is not valid YAML"),
    ("dataset: /no/such/folder\nmodel_config: {hidden_size: 64}\ntokenizer: bpe\n", [],
     "dataset '/no/such/folder' does not exist"),
    ("dataset: python-stdlib\nmodel_name_or_path: /no/such/model\n", [],
     "model_name_or_path '/no/such/model' does not exist"),
    ("dataset: python-stdlib\nmodel_config: {hidden_size: 64}\n", [], "needs a tokenizer"),
    ("dataset: python-stdlib\nmodel_config: {hidden_size: 64}\ntokenizer: bpe\noptim: galore_adamw\n",
     ["optim_args=rnk=8"], "no option 'rnk'"),
    ("dataset: python-stdlib\nmodel_config: {hidden_size: 64}\ntokenizer: bpe\n", ["max_steps=ten"],
     "'max_steps' takes a whole number"),
    ("dataset: python-stdlib\nmodel_config: {}\ntokenizer: bpe\n", ["stage=dpo"],
     "stage: dpo (DPO) is not a lowmem stage"),
    ("dataset: python-stdlib\nmodel_config: {}\ntokenizer: bpe\n", ["stage=rlhf"], "stage='rlhf' is not available"),
    ("dataset: python-stdlib\nmodel_name_or_path: org/model\n", ["quantization_bit=4"],
     "set finetuning_type: lora"),
    ("dataset: python-stdlib\nmodel_name_or_path: org/model\nfinetuning_type: lora\n", ["quantization_bit=3"],
     "quantization_bit=3 is not available"),
    ("dataset: python-stdlib\nmodel_name_or_path: org/model\nfinetuning_type: lora\nquantization_bit: 4\n",
     ["quantization_type=int4"], "quantization_type='int4' is not available"),
    ("dataset: python-stdlib\nmodel_config: {}\ntokenizer: bpe\nfinetuning_type: lora\nquantization_bit: 4\n",
     [], "give model_name_or_path, not model_config"),
])
def test_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, text, overrides, message):
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "out"
    recipe.write_text(text + f"output_dir: {out}\n")
    assert cli.main(["train", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowmem: error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_unknown_recipe_name_lists_the_bundled_ones(capsys):
    assert cli.main(["train", "gpu-huge"]) == 2
    assert "cpu-tiny" in capsys.readouterr().err


def test_version_specific_keys_are_translated():
    """warmup_ratio is gone in transformers 5.x, where warmup_steps below 1 is the ratio; 1e-5 is a YAML string."""
    recipe = parse_recipe({"dataset": "python-stdlib", "model_config": {"hidden_size": 64}, "tokenizer": "bpe",
                           "warmup_ratio": 0.1, "learning_rate": "1e-5", "overwrite_output_dir": True,
                           "output_dir": "unused"})
    assert recipe.train.learning_rate == 1e-5
    assert getattr(recipe.train, "warmup_ratio", None) == 0.1 or recipe.train.warmup_steps == 0.1
    checkpointing = parse_recipe({"dataset": "python-stdlib", "model_config": {}, "tokenizer": "bpe",
                                  "gradient_checkpointing": True, "output_dir": "unused"}).train
    assert getattr(checkpointing, "activation_checkpointing", None) or checkpointing.gradient_checkpointing


def _list_rows(out: str) -> dict[str, tuple[float, float, str]]:
    """``lowmem list``'s rows: name -> (B/param over the model, over its linear weights, summary)."""
    rows = {}
    for line in out.splitlines():
        cells = line.split(maxsplit=3)
        if len(cells) == 4 and cells[1].replace(".", "").isdigit():
            rows[cells[0]] = (float(cells[1]), float(cells[2]), cells[3])
    return rows


def test_list_names_every_optimizer(capsys):
    assert cli.main(["list"]) == 0
    rows = _list_rows(capsys.readouterr().out)
    assert rows["adamw"][:2] == (8.0, 8.0) and rows["adam_mini"][0] < 4.1 and rows["galore_adamw"][0] < 8
    assert set(rows) >= {"galore_adamw", "apollo_mini", "came_8bit", "frugal", "galore_came_8bit", "mezo"}


def test_list_words_agree_with_its_numbers(capsys):
    """Summaries state no bytes of their own (the columns do), the low-rank names' savings show in the linear
    weights' column, and a composed name is listed, priced and shown under its own name."""
    assert cli.main(["list"]) == 0
    rows = _list_rows(capsys.readouterr().out)
    assert not [name for name, (_, _, summary) in rows.items() if "B/param" in summary or "SGD-like" in summary]
    assert rows["apollo_mini"][1] < 0.1 < rows["adam_mini"][1]  # "almost no state on projected weights"
    assert rows["adamw_8bit"][1] == 2.03 and rows["adamw_8bit"][0] > 2.5  # the embeddings keep an fp32 second moment
    assert cli.main(["list", "galore+came+8bit", "apollo_mini_layerwise"]) == 0
    rows = _list_rows(capsys.readouterr().out)
    assert list(rows) == ["galore+came+8bit", "apollo_mini_layerwise"]
    assert rows["galore+came+8bit"][2] == "galore projection and lift, came moments, states in 8bit"
    assert cli.main(["list", "galore+cme"]) == 2
    assert capsys.readouterr().err.count("lowmem: error:") == 1


def test_help_has_whole_sentences_and_no_markup(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    description = " ".join(out.split("\n\n")[1].split())
    assert "``" not in out and description.endswith(".") and "train a recipe" in out


def _run(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[1])


def test_a_mistake_is_one_error_line_with_no_third_party_noise():
    done = _run("import sys; from lowmem.cli import main; sys.exit(main(sys.argv[1:]))", "train", "nonexistent",
                "max_steps=1")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("lowmem: error: recipe 'nonexistent' does not exist") and \
        done.stderr.count("\n") == 1, done.stderr


def test_plan_and_list_do_not_import_bitsandbytes(tmp_path):
    """The commands that use no bitsandbytes never import it (peft would: 2 s of imports and, on some CPUs, a
    warning about a hub kernel), though the planner wraps LoRA models."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=512).save_pretrained(tmp_path)
    code = ("import sys; from lowmem import cli, quiet\n"
            "assert cli.main(['list', 'adamw', 'galore+came+8bit']) == 0\n"
            "assert cli.main(['plan', sys.argv[1], '--seq', '64', '--card-gib', '1']) == 0\n"
            "print('bitsandbytes imported:', quiet.bitsandbytes_imported())\n")
    done = _run(code, str(tmp_path / "config.json"))
    assert done.returncode == 0, done.stderr
    assert "bitsandbytes imported: False" in done.stdout and "adamw + QLoRA" in done.stdout
    assert "kernels-community" not in done.stderr and "is_gradient_checkpointing" not in done.stderr, done.stderr


def test_deferred_bitsandbytes_is_the_real_package_on_first_use():
    """The stand-in the command line puts in bitsandbytes' place: peft and the Trainer import without it, and the
    first use, whatever its form, imports the real package once, submodules included."""
    code = ("import sys\n"
            "from lowmem.quiet import quiet, bitsandbytes_imported\n"
            "quiet()\n"
            "import peft, transformers.trainer\n"
            "assert not bitsandbytes_imported()\n"
            "import peft.tuners.lora.bnb as lora_bnb\n"  # QLoRA's layers: 'import bitsandbytes as bnb', then use
            "assert bitsandbytes_imported()\n"
            "from bitsandbytes.optim import AdamW8bit\n"  # transformers' optim='adamw_bnb_8bit' does this
            "import bitsandbytes, bitsandbytes.nn, bitsandbytes.functional as F\n"
            "assert AdamW8bit.__module__.startswith('bitsandbytes.')\n"
            "assert lora_bnb.bnb.nn is bitsandbytes.nn is sys.modules['bitsandbytes.nn']\n"
            "assert bitsandbytes.nn.__spec__.origin.endswith('__init__.py')\n"
            "assert F.quantize_4bit is lora_bnb.bnb.functional.quantize_4bit\n")
    done = _run(code)
    assert done.returncode == 0, done.stderr


def test_another_optimizer_runs_with_its_own_defaults_and_says_so(tmp_path):
    """``optim=`` without ``optim_args=``: the recipe's options were written for its own optimizer, so they are
    dropped with one warning naming them (APOLLO-Mini would silently take GaLore's rank 32 and scale 0.25 otherwise);
    the same optimizer updated layer-wise keeps them; ``optim_args=`` clears them without a word."""
    path = RECIPES_DIR / "cpu-tiny.yaml"  # galore_adamw with rank=32, update_proj_gap=100, scale=0.25
    given = [f"output_dir={tmp_path / 'out'}"]
    for name in ("mezo", "apollo_mini", "fira_adamw"):
        values = read_values(path, [f"optim={name}", *given])
        notes = adapt_overrides(read_values(path), values)
        assert values["optim_args"] is None and notes[0] == (
            f"warning: optim={name} runs with its own defaults, not the recipe's optim_args for galore_adamw (rank=32, "
            f"update_proj_gap=100, scale=0.25); optim_args=... sets {name}'s options")
        rate = ["warning: optim=mezo keeps the recipe's learning_rate=0.005, chosen for galore_adamw; MeZO steps at "
                "1e-7 to 1e-6 for full weights (1e-5 to 1e-4 with LoRA): set learning_rate=..."]
        assert notes[1:] == (rate if name == "mezo" else [])
        assert parse_recipe(values).train.lowmem_optim == name
    layerwise = read_values(path, ["optim=galore_adamw_layerwise", *given])
    assert adapt_overrides(read_values(path), layerwise) == [] and layerwise["optim_args"] == "rank=32, " \
        "update_proj_gap=100, scale=0.25"
    cleared = read_values(path, ["optim=mezo", "optim_args=", "learning_rate=1e-6", *given])
    assert adapt_overrides(read_values(path), cleared) == [] and cleared["optim_args"] is None


def test_cpu_tiny_with_mezo_logs_its_projected_gradient_and_warns_before_overwriting(tmp_path, capsys):
    """``lowmem train cpu-tiny optim=mezo`` runs; its log has projected_grad and no grad_norm (MeZO forms no
    gradient); two logged points make a loss plot; no pin_memory warning on a CPU; and a second run with other
    values of the recipe's keys says which earlier run it writes over."""
    import warnings

    out = tmp_path / "out"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text((RECIPES_DIR / "cpu-tiny.yaml").read_text().replace("output_dir: out/cpu-tiny",
                                                                         f"output_dir: {out}"))
    quick = ["stand_in=tiny", "max_steps=2", "logging_steps=1", "max_bytes=200000", "cutoff_len=64",
             "per_device_train_batch_size=2", "optim=mezo", "learning_rate=1e-6"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["train", str(recipe), *quick]) == 0
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("lowmem:")] == [
        "lowmem: warning: optim=mezo runs with its own defaults, not the recipe's optim_args for galore_adamw "
        "(rank=32, update_proj_gap=100, scale=0.25); optim_args=... sets mezo's options"]
    logged = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(logged) == 2 and all("projected_grad" in e and "grad_norm" not in e for e in logged)
    assert (out / "loss.png").is_file()
    assert cli.main(["train", str(recipe), *quick, "max_steps=1", "optim_args="]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lowmem:")]
    assert notes == [f"lowmem: warning: this run (the recipe with overrides) writes over the earlier run in {out}; "
                     "output_dir=... keeps both"]


def test_loss_plot_marks_few_points(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from lowmem.train import plot_loss

    drawn = []
    plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: drawn.append(kw) or plot(self, *a, **kw))
    path = tmp_path / "loss.png"
    assert plot_loss([{"step": 5, "loss": 3.0}, {"train_loss": 3.0}], path) and path.stat().st_size > 1000
    assert drawn[-1]["marker"] == "o"  # one point: a marker, not an invisible line
    assert plot_loss([{"step": s, "loss": 1.0} for s in range(200)], path) and drawn[-1]["marker"] is None
    assert not plot_loss([{"train_loss": 3.0}], path) and not path.exists()  # nothing logged: no stale plot


def test_jsonl_records_stream_and_a_missing_column_is_named(tmp_path, capsys):
    """Structured files give their text column; streaming reads lazily and needs max_steps."""
    corpus = tmp_path / "corpus.jsonl"
    source = (Path(json.__file__).read_text() * 3).split("\n\n")
    corpus.write_text("\n".join(json.dumps({"content": doc, "id": i}) for i, doc in enumerate(source)) + "\n")
    out = tmp_path / "out"
    base = ["train", "cpu-tiny", f"dataset={corpus}", "stand_in=tiny", "cutoff_len=32", "max_steps=2",
            "per_device_train_batch_size=2", "save_strategy=no", f"output_dir={out}"]
    assert cli.main([*base, "text_column=content", "streaming=true"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert cli.main([*base, f"output_dir={tmp_path / 'other'}"]) == 2
    assert "has no 'text' column (columns: content, id); set text_column" in capsys.readouterr().err
    assert cli.main([*base, "text_column=content", "streaming=true", "max_steps=-1"]) == 2
    assert "set max_steps" in capsys.readouterr().err


def test_resume_from_checkpoint_true_takes_the_newest_complete_checkpoint(tmp_path, capsys):
    """``resume_from_checkpoint: true`` in a recipe (once the string "yes") resumes from the newest checkpoint whose
    save completed, naming it and the interrupted one it skipped; with none, one line before anything runs."""
    out = tmp_path / "out"
    base = ["train", "cpu-tiny", "stand_in=tiny", "cutoff_len=32", "max_bytes=100000", "save_strategy=steps",
            "save_steps=1", f"output_dir={out}"]
    assert cli.main([*base, "max_steps=2"]) == 0
    partial = out / "checkpoint-9"  # a save killed after the weights, before the optimizer and the trainer state
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    assert cli.main([*base, "max_steps=3", "resume_from_checkpoint=true"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {out / 'checkpoint-2'}, the newest complete checkpoint (skipped checkpoint-9 without " \
        "trainer_state.json and optimizer.pt: an interrupted save)" in err
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    empty = tmp_path / "empty"
    assert cli.main([*base, "max_steps=3", "resume_from_checkpoint=true", f"output_dir={empty}"]) == 2
    assert "resume_from_checkpoint: true found no complete checkpoint" in capsys.readouterr().err
    assert not empty.exists()


def test_an_unreachable_hub_dataset_is_one_line(tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert cli.main(["train", "cpu-tiny", "dataset=someone/no-such-corpus", f"output_dir={out}"]) == 2
    assert "'someone/no-such-corpus' is not a local path and could not be loaded" in capsys.readouterr().err
    assert not out.exists()


def instruction_files(tmp_path) -> tuple[Path, Path]:
    """An alpaca JSON and a chat JSONL built from the standard library's functions and their docstrings."""
    import inspect
    import textwrap

    funcs = [f for f in vars(textwrap).values() if inspect.isfunction(f) and f.__doc__][:6] * 4
    alpaca = [{"instruction": f"Write {f.__name__}.", "input": (f.__doc__ or "").strip()[:200],
               "output": inspect.getsource(f)[:400]} for f in funcs]
    chats = [{"messages": [{"role": "system", "content": "You write Python."},
                           {"role": "user", "content": r["instruction"]},
                           {"role": "assistant", "content": r["output"]}]} for r in alpaca]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    return tmp_path / "alpaca.json", tmp_path / "chat.jsonl"


@pytest.mark.parametrize("kind", ["alpaca", "chat"])
@pytest.mark.parametrize("extra", [["optim=came_8bit", "optim_args="],
                                   ["finetuning_type=lora", "optim=adam_mini", "optim_args=", "lora_rank=4"]])
def test_sft_on_instruction_records(tmp_path, kind, extra):
    alpaca, chat = instruction_files(tmp_path)
    out = tmp_path / "out"
    args = ["train", "cpu-tiny", "stage=sft", f"dataset={alpaca if kind == 'alpaca' else chat}", "stand_in=tiny",
            "max_steps=2", "per_device_train_batch_size=2", "cutoff_len=256", "save_strategy=no", f"output_dir={out}",
            *extra]
    assert cli.main(args) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    if "finetuning_type=lora" in extra:
        assert (out / "adapter_config.json").is_file()  # peft saved the adapters only


def test_sft_labels_only_the_answers():
    from lowmem.data import DEFAULT_CHAT_TEMPLATE, IGNORE, to_messages, tokenize_chat, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n" * 100], 300)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "add one"}, {"role": "assistant", "content": "return x + 1"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "x + 1"}]
    row = tokenize_chat(messages, tokenizer, 512)
    answered = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True)
                                 if label != IGNORE])
    assert answered.count("x + 1") == 2 and "add one" not in answered and "again" not in answered
    assert to_messages({"instruction": "a", "input": "b", "output": "c"})[0]["content"] == "a\n\nb"
    with pytest.raises(ValueError, match="needs 'messages' or 'instruction' and 'output'"):
        to_messages({"question": "a", "answer": "b"})


def test_lora_with_a_projection_optimizer_is_refused(tmp_path, capsys):
    alpaca, _ = instruction_files(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["train", "cpu-tiny", "stage=sft", f"dataset={alpaca}", "stand_in=tiny", "finetuning_type=lora",
                     f"output_dir={out}"]) == 2
    assert "LoRA-wrapped" in capsys.readouterr().err and not out.exists()


def test_qlora_trains_adapters_on_frozen_4bit_weights(tmp_path):
    """quantization_bit: 4 loads the base through bitsandbytes (nf4, double quantization) with every linear but the
    head in 4 bits and frozen; only the LoRA factors train, and they move."""
    from bitsandbytes.nn import Linear4bit
    from safetensors.torch import load_file

    from lowmem.train import prepare

    alpaca, _ = instruction_files(tmp_path)
    out = tmp_path / "out"
    recipe = RECIPES_DIR / "finetune-llama-3.1-8b-12gb-qlora.yaml"
    quick = [*QUICK, f"dataset={alpaca}", "cutoff_len=256", "max_samples=8", "learning_rate=0.01",
             f"output_dir={out}"]
    _, _, model = prepare(parse_recipe(read_values(recipe, quick)))
    linears = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(linears) == 2 * 7 and all(m.weight.dtype == torch.uint8 for m in linears)
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16  # pure_bf16; the head is not quantized
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    assert cli.main(["train", str(recipe), *quick]) == 0
    adapters = load_file(out / "adapter_model.safetensors")
    lora_b = [t for name, t in adapters.items() if "lora_B" in name]
    assert len(lora_b) == 14 and all(t.abs().sum() > 0 for t in lora_b)  # initialised to zero, trained since
    report = json.loads((out / "memory.json").read_text())
    assert report["trainable_parameters"] == sum(t.numel() for t in adapters.values())


def test_quantization_bit_8_loads_int8_linears(tmp_path):
    from bitsandbytes.nn import Linear8bitLt

    from lowmem.train import prepare

    alpaca, _ = instruction_files(tmp_path)
    recipe = RECIPES_DIR / "finetune-llama-3.1-8b-12gb-qlora.yaml"
    overrides = [*QUICK, f"dataset={alpaca}", "cutoff_len=256", "max_samples=8", "quantization_bit=8",
                 f"output_dir={tmp_path / 'out'}"]
    _, _, model = prepare(parse_recipe(read_values(recipe, overrides)))
    linears = [m for m in model.modules() if isinstance(m, Linear8bitLt)]
    assert len(linears) == 14 and all(m.weight.dtype == torch.int8 and not m.weight.requires_grad for m in linears)
