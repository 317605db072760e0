"""Recipe YAML -> (model, data, method, TrainingArguments), in LLaMA-Factory's flat style.

A recipe is one flat mapping (``### model`` / ``### method`` / ``### dataset`` / ``### output`` / ``### train`` are
comments that group it): every key is a lowmem ``TrainingArguments`` field (so ``optim: galore_adamw``,
``optim_args``, ``learning_rate``...) or one of the model / data / method keys below. ``key=value`` overrides
from the command line are read as YAML values. Every key is checked before anything runs: an unknown key names
the closest valid one. Keys that differ between transformers 4.57 and 5.x are translated (``warmup_ratio`` is
``warmup_steps`` below 1 on 5.x; ``gradient_checkpointing`` is ``activation_checkpointing`` on 5.x;
``overwrite_output_dir`` is gone in 5.x and dropped).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from . import llamafactory
from .checks import FRACTION, RECIPE, TRAINING, check_all
from .optim.registry import get_spec, without_layerwise
from .trainers import TrainingArguments, parse_optim_args

#: Where ``lowmem train NAME`` finds a recipe given by name.
RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class ModelArguments:
    """Which model to train."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local dir (fine-tuning)."})
    model_config: dict | str | None = field(default=None, metadata={
        "help": "From-scratch model: a config JSON path or an inline mapping (model_type defaults to llama)."})
    tokenizer: str | None = field(default=None, metadata={
        "help": "'bpe' trains a byte-level BPE on the dataset (vocab = model_config's vocab_size); else a hub id or "
                "dir. Default: model_name_or_path's tokenizer."})
    trust_remote_code: bool = False
    pure_bf16: bool = field(default=False, metadata={"help": "Weights in bf16, no mixed precision."})
    quantization_bit: int | None = field(default=None, metadata={
        "help": "QLoRA: load the frozen base weights in 4 or 8 bits (bitsandbytes); needs finetuning_type: lora."})
    quantization_type: str = field(default="nf4", metadata={"help": "4-bit data type: 'nf4' or 'fp4'."})
    double_quantization: bool = field(default=True, metadata={
        "help": "4-bit: quantize the quantization constants too (about 0.4 bit per weight saved)."})
    stand_in: str | None = field(default=None, metadata={
        "help": "'tiny': replace the model by a tiny LLaMA and the tokenizer by a BPE trained on the data, keeping "
                "everything else but capping a low-rank optimizer's rank at 16 (tests every recipe in seconds)."})


@dataclass
class DataArguments:
    """What to train on."""

    dataset: str | None = field(default=None, metadata={
        "help": "Text files / folders, comma-separated, 'python-stdlib', or a Hugging Face dataset name."})
    dataset_config: str | None = field(default=None, metadata={"help": "A hub dataset's configuration (c4: en)."})
    text_column: str = field(default="text", metadata={"help": "The column of JSON / parquet / CSV / hub records."})
    streaming: bool = field(default=False, metadata={"help": "Read lazily (large corpora); needs max_steps."})
    cutoff_len: int = field(default=1024, metadata={"help": "Tokens per packed training sequence."})
    max_samples: int | None = field(default=None, metadata={"help": "Use at most this many packed sequences."})
    max_bytes: int | None = field(default=None, metadata={"help": "Read only the leading files up to this size."})
    dataset_dir: str | None = field(default=None, metadata={
        "help": "LLaMA-Factory's: the folder whose dataset_info.json names the datasets. Default: 'data' when it has "
                "one, whose names then win over lowmem's own forms."})
    template: str | None = field(default=None, metadata={
        "help": "LLaMA-Factory's chat template (llama3, qwen, qwen3, mistral, gemma, chatml, alpaca, default, empty, "
                "llama2); default: the tokenizer's own chat template."})
    val_size: float = field(default=0.0, metadata={
        "help": "Hold out this many records (above 1) or this fraction of them for evaluation."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Evaluation datasets, as dataset."})
    train_on_prompt: bool = field(default=False, metadata={"help": "Train on the prompt tokens too (template)."})
    mask_history: bool = field(default=False, metadata={"help": "Train on the last turn only (template)."})
    packing: bool | None = field(default=None, metadata={
        "help": "sft: pack several chats per sequence (LLaMA-Factory's greedy knapsack); pt always packs."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes that tokenize."})
    mix_strategy: str = field(default="concat", metadata={
        "help": "Several datasets: 'concat', or interleaved: 'interleave_under' (until the first runs out), "
                "'interleave_over' (until all have), 'interleave_once' (every record once)."})
    interleave_probs: str | None = field(default=None, metadata={
        "help": "Interleaving: each dataset's probability, comma-separated."})
    overwrite_cache: bool = field(default=False, metadata={
        "help": "Accepted for LLaMA-Factory recipes: lowmem tokenizes in memory, with no cache to overwrite."})


@dataclass
class MethodArguments:
    """How to train."""

    stage: str = field(default="pt", metadata={
        "help": "'pt': causal-LM pretraining on raw text; 'sft': instruction / chat records, loss on the answers."})
    finetuning_type: str = field(default="full", metadata={
        "help": "'full': every weight trains; 'lora': peft LoRA adapters (use a dense optimizer); 'prefix': peft "
                "prefix tuning (num_virtual_tokens trained key/value prefixes per layer; MeZO's third variant)."})
    lora_rank: int = 8
    lora_alpha: int | None = field(default=None, metadata={"help": "Default: 2 x lora_rank (LLaMA-Factory's)."})
    lora_dropout: float = 0.0
    lora_target: str = field(default="all", metadata={
        "help": "'all' (every linear but the head) or module names, comma-separated."})
    num_virtual_tokens: int = field(default=5, metadata={"help": "Prefix tuning: trained prefix tokens."})
    freeze_trainable_layers: int = field(default=2, metadata={
        "help": "finetuning_type: freeze: train the last N layers (N > 0) or the first -N (N <= 0)."})
    freeze_trainable_modules: str = field(default="all", metadata={
        "help": "freeze: the modules of those layers that train ('all', or e.g. 'self_attn,mlp')."})
    freeze_extra_modules: str | None = field(default=None, metadata={
        "help": "freeze: modules outside the layers that train too (e.g. 'embed_tokens,norm')."})
    plot_loss: bool = field(default=True, metadata={"help": "Save the loss curve as loss.png in output_dir."})


@dataclass
class Recipe:
    model: ModelArguments
    data: DataArguments
    method: MethodArguments
    train: TrainingArguments
    #: What the parse translated (LLaMA-Factory keys), one line each, for the run's first lines.
    notes: list = field(default_factory=list)


SECTIONS = (ModelArguments, DataArguments, MethodArguments, TrainingArguments)
STAGES = ("pt", "sft")
FINETUNING_TYPES = ("full", "lora", "prefix", "freeze")
QUANTIZATION_BITS = (4, 8)
QUANTIZATION_TYPES = ("nf4", "fp4")
#: ``mix_strategy`` -> how ``datasets.interleave_datasets`` stops (None: concatenate), as in LLaMA-Factory.
MIX_STRATEGIES = {"concat": None, "interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
                  "interleave_once": "all_exhausted_without_replacement"}


def recipe_path(name: str) -> Path:
    """A recipe file: a path, or the name of a bundled recipe (``cpu-tiny``)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = RECIPES_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"recipe {name!r} does not exist; give a YAML path or one of: {', '.join(names)}")


def read_values(path: Path, overrides: list[str] = ()) -> dict:
    """The recipe's flat mapping with ``key=value`` overrides applied (values read as YAML)."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must be a mapping of key: value lines, got a {type(values).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not key=value (e.g. max_steps=10)")
        try:
            values[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:  # "[rank", a python tag (safe_load refuses to build objects)
            reason = str(err).splitlines()[0]
            raise ValueError(f"override {item!r}: its value is not plain YAML ({reason}); quote it, e.g. "
                             f"{key.strip()}='{value}'") from None
    return values


def adapt_overrides(recipe: dict, values: dict) -> list[str]:
    """What ``lowmem train`` tells the user about ``values`` (``recipe`` with the command line's overrides), as
    ``warning: ...`` lines; ``values`` is adapted in place:

    * an ``optim`` override without ``optim_args`` drops the recipe's options, naming them: they were written for
      the recipe's own optimizer, and the same key can mean another method (APOLLO-Mini is rank 1, scale 128; a
      GaLore recipe's rank 32, scale 0.25 would silently make it something else). The same optimizer with or
      without ``_layerwise`` keeps them;
    * overrides that change the recipe but not ``output_dir`` write over an earlier run there: named (not when
      resuming)."""
    lines = []
    optim, old = values.get("optim"), recipe.get("optim")
    options = parse_optim_args(values.get("optim_args"))
    if optim != old and values.get("optim_args") == recipe.get("optim_args") and options \
            and without_layerwise(str(optim)) != without_layerwise(str(old)):
        values["optim_args"] = None
        listed = ", ".join(f"{k}={v!r}" for k, v in options.items())
        lines.append(f"warning: optim={optim} runs with its own defaults, not the recipe's optim_args for {old} "
                     f"({listed}); optim_args=... sets {optim}'s options")
    if optim != old and values.get("learning_rate") == recipe.get("learning_rate") and _zeroth_order(optim) \
            and not _zeroth_order(old):
        rate = values.get("learning_rate")
        lines.append(f"warning: optim={optim} keeps the recipe's learning_rate={rate}, chosen for {old}; MeZO steps "
                     "at 1e-7 to 1e-6 for full weights (1e-5 to 1e-4 with LoRA): set learning_rate=...")
    out = values.get("output_dir")
    changed = any(values[k] != recipe.get(k) for k in values)
    if changed and out == recipe.get("output_dir") and out and not values.get("resume_from_checkpoint") \
            and Path(out).is_dir() and any(Path(out).iterdir()):
        lines.append(f"warning: this run (the recipe with overrides) writes over the earlier run in {out}; "
                     "output_dir=... keeps both")
    return lines


def _zeroth_order(name) -> bool:
    """Whether ``name`` is a lowmem zeroth-order optimizer (False for any other name, known or not)."""
    try:
        return get_spec(str(name)).zeroth_order
    except ValueError:
        return False


def parse_recipe(values: dict) -> Recipe:
    """Check every key and value, translate version-specific keys, and build the argument objects."""
    known = {f.name: (section, f) for section in SECTIONS for f in dataclasses.fields(section) if f.init}
    values = dict(values)
    notes = llamafactory.translate(values, set(known))
    values = _translate(values)
    if values.get("bf16") and not values.get("use_cpu") and not has_accelerator():
        values["use_cpu"] = True  # transformers refuses bf16 on a machine without a GPU unless told use_cpu
        notes.append("bf16: true on a machine without a GPU: training on the CPU in bf16 autocast (use_cpu)")
    for key in values:
        if key not in known:
            match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f" Did you mean {match[0]!r}?" if match else ""
            raise ValueError(f"unknown recipe key {key!r}.{hint} Keys are TrainingArguments fields and "
                             f"{', '.join(f.name for s in SECTIONS[:3] for f in dataclasses.fields(s))}.")
    parts = {section: {} for section in SECTIONS}
    for key, value in values.items():
        section, _ = known[key]
        parts[section][key] = _coerce(key, value, typing.get_type_hints(section)[key])
    flat = {key: value for section in SECTIONS for key, value in parts[section].items()}
    model, data, method, train = HfArgumentParser(SECTIONS).parse_dict(flat, allow_extra_keys=False)
    _check(model, data, method, train)
    return Recipe(model, data, method, train, notes)


def interleave_probabilities(data: DataArguments) -> list[float] | None:
    """``interleave_probs`` as floats, one per dataset and summing to 1 (a ``ValueError`` naming the key else)."""
    if data.interleave_probs is None:
        return None
    try:
        probs = [float(p) for p in str(data.interleave_probs).split(",")]
    except ValueError:
        raise ValueError(f"interleave_probs={data.interleave_probs!r}: give probabilities, comma-separated") from None
    if len(probs) != len(str(data.dataset or "").split(",")) or min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
        raise ValueError(f"interleave_probs={data.interleave_probs!r}: one probability per dataset, summing to 1")
    return probs


def has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, ROCm, XPU, MPS...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _translate(values: dict) -> dict:
    """Keys that exist only in transformers 4.57 or only in 5.x, moved to what this version takes."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "warmup_ratio" in values and "warmup_ratio" not in fields:
        FRACTION.check("warmup_ratio", _coerce("warmup_ratio", values["warmup_ratio"], float),
                       " (a fraction of the steps; for all of them give warmup_steps, as transformers 5.x reads a "
                       "warmup of 1 or more as a step count)")
        ratio = values.pop("warmup_ratio")
        if ratio:
            values.setdefault("warmup_steps", float(ratio))  # 5.x: warmup_steps below 1 is a ratio
    if isinstance(values.get("warmup_steps"), float) and values["warmup_steps"] < 1 and "warmup_ratio" in fields:
        values["warmup_ratio"] = values.pop("warmup_steps")  # 4.57: a ratio has its own key
    if "overwrite_output_dir" not in fields:
        values.pop("overwrite_output_dir", None)
    renamed = ("gradient_checkpointing", "activation_checkpointing")  # 4.57 name, 5.x name (the old one deprecated)
    old, new = renamed if "activation_checkpointing" in fields else renamed[::-1]
    if old in values and new in fields:
        values.setdefault(new, values.pop(old))
    return values


def _coerce(key: str, value, annotation):
    """``value`` as the field's type takes it, or a ``ValueError`` naming the key and what it takes. YAML reads
    ``1e-5`` as a string (``1.0e-5`` is a float) and ``no`` as False: those are converted back for fields that take
    numbers or strings; a whole-number field refuses 8.5 and True, a number field NaN / inf, a field without null
    null, and a one-value field a list or a mapping."""
    kinds = _field_kinds(annotation)
    plain = {typing.get_origin(kind) or kind for kind in kinds}
    if key == "fsdp" and isinstance(value, bool):
        return value  # typed str, but transformers asks for fsdp=True (FSDP2 by default)
    if key == "resume_from_checkpoint" and isinstance(value, bool):
        return True if value else None  # true: the newest complete checkpoint in output_dir (train.resume_point)
    if key == "optim_args" and isinstance(value, dict):
        return value  # typed str, but a mapping of options works too (parse_optim_args)
    if value is None:
        if type(None) in plain:
            return None
        raise ValueError(f"recipe key {key!r} takes {_describe(plain)}, got null")
    if isinstance(value, bool):
        if bool in plain:
            return value
        if str in plain:
            return "yes" if value else "no"  # save_strategy: no
        raise ValueError(f"recipe key {key!r} takes {_describe(plain)}, got {value}")
    if isinstance(value, str) and str not in plain and plain & {int, float}:
        try:
            value = float(value) if float in plain or not value.strip().lstrip("+-").isdigit() else int(value)
        except ValueError:
            raise ValueError(f"recipe key {key!r} takes {_describe(plain)}, got {value!r}") from None
    if isinstance(value, (int, float)) and plain & {int, float}:
        if not math.isfinite(value) and not (key in TRAINING and TRAINING[key].holds(value)):  # max_grad_norm: inf
            raise ValueError(f"recipe key {key!r} takes a finite number, got {value}")
        if float not in plain and value != int(value):
            raise ValueError(f"recipe key {key!r} takes a whole number, got {value}")
        return value if float in plain else int(value)
    if not any(isinstance(value, kind) for kind in plain if isinstance(kind, type)):
        raise ValueError(f"recipe key {key!r} takes {_describe(plain)}, got {_shown(value)}")
    return value


def _describe(kinds: set) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list",
             dict: "a mapping", type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(kind, getattr(kind, "__name__", str(kind))) for kind in kinds
                                     if kind is not typing.Literal)) or "a value"


def _shown(value) -> str:
    kind = {list: "a list", dict: "a mapping"}.get(type(value))
    return f"{kind} {value!r}" if kind else repr(value)


def _field_kinds(annotation) -> set:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return set(typing.get_args(annotation))
    return {annotation}


def _check_quantization(model: ModelArguments, method: MethodArguments) -> None:
    bits = model.quantization_bit
    if bits is None:
        return
    if bits not in QUANTIZATION_BITS:
        raise ValueError(f"quantization_bit={bits!r} is not available; use 4 (QLoRA, nf4) or 8 (LLM.int8)")
    if model.quantization_type not in QUANTIZATION_TYPES:
        raise ValueError(f"quantization_type={model.quantization_type!r} is not available; use one of "
                         f"{QUANTIZATION_TYPES}")
    if method.finetuning_type != "lora":
        raise ValueError(f"quantization_bit={bits} loads frozen {bits}-bit base weights that cannot train: set "
                         "finetuning_type: lora (QLoRA trains adapters on top of them)")
    if model.model_name_or_path is None and model.stand_in is None:
        raise ValueError("quantization_bit quantizes a pretrained model: give model_name_or_path, not model_config "
                         "(a model trained from scratch has nothing to freeze)")


def _check(model: ModelArguments, data: DataArguments, method: MethodArguments, train: TrainingArguments) -> None:
    for section in (data, method):
        check_all(section, RECIPE)
    if Path(train.output_dir).exists() and not Path(train.output_dir).is_dir():
        raise ValueError(f"output_dir {train.output_dir!r} is a file; give a folder to write the run into")
    if method.freeze_trainable_layers == 0 and method.finetuning_type == "freeze":
        raise ValueError("freeze_trainable_layers=0 trains no layer: give N > 0 (the last N layers) or N < 0 (the "
                         "first -N)")
    if data.streaming and train.max_steps <= 0:
        raise ValueError("streaming: true reads a dataset of unknown length: set max_steps")
    if method.stage not in STAGES:
        raise ValueError(f"stage={method.stage!r} is not available; use one of {STAGES} (raw-text pretraining, "
                         "instruction fine-tuning)")
    if method.finetuning_type not in FINETUNING_TYPES:
        raise ValueError(f"finetuning_type={method.finetuning_type!r} is not available; use one of "
                         f"{FINETUNING_TYPES}")
    _check_quantization(model, method)
    if data.template is not None:
        from .templates import get_template

        get_template(data.template)
        if method.stage != "sft":
            raise ValueError(f"template: {data.template} renders chats: it needs stage: sft")
    if data.packing and method.stage == "sft" and data.streaming:
        raise ValueError("packing: true with streaming: true is not supported for stage sft; drop one")
    if data.packing is False and method.stage == "pt":
        raise ValueError("packing: false with stage: pt: lowmem always packs pretraining text; remove packing")
    if not 0 <= data.val_size or (data.val_size > 1 and data.val_size != int(data.val_size)):
        raise ValueError(f"val_size={data.val_size}: give a fraction in [0, 1) or a whole count of records")
    if data.mix_strategy not in MIX_STRATEGIES:
        raise ValueError(f"mix_strategy={data.mix_strategy!r} is not available; use one of {', '.join(MIX_STRATEGIES)}")
    if data.interleave_probs is not None and data.mix_strategy == "concat":
        raise ValueError("interleave_probs needs an interleave mix_strategy (it is concat)")
    interleave_probabilities(data)
    if data.val_size and data.eval_dataset:
        raise ValueError("give val_size or eval_dataset, not both (as in LLaMA-Factory)")
    if data.train_on_prompt and data.mask_history:
        raise ValueError("train_on_prompt and mask_history contradict each other; give one")
    if not data.dataset:
        raise ValueError("the recipe needs a dataset: text files or folders, comma-separated, 'python-stdlib', or a "
                         "Hugging Face dataset name")
    if model.stand_in not in (None, "tiny"):
        raise ValueError(f"stand_in={model.stand_in!r}: the only stand-in is 'tiny'")
    if model.stand_in is None and (model.model_name_or_path is None) == (model.model_config is None):
        raise ValueError("give exactly one of model_name_or_path (fine-tune a model) and model_config "
                         "(pretrain from scratch)")
    for key in ("model_name_or_path", "tokenizer", "model_config"):
        value = getattr(model, key)
        if isinstance(value, str) and value.startswith(("/", ".", "~")) and not Path(value).expanduser().exists():
            raise FileNotFoundError(f"{key} {value!r} does not exist (give a local path or a Hugging Face Hub id)")
    if model.model_name_or_path is None and model.stand_in is None and model.tokenizer is None:
        raise ValueError("a from-scratch model_config needs a tokenizer: 'bpe' (trained on the dataset) or a "
                         "hub id / dir")
