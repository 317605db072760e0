"""LLaMA-Factory's recipe keys, translated to lowmem's before a recipe is parsed (``recipe.parse_recipe``).

* **Method keys** (``use_galore`` + ``galore_*``, ``use_apollo`` + ``apollo_*``, ``use_badam`` + ``badam_*``,
  ``use_adam_mini``, ``use_muon``) become
  ``optim``, ``optim_args`` and ``optim_target_modules``, with LLaMA-Factory's defaults for the keys a recipe leaves out
  (``galore_rank: 16``, ``apollo_scale: 32``...), so a recipe means what it meant there. Each translation is reported
  in one line ("use_galore -> optim=galore_adamw_layerwise rank=128 ..."). LLaMA-Factory's own refusals are kept (LoRA
  with GaLore / APOLLO / BAdam, two of them at once, GaLore with an optimizer it has no variant of).
* **What lowmem does not do** stops with one line each: ``deepspeed``, stages ``rm`` / ``ppo`` / ``dpo`` / ``kto``,
  ``report_to`` services that are not installed, other quantization methods than bitsandbytes, BAdam's ratio mode.
* Keys lowmem has no counterpart for (``UNSUPPORTED``, by reason) are dropped when they hold LLaMA-Factory's default
  (``flash_attn: auto``...), and refused with the reason otherwise.

``docs/llamafactory.md`` lists every key and what lowmem does with it.
"""

from __future__ import annotations

import importlib.util

GALORE = {"galore_target": "all", "galore_rank": 16, "galore_update_interval": 200, "galore_scale": 2.0,
          "galore_proj_type": "std", "galore_layerwise": False}
APOLLO = {"apollo_target": "all", "apollo_rank": 16, "apollo_update_interval": 200, "apollo_scale": 32.0,
          "apollo_proj": "random", "apollo_proj_type": "std", "apollo_scale_type": "channel",
          "apollo_layerwise": False, "apollo_scale_front": False}
BADAM = {"badam_mode": "layer", "badam_start_block": None, "badam_switch_mode": "ascending",
         "badam_switch_interval": 50, "badam_update_ratio": 0.05, "badam_mask_mode": "adjacent", "badam_verbose": 0}
#: LLaMA-Factory's optim values GaLore has a variant for, and lowmem's name of that variant.
GALORE_OPTIM = {"adamw_torch": "galore_adamw", "adamw_torch_fused": "galore_adamw", "adamw_8bit": "galore_adamw_8bit",
                "adamw_bnb_8bit": "galore_adamw_8bit", "paged_adamw_8bit": "galore_adamw_8bit",
                "adafactor": "galore_adafactor"}
#: LLaMA-Factory keys lowmem has no counterpart for, by the reason, with LLaMA-Factory's default: a recipe holding the
#: default loses nothing when the key is dropped; any other value is refused with the reason.
UNSUPPORTED = {
    "LLaMA-Factory's own kernels and attention switches (lowmem uses transformers' defaults)": {
        "flash_attn": "auto", "use_unsloth": False, "use_unsloth_gc": False, "enable_liger_kernel": False,
        "shift_attn": False, "mixture_of_depths": None, "use_v1_kernels": False, "use_reentrant_gc": True,
        "upcast_layernorm": False, "upcast_lmhead_output": False,
        "moe_aux_loss_coef": None, "rope_scaling": None, "use_kv_cache": True, "low_cpu_mem_usage": True,
        "use_fast_tokenizer": True, "split_special_tokens": False, "model_revision": "main", "cache_dir": None,
        "offload_folder": "offload", "print_param_status": False, "infer_dtype": "auto", "use_mca": False,
        "use_megatron_bridge": False, "use_hyper_parallel": False, "hyper_parallel_args": None,
        "hyper_parallel_cp_size": 1, "fp8": False, "fp8_backend": "auto", "fp8_enable_fsdp_float8_all_gather": False,
        "enable_torch_profiler": False, "ray_num_workers": 1, "ray_init_kwargs": None, "master_addr": None,
        "master_port": None, "use_kt": False, "include_effective_tokens_per_second": False,
        "hf_hub_token": None, "ms_hub_token": None, "om_hub_token": None},
    "vocabulary changes (lowmem grows the embeddings only for a template's end-of-turn token)": {
        "resize_vocab": False, "add_tokens": None, "add_special_tokens": None, "new_special_tokens_config": None,
        "init_special_tokens": "noise_init"},
    "adapters other than plain LoRA, and loading saved adapters": {
        "adapter_name_or_path": None, "adapter_folder": None, "additional_target": None, "loraplus_lr_ratio": None,
        "loraplus_lr_embedding": 1e-6, "use_rslora": False, "use_dora": False, "pissa_init": False,
        "pissa_iter": 16, "pissa_convert": False, "create_new_adapter": False, "module_dropout": 0.0, "oft_rank": 0,
        "oft_block_size": 32, "oft_target": "all", "use_llama_pro": False},
    "quantization methods other than bitsandbytes": {"quantization_method": "bnb", "quantization_device_map": None},
    "data options lowmem does not have (it tokenizes in memory, trains plain chats without tools, isolates no packed "
    "chats)": {
        "buffer_size": 16384, "neat_packing": False,
        "tokenized_path": None, "media_dir": None, "tool_format": None, "default_system": None,
        "enable_thinking": True, "preserve_thinking": False, "eval_on_each_dataset": False,
        "ignore_pad_token_for_loss": True, "preprocessing_batch_size": 1000, "data_shared_file_system": False,
        "eval_num_beams": None},
    "multimodal models": {
        "image_max_pixels": 768 * 768, "image_min_pixels": 32 * 32, "image_do_pan_and_scan": False,
        "crop_to_patches": False, "video_max_pixels": 256 * 256, "video_min_pixels": 16 * 16, "video_fps": 2.0,
        "video_maxlen": 128, "use_audio_in_video": False, "audio_sampling_rate": 16000, "freeze_vision_tower": True,
        "freeze_multi_modal_projector": True, "freeze_language_model": False},
    "RLHF (lowmem trains stages pt and sft)": {
        "pref_beta": 0.1, "pref_ftx": 0.0, "pref_bco_weight": 0.0, "pref_loss": "sigmoid", "dpo_label_smoothing": 0.0,
        "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0, "simpo_gamma": 0.5, "ppo_buffer_size": 1,
        "ppo_epochs": 4, "ppo_score_norm": False, "ppo_target": 6.0, "ppo_whiten_rewards": False, "ref_model": None,
        "ref_model_adapters": None, "ref_model_quantization_bit": None, "reward_model": None,
        "reward_model_adapters": None, "reward_model_quantization_bit": None, "reward_model_type": "lora",
        "ld_alpha": None, "use_dft_loss": False, "use_asft_loss": False, "asft_alpha": 0.1, "use_eaft_loss": False,
        "eaft_alpha": 1.0},
    "inference, export and generation (lowmem trains; load its saved model with transformers)": {
        "infer_backend": "huggingface", "vllm_maxlen": 4096, "vllm_gpu_util": 0.7, "vllm_enforce_eager": False,
        "vllm_max_lora_rank": 32, "vllm_config": None, "sglang_maxlen": 4096, "sglang_mem_fraction": 0.7,
        "sglang_tp_size": -1, "sglang_config": None, "sglang_lora_backend": "triton", "export_dir": None,
        "export_size": 5, "export_device": "cpu", "export_quantization_bit": None, "export_quantization_dataset": None,
        "export_quantization_nsamples": 128, "export_quantization_maxlen": 1024, "export_legacy_format": False,
        "export_hub_model_id": None, "do_sample": True, "temperature": 0.95, "top_p": 0.7, "top_k": 50,
        "num_beams": 1, "max_length": 1024, "max_new_tokens": 1024, "repetition_penalty": 1.0,
        "length_penalty": 1.0, "skip_special_tokens": True},
    "SwanLab's own keys (report_to: swanlab goes through transformers)": {
        "use_swanlab": False, "swanlab_project": "llamafactory", "swanlab_workspace": None, "swanlab_run_name": None,
        "swanlab_mode": "cloud", "swanlab_api_key": None, "swanlab_logdir": None, "swanlab_lark_webhook_url": None,
        "swanlab_lark_secret": None},
    "evaluation metrics and early stopping of LLaMA-Factory's trainer": {
        "compute_accuracy": False, "early_stopping_steps": None, "disable_shuffling": False,
        "train_from_scratch": False},
}
#: report_to value -> the package it needs.
REPORTERS = {"wandb": "wandb", "tensorboard": "tensorboard", "swanlab": "swanlab", "mlflow": "mlflow",
             "comet_ml": "comet_ml", "clearml": "clearml", "neptune": "neptune", "dvclive": "dvclive",
             "trackio": "trackio", "aim": "aim"}
REFUSED_STAGES = {"rm": "reward modelling", "ppo": "PPO", "dpo": "DPO", "kto": "KTO"}


#: Keys only a LLaMA-Factory recipe has: a recipe with one of them gets LLaMA-Factory's defaults where lowmem's differ
#: (``finetuning_type: lora``, gradient checkpointing on).
MARKERS = ("template", "dataset_dir", "do_train", "overwrite_cache", "use_galore", "use_apollo", "use_badam",
           "use_adam_mini", "use_muon", "disable_gradient_checkpointing")


def translate(values: dict, fields: set) -> list[str]:
    """Rewrite LLaMA-Factory keys in ``values`` (a recipe's flat mapping) into lowmem's, in place; the lines that
    report each translation. ``fields``: lowmem's own recipe keys (a key both know keeps its meaning)."""
    _refuse(values)
    notes = _defaults(values) if any(key in values for key in MARKERS) else []
    for reason, keys in UNSUPPORTED.items():
        for key in [k for k in keys if k in values and k not in fields]:
            value = values.pop(key)
            if value != keys[key]:
                raise ValueError(f"{key}: {value!r} is a LLaMA-Factory setting lowmem does not have: {reason}. "
                                 f"Remove the key (lowmem runs as {key}: {keys[key]!r})")
    methods = [m for m in ("use_galore", "use_apollo", "use_badam") if values.get(m)]
    if len(methods) > 1:
        raise ValueError(f"{' and '.join(methods)}: use one of GaLore, APOLLO or BAdam (as LLaMA-Factory asks)")
    if methods and values.get("finetuning_type", "lora") == "lora":
        raise ValueError(f"{methods[0]} with finetuning_type: lora: GaLore, APOLLO and BAdam train full weights; set "
                         "finetuning_type: full (LLaMA-Factory refuses this too)")
    notes += _method(values, "use_galore", GALORE, _galore)
    notes += _method(values, "use_apollo", APOLLO, _apollo)
    notes += _method(values, "use_badam", BADAM, _badam)
    dense = [flag for flag in ("use_adam_mini", "use_muon") if values.pop(flag, False)]
    if len(methods) + len(dense) > 1:
        raise ValueError(f"{' and '.join(methods + dense)}: give one optimizer")
    for flag in dense:
        values["optim"] = flag.removeprefix("use_")
        notes.append(f"{flag} -> optim={values['optim']}")
    return notes


def _defaults(values: dict) -> list[str]:
    """LLaMA-Factory's defaults where lowmem's differ, for a recipe written for it."""
    notes = []
    if "finetuning_type" not in values:
        values["finetuning_type"] = "lora"
        notes.append("finetuning_type not given: lora, LLaMA-Factory's default (lowmem's own is full)")
    disabled = values.pop("disable_gradient_checkpointing", False)
    if not any(key in values for key in ("gradient_checkpointing", "activation_checkpointing")):
        values["gradient_checkpointing"] = not disabled  # LLaMA-Factory checkpoints unless told not to
    return notes


def _refuse(values: dict) -> None:
    where = str(values.get("dataset_dir") or "")
    if where == "ONLINE" or where.startswith("REMOTE:"):
        raise ValueError(f"dataset_dir: {where}: lowmem reads a local dataset_info.json; download the datasets or "
                         "name Hub datasets directly in dataset (without dataset_dir)")
    if values.get("deepspeed"):
        raise ValueError("deepspeed: lowmem does not run DeepSpeed; on several GPUs its optimizers run on FSDP2 "
                         "(fsdp: full_shard, fsdp_config: {fsdp_version: 2}); remove the deepspeed key")
    stage = values.get("stage")
    if stage in REFUSED_STAGES:
        raise ValueError(f"stage: {stage} ({REFUSED_STAGES[stage]}) is not a lowmem stage; lowmem trains stage pt "
                         "(pretraining) and sft (instruction fine-tuning)")
    report_to = values.get("report_to")
    for service in [report_to] if isinstance(report_to, str) else (report_to if isinstance(report_to, list) else []):
        package = REPORTERS.get(service)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"report_to: {service} needs the {package!r} package, which is not installed: "
                             f"pip install {package}, or report_to: none")


def _method(values: dict, flag: str, defaults: dict, build) -> list[str]:
    """Pop ``flag`` and its keys; when the flag is on, set the optimizer they describe."""
    on = values.pop(flag, False)
    given = {key: values.pop(key) for key in defaults if key in values}
    if not on:
        return [f"{', '.join(given)} without {flag}: not used, as in LLaMA-Factory"] if given else []
    return [build(values, {**defaults, **given})]


def _targets(values: dict, target: str) -> str:
    """LLaMA-Factory's targets: ``all`` is every linear but the head; else module names, comma-separated."""
    values["optim_target_modules"] = "all-linear" if target == "all" else \
        [t.strip() for t in str(target).split(",") if t.strip()]
    return f"targets={target}"


def _galore(values: dict, keys: dict) -> str:
    optim = values.get("optim", "adamw_torch")
    if optim not in GALORE_OPTIM:
        raise ValueError(f"use_galore with optim: {optim}: GaLore has variants of {', '.join(GALORE_OPTIM)} (as in "
                         "LLaMA-Factory)")
    name = GALORE_OPTIM[optim] + ("_layerwise" if keys["galore_layerwise"] else "")
    options = {"rank": keys["galore_rank"], "update_proj_gap": keys["galore_update_interval"],
               "scale": keys["galore_scale"], "proj_type": keys["galore_proj_type"]}
    return _set(values, "use_galore", name, options, keys["galore_target"])


def _apollo(values: dict, keys: dict) -> str:
    optim = values.get("optim", "adamw_torch")
    if optim not in ("adamw_torch", "adamw_torch_fused"):
        raise ValueError(f"use_apollo with optim: {optim}: APOLLO is an AdamW variant; use optim: adamw_torch (as in "
                         "LLaMA-Factory)")
    name = "apollo_adamw" + ("_layerwise" if keys["apollo_layerwise"] else "")
    options = {"rank": keys["apollo_rank"], "update_proj_gap": keys["apollo_update_interval"],
               "scale": keys["apollo_scale"], "proj": keys["apollo_proj"], "proj_type": keys["apollo_proj_type"],
               "scale_type": keys["apollo_scale_type"], "scale_front": keys["apollo_scale_front"]}
    return _set(values, "use_apollo", name, options, keys["apollo_target"])


#: LLaMA-Factory's optim values BAdam wraps, and the state precision lowmem's BAdam gives them.
BADAM_OPTIM = {"adamw_torch": None, "adamw_torch_fused": None, "adamw_8bit": "8bit", "adamw_bnb_8bit": "8bit",
               "paged_adamw_8bit": "8bit"}


def _badam(values: dict, keys: dict) -> str:
    optim = values.get("optim", "adamw_torch")
    if optim not in BADAM_OPTIM:
        raise ValueError(f"use_badam with optim: {optim}: lowmem's BAdam runs AdamW ({', '.join(BADAM_OPTIM)})")
    if keys["badam_mode"] != "layer":
        raise ValueError(f"badam_mode: {keys['badam_mode']}: lowmem's BAdam is the layer mode (one transformer layer "
                         "at a time); the ratio mode is not in lowmem")
    if keys["badam_switch_interval"] == -1:
        raise ValueError("badam_switch_interval: -1 (LLaMA-Factory documents it as 'never switch', but BAdam then "
                         "switches every step): for one block, set badam_switch_mode: fixed and badam_start_block")
    options = {"switch_interval": keys["badam_switch_interval"], "switch_mode": keys["badam_switch_mode"],
               "start_block": keys["badam_start_block"]}
    if BADAM_OPTIM[optim]:
        options["state_dtype"] = BADAM_OPTIM[optim]
    unused = [k for k in ("badam_update_ratio", "badam_mask_mode") if keys[k] != BADAM[k]]
    note = f" ({', '.join(unused)}: the ratio mode's, not used)" if unused else ""
    return _set(values, "use_badam", "badam", options, None) + note


def _set(values: dict, flag: str, name: str, options: dict, target: str | None) -> str:
    """The optimizer ``name`` with ``options`` (the recipe's own ``optim_args`` win)."""
    from .trainers.arguments import parse_optim_args

    options = {**options, **parse_optim_args(values.get("optim_args"))}
    values["optim"] = name
    values["optim_args"] = ", ".join(f"{key}={value!r}" for key, value in options.items())
    targets = f" {_targets(values, target)}" if target else ""
    return f"{flag} -> optim={name} {' '.join(f'{k}={v}' for k, v in options.items())}{targets}"
