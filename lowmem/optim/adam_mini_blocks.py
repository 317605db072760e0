"""Adam-mini's partition of a model's parameters into second-moment blocks, from names and config.

Same substring rules, in the same order, as adam-mini 1.1.1 (on the lower-cased name): ``bias`` ->
plain Adam (``elementwise``); query/key -> one block per head (``heads``); embeddings, output head,
value, attention output and MLP -> one block per output row (``rows``); anything else (norms) -> one
block for the tensor. Names containing ``norm``, ``ln`` or ``bias`` get no weight decay.
``head_numel = dim * dim / n_heads`` (one head's slice of a q/k weight; GQA-safe, as the k weight
holds n_kv_heads such slices), with ``dim`` and ``n_heads`` read from ``model.config`` when not given.

peft's LoRA factors (``...q_proj.lora_A.default.weight``) get one block per row, like the linears they adapt:
adam-mini has no rule for them, and its per-head split of q/k does not fit an ``r``-row factor.
"""

from __future__ import annotations

import torch

EMBEDDING = ("embed", "embd", "wte")
OUTPUT = ("lm_head", "output", "final_layer")
QUERY_KEY = ("k_proj", "q_proj", "wq", "wk", "query", "key")
VALUE = ("v_proj", "wv", "value")
ATTN_OUT = ("o_proj", "wo", "attn.proj")
MLP = ("feed_forward", "linear", "mlp")
LORA = "lora_"


def block_kind(name: str, ndim: int) -> str:
    """The Adam-mini block kind of a parameter called ``name`` with ``ndim`` dimensions."""
    name = name.lower()
    if "bias" in name:
        return "elementwise"
    if LORA in name:
        return "rows" if ndim >= 2 else "tensor"
    if any(k in name for k in QUERY_KEY):
        return "heads"
    if any(k in name for k in EMBEDDING + OUTPUT + VALUE + ATTN_OUT + MLP) and ndim >= 2:
        return "rows"
    return "tensor"


def model_dims(config) -> tuple[int | None, int | None]:
    """(hidden size, attention heads) from a transformers config (LLaMA, Qwen2, Mistral, GPT-2 names)."""
    dim = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return dim, heads


def adam_mini_groups(named_parameters, dim: int | None, n_heads: int | None, weight_decay: float) -> list[dict]:
    """One param group per parameter, keyed for the ``adam_mini`` rule. Frozen tensors are kept, as torch.optim keeps
    them: one unfrozen later trains (until then it has no gradient, so no update and no state)."""
    groups = []
    for item in named_parameters:
        name, param = _named(item)
        kind = block_kind(name, param.dim())
        group = {"params": [param], "param_names": [name], "rule": "adam_mini", "mini_block": kind}
        if kind == "heads":
            if not dim or not n_heads:
                raise ValueError(
                    f"Adam-mini needs the model's hidden size and head count for the query/key weight '{name}': "
                    "pass dim= and n_heads= (e.g. dim=config.hidden_size, n_heads=config.num_attention_heads) "
                    "or model= so they are read from model.config"
                )
            head_numel = dim * dim // n_heads
            if param.numel() % head_numel:
                raise ValueError(
                    f"Adam-mini cannot split '{name}' {tuple(param.shape)} into heads of dim*dim/n_heads = "
                    f"{head_numel} elements: check dim= and n_heads= (head_dim * n_heads must equal dim)"
                )
            group["head_numel"] = head_numel
        lowered = name.lower()
        no_decay = "norm" in lowered or "ln" in lowered or "bias" in lowered
        group["weight_decay"] = 0.0 if no_decay else weight_decay
        groups.append(group)
    return groups


def _named(item) -> tuple[str, torch.Tensor]:
    """A ``(name, tensor)`` pair from ``named_parameters()``, else a ``TypeError`` saying what Adam-mini needs."""
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor):
        return item
    got = "a param group dict" if isinstance(item, dict) else type(item).__name__
    raise TypeError(f"Adam-mini partitions parameters by name, so it takes model.named_parameters() (name, tensor "
                    f"pairs); got {got}. Pass model.named_parameters(), or use create_optimizer('adam_mini', model).")
