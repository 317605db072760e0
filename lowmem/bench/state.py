"""Optimizer-state memory: bytes per parameter measured from the actual state tensors after one step, next to the
reference package's figure (measured the same way) and the formula.

The formula column is ``lowmem.memory.optimizer_state_bytes`` (the planner's closed form per parameter: moments on
the projected shape in the state's precision, the stored projector, the limiter scalar), with its text from
``formula_text``; a measured figure that differs from it is a finding, not a rounding.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

#: GaLore's llama_130m.json (vocab 32000, untied), the shape the issue's state table is measured on.
LLAMA_130M = dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024, vocab_size=32000,
                  tie_word_embeddings=False)

_METHODS = ("apollo_mini", "frugal_svd", "galore", "fira", "apollo", "frugal", "badam")
_RULES = {"adamw": ("AdamW", "m, v"), "adam_mini": ("Adam-mini", "m + one v per block"),
          "adafactor": ("Adafactor", "row + column v"), "came": ("CAME", "m + row/column v + row/column residual"),
          "muon": ("Muon", "a momentum"), "sinkgd": ("SinkGD", "nothing")}
_METHOD_TEXT = {
    "none": "{moments} on every weight",
    "galore": "P (min(m,n) x r) + {moments} on r x max(m,n) per projected weight; {rule} elsewhere",
    "fira": "as GaLore + 1 limiter scalar per projected weight",
    "apollo": "{moments} on r x max(m,n) (P regenerated from a seed) per projected weight; {rule} elsewhere",
    "apollo_mini": "{moments} on 1 x max(m,n) per projected weight; {rule} elsewhere",
    "frugal": "{moments} on the active blocks (density) only; {rule} on embeddings, head, norms",
    "frugal_svd": "P (min(m,n) x density*min) + {moments} on the projection; {rule} elsewhere",
    "badam": "{moments} on one transformer layer (+ an fp32 master copy of a bf16 weight); nothing on the rest "
             "(frozen)",
}


def split_name(name: str) -> tuple[str, str, str]:
    """(method, rule, precision) of a registered name, e.g. ``galore_came_8bit`` -> (galore, came, 8bit)."""
    precision = "8bit" if name.endswith("_8bit") else "fp32"
    rest = name.removesuffix("_8bit")
    method = next((m for m in _METHODS if rest == m or rest.startswith(m + "_")), "none")
    rule = rest.removeprefix(method).strip("_") if method != "none" else rest
    return method, rule or "adamw", precision


def formula_text(name: str) -> str:
    """The state formula of ``name`` in words (m x n weight, rank r)."""
    method, rule, precision = split_name(name)
    size = "8-bit: 1 B + 4 B per 256 elements (tensors of 4096+), else 4 B" if precision == "8bit" else "4 B"
    rule_name, moments = _RULES[rule]
    if rule in ("muon", "sinkgd"):  # the target matrices only
        return f"{moments} on each target matrix; AdamW (m, v) elsewhere; {size}"
    return _METHOD_TEXT[method].format(rule=rule_name, moments=moments) + f"; {size}"


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every tensor in ``obj`` (nested dicts / lists, tensor subclasses such as torchao's 8-bit state, and
    plain objects such as galore-torch's projector, which holds its matrix as an attribute), each storage once."""
    seen = set() if seen is None else seen
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if not isinstance(obj, torch.Tensor):
        return tensor_bytes(vars(obj), seen) if hasattr(obj, "__dict__") and not callable(obj) else 0
    if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
        names, _ = obj.__tensor_flatten__()
        return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
    key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
    if key in seen:
        return 0
    seen.add(key)
    return obj.untyped_storage().nbytes()


def optimizer_bytes(optimizer) -> int:
    """Bytes of all of an optimizer's state tensors (shared tables such as bitsandbytes' quantization map once)."""
    seen: set = set()
    return sum(tensor_bytes(state, seen) for state in optimizer.state.values())


@dataclass
class StateRow:
    """One optimizer's state: measured bytes, the formula's, and each reference's (or why there is none)."""

    name: str
    params: int
    ours: int
    formula: int
    references: list[tuple[str, int | None, str]]  # (label, bytes or None, note)

    def per_param(self, value: int | None) -> str:
        return "" if value is None else f"{value / self.params:.3f}"


def random_grads(model: nn.Module, seed: int = 0) -> None:
    """Fixed random gradients on every trainable parameter (a step needs no forward pass to allocate its state)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device, p.dtype)


def state_rows(config: dict, names: list[str], options_for, with_references: bool = True,
               device: str = "cpu") -> list[StateRow]:
    """For each name: one step of lowmem's optimizer and of each reference on a model of ``config`` (fp32, on
    ``device``), and the bytes of their states; ``options_for(name)`` gives the options both are built with."""
    from transformers import AutoModelForCausalLM

    from .. import create_optimizer
    from ..memory import load_config, meta_model, optimizer_state_bytes
    from .references import REFERENCES, reference, references_of

    hf_config = load_config(config)
    model = AutoModelForCausalLM.from_config(hf_config).to(device)
    meta = meta_model(hf_config)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for name in names:
        options = options_for(name)
        random_grads(model)
        ours = create_optimizer(name, model, **options)
        ours.step()
        row = StateRow(name, params, optimizer_bytes(ours), sum(optimizer_state_bytes(name, meta, **options).values()),
                       [])
        del ours
        for key in references_of(name) if with_references else []:
            random_grads(model)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ref = reference(key, model, **options)
                    ref.step()
                row.references.append((REFERENCES[key].label, optimizer_bytes(ref), ""))
                del ref
            except (ImportError, AssertionError, RuntimeError) as err:  # not installed / needs CUDA here
                row.references.append((REFERENCES[key].label, None, f"{type(err).__name__}: {str(err)[:80]}"))
                model = AutoModelForCausalLM.from_config(hf_config).to(device)  # a failed step may reshape weights
        model.zero_grad(set_to_none=True)
        rows.append(row)
    return rows


def state_table(rows: list[StateRow]) -> str:
    """Markdown: B/param measured, formula, reference, and the formula in words."""
    lines = ["| optimizer | B/param (measured) | B/param (formula) | reference | reference B/param | formula |",
             "|---|---:|---:|---|---:|---|"]
    for r in rows:
        refs = r.references or [("—", None, "")]
        for i, (label, value, note) in enumerate(refs):
            first = i == 0
            lines.append(f"| {r.name if first else ''} | {r.per_param(r.ours) if first else ''} | "
                         f"{r.per_param(r.formula) if first else ''} | {label} | "
                         f"{r.per_param(value) if value is not None else note} | "
                         f"{formula_text(r.name) if first else ''} |")
    return "\n".join(lines)
