"""The reference implementation of each lowmem optimizer name, built with exactly the settings lowmem resolved.

``reference(name, model, **options)`` first builds lowmem's own optimizer with ``lowmem.create_optimizer`` (cheap:
no state exists before a step), then hands its param groups, with the lowmem-only keys dropped, to the reference
class: the same tensors, the same ranks, scales, gaps, betas and eps, so any difference in time, memory or loss is
the implementation's. The references are the packages the parity tests compare against (``pip install
lowmem[bench]``); a name without one (FRUGAL, the composed and most 8-bit names) has no entry.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

#: Param-group keys only lowmem reads; the references get the rest (rank, scale, update_proj_gap, ...).
LOWMEM_KEYS = {"rule", "projector", "lift", "state_dtype", "svd_method", "param_names", "mini_block", "head_numel",
               "min_8bit_size", "is_proj_params"}


@dataclass(frozen=True)
class Reference:
    """A reference optimizer: its label (package.Class) and how to build it from lowmem's param groups."""

    label: str
    build: Callable  # (groups, defaults, model) -> torch.optim.Optimizer


def _groups(optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in LOWMEM_KEYS} for g in optimizer.param_groups]


def _torch_adamw(groups, d, model):
    import torch

    return torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])


def _bnb_adamw8bit(groups, d, model):
    """bitsandbytes' AdamW8bit with embeddings' states in 32 bits, as transformers' Trainer sets it up (and as
    lowmem's 8-bit names do)."""
    import bitsandbytes as bnb

    optimizer = bnb.optim.AdamW8bit(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                    weight_decay=d["weight_decay"], min_8bit_size=d.get("min_8bit_size", 4096))
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def _torchao_adamw8bit(groups, d, model):
    """torchao's AdamW8bit (blockwise 8-bit states as a tensor subclass; compiled), all weights in 8 bits above its
    4096-element threshold."""
    from torchao.optim import AdamW8bit

    return AdamW8bit(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])


def _galore(cls_name):
    def build(groups, d, model):
        import galore_torch

        cls = getattr(galore_torch, cls_name)
        if cls_name == "GaLoreAdafactor":
            return cls(groups, lr=d["lr"], eps=d["eps"], clip_threshold=d["clip_threshold"],
                       decay_rate=d["decay_rate"], beta1=d["beta1"], weight_decay=d["weight_decay"],
                       scale_parameter=d["scale_parameter"], relative_step=d["relative_step"],
                       warmup_init=d["warmup_init"])
        return cls(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])
    return build


def _apollo(groups, d, model):
    import apollo_torch

    return apollo_torch.APOLLOAdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                    weight_decay=d["weight_decay"])


def _fira(groups, d, model):
    import fira

    return fira.FiraAdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])


def _adam_mini(groups, d, model):
    from adam_mini import Adam_mini

    config = model.config
    return Adam_mini(model.named_parameters(), lr=d["lr"], betas=d["betas"], eps=d["eps"],
                     weight_decay=d["weight_decay"], dim=config.hidden_size, n_heads=config.num_attention_heads,
                     n_kv_heads=getattr(config, "num_key_value_heads", None), verbose=False)


def _came(groups, d, model):
    from came_pytorch import CAME

    return CAME(groups, lr=d["lr"], eps=d["eps"], clip_threshold=d["clip_threshold"], betas=d["betas"],
                weight_decay=d["weight_decay"])


def _hf_adafactor(groups, d, model):
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=d["lr"], eps=d["eps"], clip_threshold=d["clip_threshold"],
                     decay_rate=d["decay_rate"], beta1=d["beta1"], weight_decay=d["weight_decay"],
                     scale_parameter=d["scale_parameter"], relative_step=d["relative_step"],
                     warmup_init=d["warmup_init"])


class _Together:
    """Several torch optimizers stepped as one (torch.optim.Muon on the matrices, AdamW on the rest), as Muon's users
    run them: ``step``, ``zero_grad``, ``state`` and ``param_groups`` over all."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    def step(self, closure=None):
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def state(self) -> dict:
        return {p: s for optimizer in self.optimizers for p, s in optimizer.state.items()}

    @property
    def param_groups(self) -> list[dict]:
        return [g for optimizer in self.optimizers for g in optimizer.param_groups]


def _torch_muon(groups, d, model):
    """lowmem's first group (the matrices) under torch.optim.Muon with the same options, the rest under AdamW."""
    import torch

    matrices, rest = groups[0], groups[1:]
    muon = torch.optim.Muon(matrices["params"], lr=d["lr"], weight_decay=d["weight_decay"], momentum=d["momentum"],
                            nesterov=d["nesterov"], ns_coefficients=d["ns_coefficients"], eps=d["ns_eps"],
                            ns_steps=d["ns_steps"], adjust_lr_fn=d["adjust_lr_fn"])
    return _Together(muon, _torch_adamw(rest, d, model))


REFERENCES: dict[str, Reference] = {
    "adamw": Reference("torch.optim.AdamW", _torch_adamw),
    "adamw_8bit": Reference("bitsandbytes.optim.AdamW8bit", _bnb_adamw8bit),
    "adamw_8bit:torchao": Reference("torchao.optim.AdamW8bit", _torchao_adamw8bit),
    "galore_adamw": Reference("galore_torch.GaLoreAdamW", _galore("GaLoreAdamW")),
    "galore_adamw_8bit": Reference("galore_torch.GaLoreAdamW8bit", _galore("GaLoreAdamW8bit")),
    "galore_adafactor": Reference("galore_torch.GaLoreAdafactor", _galore("GaLoreAdafactor")),
    "apollo_adamw": Reference("apollo_torch.APOLLOAdamW", _apollo),
    "apollo_mini": Reference("apollo_torch.APOLLOAdamW", _apollo),
    "fira_adamw": Reference("fira.FiraAdamW", _fira),
    "adam_mini": Reference("adam_mini.Adam_mini", _adam_mini),
    "came": Reference("came_pytorch.CAME", _came),
    "adafactor": Reference("transformers Adafactor", _hf_adafactor),
    "muon": Reference("torch.optim.Muon + AdamW", _torch_muon),
}


def references_of(name: str) -> list[str]:
    """The ``REFERENCES`` keys for lowmem's ``name``: ``name`` itself and ``name:package`` for a second one."""
    return [key for key in REFERENCES if key.split(":")[0] == name]


def reference(key: str, model: nn.Module, **options):
    """The reference optimizer ``key`` (a lowmem name, or ``name:package``) on ``model``'s parameters, with lowmem's
    resolved settings for that name; raises ``KeyError`` for a key without one and ``ImportError`` (naming the
    extra) when its package is missing."""
    from .. import create_optimizer
    from ..optim.registry import get_spec

    ref = REFERENCES[key]
    name = key.split(":")[0]
    ours = create_optimizer(name, model, **options)
    defaults = {**get_spec(name).options(), **options, **{k: v for k, v in ours.defaults.items()
                                                          if k not in LOWMEM_KEYS}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the packages' deprecation chatter
            return ref.build(_groups(ours), defaults, model)
    except ModuleNotFoundError as err:
        raise ImportError(f"{ref.label} is not installed ({err.name}): pip install 'lowmem[bench]'") from err
