"""Which parameters get the low-rank treatment and which get plain AdamW.

Targets are ``nn.Linear`` weights chosen by module name:

* ``None`` (default): attention and MLP linears — module names containing any of ``DEFAULT_TARGETS``
  (LLaMA/Mistral/Qwen ``self_attn.q_proj`` ... ``mlp.down_proj``, GPT-NeoX ``attention``/``mlp``,
  BERT ``attention``/``intermediate.dense``/``output.dense``);
* a list of strings: a module is a target when a string is a substring of its name or fully
  matches it as a regex (as transformers' ``optim_target_modules``);
* a single string: a regex the whole module name must match, or ``"all-linear"`` for every linear
  except the output head.

Embeddings, ``lm_head`` (the model's output embeddings) and norms are never targets; frozen
parameters are skipped entirely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

DEFAULT_TARGETS = (
    "attn", "attention", "mlp", "feed_forward", "ffn",
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "intermediate.dense", "output.dense",
)


@dataclass
class ParameterSplit:
    """Trainable parameters split into low-rank targets and the rest, with their names."""

    targets: list = field(default_factory=list)  # [(name, param)] 2-D nn.Linear weights
    decay: list = field(default_factory=list)  # [(name, param)] other >=2-D params (embeddings, head)
    no_decay: list = field(default_factory=list)  # [(name, param)] biases and norm weights


def _head_weight(model: nn.Module):
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return getattr(head, "weight", None)


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(t in name or re.fullmatch(t, name) for t in targets)


def check_not_lora(model: nn.Module, optimizer: str) -> None:
    """A clear error when a low-rank optimizer meets a LoRA-wrapped model: its trainable weights are the LoRA
    factors, already rank r, so there is nothing left to project."""
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    if lora:
        raise ValueError(
            f"optimizer {optimizer!r} projects the gradients of full weight matrices to save optimizer memory, but "
            f"this model is LoRA-wrapped: its trainable weights are LoRA factors such as '{lora[0]}' (already "
            "low-rank; the base weights are frozen), so there is nothing to project. With LoRA use a dense rule "
            "('adamw', 'adam_mini', 'came', 'adamw_8bit', 'none+came+8bit'); for GaLore's saving, train the full "
            "weights without LoRA."
        )


def split_parameters(model: nn.Module, target_modules=None) -> ParameterSplit:
    """Split ``model``'s trainable parameters for a low-rank optimizer; raise if targets match nothing."""
    explicit = target_modules is not None
    all_linear = target_modules == "all-linear"
    targets = DEFAULT_TARGETS if target_modules is None else target_modules
    if not isinstance(targets, (str, list, tuple)) or (not isinstance(targets, str) and not targets):
        raise ValueError(
            f"target_modules must be a list of module-name substrings, a regex string or 'all-linear'; got {targets!r}"
        )
    head = _head_weight(model)
    chosen: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not weight.requires_grad or weight is head or "lm_head" in mod_name:
            continue
        linear = isinstance(module, nn.Linear) or getattr(weight, "int8_linear", None) is module  # or int8 weights
        hit = linear if all_linear else _matches(mod_name, targets)
        if not hit:
            continue
        if not linear or weight.dim() != 2:
            if explicit and not all_linear:
                raise ValueError(
                    f"target_modules={target_modules!r} matched '{mod_name}' ({type(module).__name__}, weight "
                    f"shape {tuple(weight.shape)}); low-rank optimizers project 2-D nn.Linear weights only. "
                    "Narrow target_modules to linear layers (e.g. ['q_proj', 'v_proj'] or 'all-linear')."
                )
            continue
        chosen[id(weight)] = f"{mod_name}.weight"
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"target_modules={target_modules!r} matched no trainable nn.Linear weight in "
            f"{type(model).__name__}. Linear modules here include {linears}; pass target_modules as "
            "substrings of those names, a regex, or 'all-linear'."
        )
    return _split(model, chosen)


def plain_split(model: nn.Module) -> ParameterSplit:
    """``model``'s trainable parameters with no low-rank targets (for full-rank optimizers)."""
    return _split(model, {})


def _split(model: nn.Module, chosen: dict[int, str]) -> ParameterSplit:
    """Chosen weights (id -> module-derived name) become targets; the rest split by weight decay."""
    split = ParameterSplit()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in chosen:
            split.targets.append((chosen[id(p)], p))
        elif p.dim() < 2:
            split.no_decay.append((name, p))
        else:
            split.decay.append((name, p))
    return split
