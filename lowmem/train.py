"""Run a recipe: tokenizer, data, model, the lowmem Trainer, then a memory report and the loss curve.

Everything that can fail on the user's input (the recipe, the paths, the data, the optimizer options) is checked
before the Trainer starts, so a mistake leaves no half-written output directory.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .data import (
    IGNORE,
    dataset_info_entries,
    first_records,
    held_out,
    instruction_dataset,
    load_entries,
    load_records,
    load_text,
    pack,
    pack_examples,
    sample_texts,
    to_messages,
    train_bpe_tokenizer,
)
from .optim.sharded import local
from .optim.states import state_bytes
from .quiet import lora_without_bitsandbytes
from .recipe import MIX_STRATEGIES, Recipe, has_accelerator, interleave_probabilities
from .templates import fix_tokenizer, get_template
from .trainers.checkpoints import newest_complete

#: The model ``stand_in: tiny`` trains instead of the recipe's (any recipe runs in seconds on a CPU, offline).
TINY_CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, vocab_size=512)
#: The largest rank a low-rank optimizer keeps on the stand-in (its weights are 64 wide).
STAND_IN_RANK = 16
#: How much text a stand-in reads when the recipe sets no ``max_bytes``, and the most a BPE tokenizer trains on.
STAND_IN_BYTES = 1_000_000
TOKENIZER_TRAIN_BYTES = 20_000_000


def load_tokenizer(recipe: Recipe, data):
    """The recipe's tokenizer; ``bpe`` (and the stand-in) train one on the leading text of ``data``."""
    model = recipe.model
    if model.stand_in or model.tokenizer == "bpe":
        vocab = TINY_CONFIG["vocab_size"] if model.stand_in else _config_values(model.model_config).get("vocab_size")
        return train_bpe_tokenizer(sample_texts(data, TOKENIZER_TRAIN_BYTES), int(vocab or 32000))
    from transformers import AutoTokenizer

    source = model.tokenizer or model.model_name_or_path
    tokenizer = _load(AutoTokenizer, source, trust_remote_code=model.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(recipe: Recipe, tokenizer):
    """The recipe's model; a from-scratch config gets the tokenizer's vocabulary and pad id (the GaLore configs'
    32000 vocab does not match the T5 tokenizer they train with, and they have no valid pad id). With
    ``quantization_bit`` the base weights load frozen in 4 / 8 bits (QLoRA), the stand-in's included."""
    from transformers import AutoModelForCausalLM

    model_args = recipe.model
    dtype = torch.bfloat16 if model_args.pure_bf16 else None
    quantized = {"quantization_config": quantization_config(recipe)} if model_args.quantization_bit else {}
    if model_args.model_name_or_path and not model_args.stand_in:
        return _load(AutoModelForCausalLM, model_args.model_name_or_path, dtype=dtype,
                     trust_remote_code=model_args.trust_remote_code, **quantized)
    values = dict(TINY_CONFIG) if model_args.stand_in else _config_values(model_args.model_config)
    model_type = values.pop("model_type", "llama")
    values.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = model_config(model_type, values)
    model = AutoModelForCausalLM.from_config(config)
    if quantized:  # the stand-in of a QLoRA recipe: quantized on load, the way a pretrained model is
        return reload_quantized(model, quantized["quantization_config"], dtype)
    return model.to(dtype) if dtype else model


def model_config(model_type: str, values: dict):
    """A from-scratch model's config; one ``ValueError`` line for values transformers refuses or that do not fit."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(model_type, **values)
    except Exception as err:  # transformers 5.x validates configs (strict dataclasses), 4.57 less
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ValueError(f"model_config: {lines[-1] if lines else type(err).__name__}") from None
    _check_shape(config)
    return config


def _check_shape(config) -> None:
    """A from-scratch config whose attention heads do not divide its width (transformers would build other shapes
    than the ones asked for, or fail at the first forward)."""
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if hidden and heads and hidden % heads and getattr(config, "head_dim", None) in (None, hidden // heads):
        raise ValueError(f"model_config: hidden_size={hidden} is not a multiple of num_attention_heads={heads}; "
                         "change one of them")
    if heads and kv and heads % kv:
        raise ValueError(f"model_config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; "
                         "change one of them")


def max_positions(recipe: Recipe) -> int | None:
    """The positions the recipe's model takes (its config only: nothing is built), or None if it does not say."""
    from transformers import AutoConfig

    model_args = recipe.model
    if model_args.stand_in:
        return TINY_CONFIG["max_position_embeddings"]
    if model_args.model_config is not None:
        values = _config_values(model_args.model_config)
        config = model_config(values.pop("model_type", "llama"), values)
    else:
        config = _load(AutoConfig, model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
    return getattr(config, "max_position_embeddings", None)


def reload_quantized(model, quantization_config, dtype=None):
    """``model`` saved and loaded back through transformers' bitsandbytes loader (``quantization_config``): how a
    model built in memory gets the quantized layers a pretrained one gets on load."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as saved:
        model.save_pretrained(saved)
        return AutoModelForCausalLM.from_pretrained(saved, dtype=dtype, quantization_config=quantization_config)


def quantization_config(recipe: Recipe):
    """bitsandbytes' config for ``quantization_bit``: 4-bit (nf4 / fp4, double quantization, computing in the
    training precision) or LLM.int8."""
    from transformers import BitsAndBytesConfig

    model_args = recipe.model
    if model_args.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    bf16 = model_args.pure_bf16 or recipe.train.bf16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.quantization_type,
                              bnb_4bit_use_double_quant=model_args.double_quantization,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)


def _config_values(config) -> dict:
    if isinstance(config, dict):
        return dict(config)
    path = Path(str(config))
    if not path.is_file():
        raise FileNotFoundError(f"model_config {str(config)!r} does not exist (give a config JSON path or an inline "
                                "mapping)")
    return json.loads(path.read_text())


def _load(auto_class, source: str, **kwargs):
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as err:
        raise FileNotFoundError(f"cannot load {source!r}: not a local directory, and not on the Hugging Face Hub "
                                f"from here ({str(err).splitlines()[0]})") from None


def prepare(recipe: Recipe):
    """Tokenizer, datasets (training, and evaluation or None) and model for ``recipe``; raises on bad input before
    anything is written."""
    data_args = recipe.data
    positions = max_positions(recipe)
    if positions is not None and data_args.cutoff_len > positions:
        raise ValueError(f"cutoff_len={data_args.cutoff_len} is beyond the model's {positions} positions "
                         "(max_position_embeddings): lower cutoff_len" + (", or raise max_position_embeddings in "
                                                                          "model_config" if recipe.model.model_config
                                                                          and not recipe.model.stand_in else ""))
    train, held, capped = _raw_data(recipe, data_args.dataset)
    evaluation = _raw_data(recipe, data_args.eval_dataset)[0] if data_args.eval_dataset else held
    cap = None if capped else data_args.max_samples  # lowmem's sources: at most max_samples examples in all
    if recipe.method.stage == "sft":
        tokenizer = load_tokenizer(recipe, ({"text": m["content"]} for r in train for m in to_messages(r)))
        template = get_template(data_args.template) if data_args.template else None
        if template is not None:
            fix_tokenizer(template, tokenizer)

        def tokenized(data, limit):
            cutoff = data_args.cutoff_len - 1 if data_args.packing else data_args.cutoff_len  # as LLaMA-Factory
            examples = instruction_dataset(data, tokenizer, cutoff, limit, template, data_args.train_on_prompt,
                                           data_args.mask_history, data_args.preprocessing_num_workers)
            return pack_examples(examples, data_args.cutoff_len, tokenizer.pad_token_id) if data_args.packing \
                else examples
    else:
        tokenizer = load_tokenizer(recipe, train)

        def tokenized(data, limit):
            return pack(data, tokenizer, data_args.cutoff_len, limit)
    dataset = tokenized(train, cap)
    evaluation = None if evaluation is None else tokenized(evaluation, None)
    seed_everything(recipe.train)
    model = load_model(recipe, tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a template's end-of-turn token was added
        model.resize_token_embeddings(len(tokenizer))
    return tokenizer, (dataset, evaluation), with_adapters(model, recipe.method)


def _raw_data(recipe: Recipe, dataset: str):
    """(training records, held-out records or None, whether ``max_samples`` was applied) of ``dataset``:
    LLaMA-Factory's ``dataset_info.json`` entries (in ``dataset_dir``; ``max_samples`` per entry) or lowmem's own
    sources; ``val_size`` split off."""
    data_args, sft = recipe.data, recipe.method.stage == "sft"
    entries = dataset_info_entries(dataset, data_args.dataset_dir)
    if entries is not None:
        data = load_entries(entries, data_args.max_samples, data_args.streaming, not sft,
                            MIX_STRATEGIES[data_args.mix_strategy], interleave_probabilities(data_args),
                            recipe.train.seed)
    elif sft:
        data = load_records(dataset, config=data_args.dataset_config, streaming=data_args.streaming)
        if data_args.max_samples and data_args.val_size:  # the cap first, so the held-out part is of the capped
            return (*held_out(first_records(data, data_args.max_samples), data_args.val_size, recipe.train.seed), True)
    else:
        limit = data_args.max_bytes or (STAND_IN_BYTES if recipe.model.stand_in else None)
        data = load_text(dataset, config=data_args.dataset_config, text_column=data_args.text_column,
                         streaming=data_args.streaming, limit_bytes=limit)
    return (*held_out(data, data_args.val_size, recipe.train.seed), entries is not None)


def seed_everything(args) -> None:
    """Seed Python, NumPy and torch with the recipe's ``seed`` before the model is built: its initial weights (and
    adapters) come from the global generators, which torch seeds at random in each process, and the Trainer seeds
    them only once the model exists. ``full_determinism`` also asks torch for deterministic algorithms, as the
    Trainer does."""
    from transformers import enable_full_determinism, set_seed

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def with_adapters(model, method):
    """``model`` wrapped with peft LoRA adapters or prefix tuning (base weights frozen); as is for full training."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    if method.finetuning_type == "full":
        return model
    if method.finetuning_type == "freeze":
        return freeze_layers(model, method)
    if method.finetuning_type == "prefix":
        return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                        num_virtual_tokens=method.num_virtual_tokens))
    target = "all-linear" if method.lora_target == "all" else [t.strip() for t in method.lora_target.split(",")]
    config = LoraConfig(task_type="CAUSAL_LM", r=method.lora_rank, lora_alpha=method.lora_alpha or 2 * method.lora_rank,
                        lora_dropout=method.lora_dropout, target_modules=target)
    with lora_without_bitsandbytes(model):  # bitsandbytes is imported for a quantized (QLoRA) model only
        return get_peft_model(model, config)


def freeze_layers(model, method):
    """LLaMA-Factory's ``finetuning_type: freeze``: only the last ``freeze_trainable_layers`` layers (the first
    ``-freeze_trainable_layers`` when it is not positive) train, their ``freeze_trainable_modules``, plus the
    ``freeze_extra_modules`` outside the layers; every other weight is frozen."""
    layers = model.config.num_hidden_layers
    n = method.freeze_trainable_layers
    chosen = range(max(0, layers - n), layers) if n > 0 else range(min(-n, layers))
    modules = [m.strip() for m in method.freeze_trainable_modules.split(",") if m.strip()]
    patterns = [f".{i}." if modules == ["all"] else f".{i}.{m}" for i in chosen for m in modules]
    extra = [m.strip() for m in (method.freeze_extra_modules or "").split(",") if m.strip()]
    names = [name for name, _ in model.named_parameters()]
    for wanted in (modules if modules != ["all"] else []) + extra:
        if not any(f".{wanted}" in name or name.startswith(f"{wanted}.") for name in names):
            raise ValueError(f"freeze: module {wanted!r} is not in the model (its parameters: {names[0]}, ...)")
    trained = 0
    for name, param in model.named_parameters():
        train = any(p in name for p in patterns) or any(m in name for m in extra)  # substrings, as LLaMA-Factory
        param.requires_grad_(train)
        trained += train
    if not trained:
        raise ValueError(f"freeze_trainable_layers={n} trains nothing in a model of {layers} layers")
    return model


def run(recipe: Recipe) -> dict:
    """Train ``recipe`` with the lowmem Trainer; returns the memory report (also written to output_dir)."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    from .trainers import Trainer

    out = Path(recipe.train.output_dir)
    existed = out.exists()
    try:
        resume = resume_point(recipe.train)
        tokenizer, (dataset, evaluation), model = prepare(recipe)
        if recipe.model.stand_in:
            _fit_rank_to_stand_in(recipe.train)
        if not has_accelerator():
            recipe.train.dataloader_pin_memory = False  # nothing to pin for; torch would warn at every epoch
        collator = (DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE) if recipe.method.stage == "sft"
                    else DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer = Trainer(model=model, args=recipe.train, train_dataset=dataset, eval_dataset=evaluation,
                          processing_class=tokenizer, data_collator=collator)
        trainer.create_optimizer()  # optimizer mistakes (options, targets, LoRA) surface before the first step
        trainer.train(resume_from_checkpoint=resume)
    except BaseException:
        if not existed and out.is_dir() and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out)  # this run made it and wrote nothing into it: leave no empty folder behind
        raise
    trainer.save_model()  # every process takes part (FSDP gathers the shards); the main one writes
    report = memory_report(trainer, model)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(out / "trainer_state.json"))  # the loss history, with or without checkpoints
        (out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
        if recipe.method.plot_loss:
            plot_loss(trainer.state.log_history, out / "loss.png")
    return report


def resume_point(args) -> str | None:
    """Where the run resumes: ``resume_from_checkpoint`` as given, or for ``true`` the newest *complete* checkpoint
    in ``output_dir`` (``checkpoints.newest_complete``), found before the model loads."""
    wanted = args.resume_from_checkpoint
    if wanted is not True and str(wanted).lower() not in ("true", "yes"):
        return wanted
    return newest_complete(args.output_dir, not args.save_only_model)


def _fit_rank_to_stand_in(args) -> None:
    """A recipe's rank (128 ... 1024) does not fit the tiny stand-in's 64-wide weights: cap it at 16."""
    from .trainers import parse_optim_args

    options = parse_optim_args(args.optim_args)
    if getattr(args, "lowmem_optim", None) and options.get("rank", 0) > STAND_IN_RANK:
        args.optim_args = {**options, "rank": STAND_IN_RANK}


def memory_report(trainer, model) -> dict:
    """Peak memory of the run and the optimizer state's exact bytes (this process's; with several processes, also
    each one's list: ``..._per_process``, where sharded parameters and state hold their local part)."""
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    state = sum(state_bytes(s) for s in optimizer.state.values() if isinstance(s, dict))  # any torch optimizer
    streamer = getattr(optimizer, "streamer", None)  # offloaded MeZO: blocks are placeholders between turns
    numel = streamer.numel if streamer is not None else torch.Tensor.numel
    report = {
        "parameters": sum(numel(p) for p in model.parameters()),  # a 4-bit weight counts its packed bytes
        "trainable_parameters": sum(numel(p) for p in model.parameters() if p.requires_grad),
        "parameter_bytes": sum(numel(p) * p.element_size() for p in model.parameters()),
        "optimizer_state_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin"
                                                                                else 1024),  # KiB on Linux
    }
    if torch.cuda.is_available():
        report["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        mine = {"parameter_bytes": sum(local(p).numel() * p.element_size() for p in model.parameters()),
                "optimizer_state_bytes": state, "peak_rss_bytes": report["peak_rss_bytes"]}
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        report.update({f"{key}_per_process": [each[key] for each in gathered] for key in mine})
    return report


#: Up to this many logged points, each is drawn as a marker too (one or two points make no visible line).
MARKED_POINTS = 50


def plot_loss(log_history: list[dict], path: Path) -> bool:
    """The training loss against the step, as a PNG (each point marked when there are few); False, and no file
    (an earlier run's is removed), when no loss was logged."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    points = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    if not points:
        path.unlink(missing_ok=True)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*points, strict=True), marker="o" if len(points) <= MARKED_POINTS else None, markersize=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 1.2 or 1.4
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
