"""Every bad input is one clear line (issue 21): a table of wrong values for every numeric key of a recipe, every
optimizer option and ``lowmem plan`` (wrong type, out of range, NaN / inf, empty), plus the inputs users hit (a
non-UTF-8 file, null text, a python tag, contradictory keys). Each asserts exit status 2, exactly one
``lowmem: error:`` line that names the key, and no output directory left behind. Python options raise the same
``ValueError``."""

import dataclasses

import pytest

import lowmem
from lowmem import cli
from lowmem.checks import OPTIONS, RECIPE, TRAINING, Bound
from lowmem.example import tiny_llama
from lowmem.optim import available_optimizers
from lowmem.optim.registry import get_spec
from lowmem.recipe import SECTIONS
from lowmem.trainers import TrainingArguments

BASE = ["train", "cpu-tiny", "stand_in=tiny", "cutoff_len=32", "max_bytes=100000", "max_steps=1", "report_to=none"]
RECIPE_KEYS = {f.name for section in SECTIONS for f in dataclasses.fields(section)} | {"warmup_ratio"}


def wrong_values(key: str, bound: Bound) -> list[tuple[str, str]]:
    """(override, what the error line must say) for each class of wrong value of a bounded key."""
    cases = [(f"{key}=nan", key), (f"{key}=[1, 2]", key), (f"{key}=abc", key)]
    if not bound.holds(float("inf")):  # max_grad_norm=inf clips nothing (and logs the norm): accepted
        cases.append((f"{key}=.inf", key))
    if not bound.none:
        cases.append((f"{key}=", key))  # empty: null
    if bound.low is not None:
        below = bound.low if bound.low_open else bound.low - 1
        if below not in bound.also:
            cases.append((f"{key}={below}", f"{key}={below}"))
    if bound.high is not None:
        above = bound.high if bound.high_open else bound.high + 1
        cases.append((f"{key}={above}", f"{key}={above}"))
    if bound.kind is int:
        cases.append((f"{key}=2.5", key))
        cases.append((f"{key}=true", key))
    return cases


SWEEP = [case for table in (TRAINING, RECIPE) for key, bound in table.items() if key in RECIPE_KEYS
         for case in wrong_values(key, bound)]

LISTED = [  # the inputs of the issue, and their kin
    ("learning_rate=", "'learning_rate' takes a number, got null"),
    ("optim_args=layerwise=no", "layerwise='no': give True or False"),
    ("optim_args=rank=8.5", "rank=8.5: give a whole number"),
    ("optim_args=rank=True", "rank=True: give a whole number"),
    ("optim_args=rank=eight", "rank='eight': give a whole number"),
    ("optim_args=lr=nan", "lr='nan'"),
    ("optim_args=lr=inf", "lr='inf'"),
    ("optim_args=[rank", "override 'optim_args=[rank': its value is not plain YAML"),
    ("optim_args=update_proj_gap=0", "update_proj_gap=0: give a whole number of 1 or more"),
    ("optim_args=scale=-1", "scale=-1"),
    ("optim_args=skip_nonfinite=1", "skip_nonfinite=1: give True or False"),
    ("max_steps=0", "max_steps=0: give a whole number of 1 or more, or -1"),
    ("max_steps=-5", "max_steps=-5"),
    ("warmup_ratio=2.0", "warmup_ratio=2.0: give a finite number in [0, 1) (a fraction of the steps"),
    ("max_samples=0", "max_samples=0"),
    ("max_bytes=-1", "max_bytes=-1"),
    ("cutoff_len=100000", "cutoff_len=100000 is beyond the model's 4096 positions"),
    ("dataset=123", "'dataset' takes null or text, got 123"),
    ("dataset=[a, b]", "'dataset' takes null or text"),
    ("seed=null", "'seed' takes a whole number, got null"),
    ("cutoff_len=[1,2]", "'cutoff_len' takes a whole number, got a list [1, 2]"),
    ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0"),
    ("run_name=!!python/object/apply:os.system [\"echo hi\"]", "override 'run_name=!!python/object/apply"),
    ("report_to=5", "'report_to' takes"),
    ("bf16=maybe", "'bf16' takes true or false, got 'maybe'"),
    ("text_column=5", "'text_column' takes text, got 5"),
    ("resume_optimizer=fresh", "resume_optimizer='fresh': use one of check, reset, keep"),
    # contradictory
    ("train_on_prompt=true mask_history=true stage=sft", "train_on_prompt and mask_history contradict"),
    ("streaming=true max_steps=-1", "streaming: true reads a dataset of unknown length: set max_steps"),
    ("packing=false", "packing: false with stage: pt"),
    ("mix_strategy=concat interleave_probs=0.5,0.5", "interleave_probs needs an interleave mix_strategy"),
    ("stand_in=null model_config={hidden_size: 64, num_attention_heads: 5, num_hidden_layers: 1, "
     "intermediate_size: 64}", "model_config: "),
    ("stand_in=null model_config={hidden_size: 64, num_attention_heads: 4, num_key_value_heads: 3, "
     "num_hidden_layers: 1, intermediate_size: 64}",
     "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
]


def one_line_error(capsys, argv, out, needle):
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("lowmem: error:")]
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert needle in errors[0], errors[0]
    if out is not None:
        assert not out.exists()
    return errors[0]


@pytest.mark.parametrize("override,needle", SWEEP, ids=[case[0] for case in SWEEP])
def test_every_bounded_key_refuses_each_class_of_wrong_value(tmp_path, capsys, override, needle):
    out = tmp_path / "out"
    one_line_error(capsys, [*BASE, f"output_dir={out}", override], out, needle)


def split(overrides: str) -> list[str]:
    """Overrides separated by spaces outside brackets (``model_config={a: 1, b: 2}`` stays one)."""
    items, depth, current = [], 0, ""
    for char in overrides:
        depth += char in "[{"
        depth -= char in "]}"
        if char == " " and depth == 0 and "=" in current:
            items.append(current)
            current = ""
        else:
            current += char
    return items + [current]


@pytest.mark.parametrize("overrides,needle", LISTED, ids=[case[0][:60] for case in LISTED])
def test_the_reported_inputs_are_one_line(tmp_path, capsys, overrides, needle):
    out = tmp_path / "out"
    one_line_error(capsys, [*BASE, f"output_dir={out}", *split(overrides)], out, needle)


@pytest.mark.parametrize("content,needle", [
    (b"hello \xff\xfe world\n", "is not UTF-8 text"),
], ids=["latin1"])
def test_a_text_file_that_is_not_utf8_is_named(tmp_path, capsys, content, needle):
    data = tmp_path / "corpus.txt"
    data.write_bytes(content * 50)
    out = tmp_path / "out"
    line = one_line_error(capsys, [*BASE, f"output_dir={out}", f"dataset={data}"], out, needle)
    assert str(data) in line


@pytest.mark.parametrize("records,needle", [
    ('{"text": null}\n{"text": 3}\n', "its 'text' column holds int64 values, not text"),
    ('{"text": 5}\n', "its 'text' column holds int64 values, not text"),
    ('{"text": "some words here"}\n{"text": null}\n', "has a record whose text is None, not a string"),
], ids=["null-and-int", "int", "null"])
def test_records_without_text_are_one_line(tmp_path, capsys, records, needle):
    data = tmp_path / "records.jsonl"
    data.write_text(records * 20)
    out = tmp_path / "out"
    one_line_error(capsys, [*BASE, f"output_dir={out}", f"dataset={data}"], out, needle)


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    one_line_error(capsys, [*BASE, f"output_dir={afile}"], None, "is a file; give a folder")
    assert afile.read_text() == "mine"


PLAN = [("--batch", "-1"), ("--batch", "0"), ("--seq", "0"), ("--seq", "1"), ("--card-gib", "nan"),
        ("--card-gib", "-1"), ("--card-gib", "inf"), ("--gpus", "0")]


@pytest.mark.parametrize("flag,value", PLAN, ids=[f"{f}={v}" for f, v in PLAN])
def test_plan_refuses_out_of_range_flags(tmp_path, capsys, flag, value):
    from transformers import LlamaConfig

    config = tmp_path / "config.json"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=1000).to_json_file(config)
    one_line_error(capsys, ["plan", str(config), flag, value], None, f"{flag}={value}")


def option_cases() -> list[tuple[str, dict, str]]:
    """(optimizer, a wrong option, the key its error names): every bounded option and every option's kind."""
    cases = []
    for key, bound in OPTIONS.items():
        name = next(n for n in [*available_optimizers(), "mezo"] if key in get_spec(n).options())
        below = bound.low if bound.low_open else (bound.low - 1 if bound.low is not None else None)
        if below is not None:
            cases.append((name, {key: int(below) if bound.kind is int else below}, key))
        cases.append((name, {key: float("nan")}, key))
    for key, value in (("layerwise", "no"), ("layerwise", 1), ("rank", 8.5), ("rank", True), ("rank", "eight"),
                       ("proj_type", 3), ("lr", float("inf")), ("lr", "1e-3"), ("weight_decay", float("nan")),
                       ("eps", float("inf")), ("skip_nonfinite", "false")):
        cases.append(("galore_adamw", {key: value}, key))
    return cases


OPTION_CASES = option_cases()


@pytest.mark.parametrize("name,bad,key", OPTION_CASES, ids=[f"{n}-{k}={v}" for n, b, k in OPTION_CASES
                                                            for v in b.values()])
def test_python_options_raise_one_clear_error(name, bad, key):
    """``create_optimizer`` and ``TrainingArguments(optim_args=...)`` refuse the same values, naming the option (or
    in torch.optim's words for lr, weight_decay and eps)."""
    torch_words = {"lr": "Invalid learning rate", "weight_decay": "Invalid weight_decay", "eps": "Invalid epsilon"}
    with pytest.raises(ValueError) as caught:
        lowmem.create_optimizer(name, tiny_llama(hidden=64, layers=1), **bad)
    message = str(caught.value)
    assert key in message or torch_words.get(key, "?") in message, message
    assert "\n" not in message
    with pytest.raises(ValueError):
        TrainingArguments(output_dir="unused", optim=name, optim_args=bad, report_to=[], use_cpu=True)


@pytest.mark.parametrize("field,value", [("learning_rate", float("inf")), ("learning_rate", float("nan")),
                                         ("max_steps", 0), ("gradient_accumulation_steps", 0),
                                         ("warmup_steps", -1), ("num_train_epochs", 0), ("seed", -1)])
def test_training_arguments_in_python_refuse_the_same(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, **{field: value})
    assert not (tmp_path / "out").exists()


def test_a_flag_written_as_yaml_in_optim_args_is_a_bool():
    """``nesterov=true`` in a recipe's optim_args string was the text 'true' (so 'false' was truthy too)."""
    args = TrainingArguments(output_dir="unused", optim="muon", optim_args="nesterov=false", report_to=[],
                             use_cpu=True)
    assert args.lowmem_options()["nesterov"] is False


def test_a_damaged_checkpoint_is_one_line_and_a_new_output_dir_is_not_left(tmp_path, capsys):
    """A resume refused by the manifest, through ``lowmem train``: one line naming the file; the run's own new
    output folder (the Trainer made it) is removed again, since nothing was written into it."""
    first = tmp_path / "first"
    assert cli.main([*BASE, "max_steps=2", "save_strategy=steps", "save_steps=2", f"output_dir={first}"]) == 0
    checkpoint = first / "checkpoint-2"
    (checkpoint / "scheduler.pt").unlink()
    capsys.readouterr()
    out = tmp_path / "second"
    one_line_error(capsys, [*BASE, "max_steps=3", f"resume_from_checkpoint={checkpoint}", f"output_dir={out}"], out,
                   "scheduler.pt is missing; resume from another checkpoint, or pass ignore_checksums=True")


def test_valid_values_at_the_edges_are_accepted(tmp_path):
    """What transformers takes stays accepted: 0 for 'no limit' / 'fall back' values, a negative max_grad_norm (no
    clipping), NumPy numbers (hyperparameter searches), 0 epochs with max_steps; and optimizer options spelled as
    documented (None where the constructor reads it as unset, 1e9 for a whole number)."""
    import numpy as np

    TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_total_limit=0, eval_steps=0,
                      logging_strategy="epoch", logging_steps=0, max_grad_norm=-1, num_train_epochs=0, max_steps=10,
                      learning_rate=np.float32(1e-3), per_device_train_batch_size=np.int64(8), seed=np.int64(3))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, optim="galore_adamw",
                             optim_args={"update_proj_gap": 1e9, "rank": np.int64(8), "lr": np.float32(1e-3)})
    options = args.lowmem_options()
    assert options["update_proj_gap"] == 10**9 and isinstance(options["update_proj_gap"], int)
    lowmem.create_optimizer("muon", tiny_llama(hidden=64, layers=1), adjust_lr_fn=None)
    with pytest.raises(ValueError, match="num_train_epochs=0 with max_steps=-1 trains nothing"):
        TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, num_train_epochs=0)


def test_optim_args_as_a_mapping_in_a_recipe(tmp_path):
    from lowmem.recipe import parse_recipe, read_values, recipe_path

    values = read_values(recipe_path("cpu-tiny"), ["optim_args={rank: 8, betas: [0.9, 0.95]}",
                                                   f"output_dir={tmp_path}"])
    recipe = parse_recipe(values)
    assert recipe.train.lowmem_options()["rank"] == 8 and recipe.train.lowmem_options()["betas"] == [0.9, 0.95]
