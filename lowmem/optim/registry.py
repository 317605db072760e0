"""Optimizer names -> presets + defaults, and ``create_optimizer`` to build one for a model.

``create_optimizer("galore_adamw", model, lr=1e-2, rank=256)`` splits the model's trainable
parameters (see ``targets``), puts the attention/MLP weights in the low-rank group with the name's
defaults, and gives embeddings, the head and norms a plain AdamW group of the same numeric core.
Biases and norm weights get no weight decay. Options are checked before anything is built: an
unknown name or option raises ``ValueError`` listing the valid ones and the closest match.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

from torch import nn

from .compose import LowMemOptimizer
from .presets import (
    CAME,
    FRUGAL,
    Adafactor,
    AdamMini,
    AdamW8bit,
    APOLLOAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
)
from .targets import plain_split, split_parameters

#: Options every name accepts; low-rank names also take ``target_modules`` (which weights to project).
COMMON_OPTIONS = dict(lr=1e-3, weight_decay=0.0, state_dtype=None)
_ADAM = dict(betas=(0.9, 0.999))


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered name: the class, its constructor defaults and its low-rank group defaults."""

    cls: type
    summary: str
    ctor: dict = field(default_factory=dict)
    group: dict = field(default_factory=dict)
    low_rank: bool = True
    #: Builds the optimizer from the model itself (its names and config) instead of target groups.
    from_model: bool = False

    def options(self) -> dict:
        targets = {"target_modules": None} if self.low_rank else {}
        return {**COMMON_OPTIONS, **targets, **self.ctor, **self.group}


_SVD = dict(update_proj_gap=200, proj_type="std", svd_method="exact")
# Adafactor with an external lr, as the HF Trainer's optim="adafactor" and the GaLore baselines run it.
_ADAFACTOR = dict(eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, scale_parameter=False,
                  relative_step=False, warmup_init=False)
_FRUGAL = dict(**_ADAM, eps=1e-8, update_gap=200, density=0.25, reset_statistics=True, inactive_update_rule="sign_sgd",
               inactive_lr_scale=1.0, proj_params_lr_scale=1.0)

REGISTRY: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(
        LowMemOptimizer, "full-rank AdamW (torch numeric core); 8 B/param of state in fp32",
        ctor=dict(**_ADAM, eps=1e-8), low_rank=False),
    "galore_adamw": OptimizerSpec(
        GaLoreAdamW, "GaLore: AdamW in the top-r SVD subspace, projected back x scale",
        ctor=dict(**_ADAM, eps=1e-6), group=dict(rank=128, scale=0.25, **_SVD)),
    "apollo_adamw": OptimizerSpec(
        APOLLOAdamW, "APOLLO: channel-wise gradient scaling from a rank-r random sketch",
        ctor=dict(**_ADAM, eps=1e-6, scale_front=False, disable_nl=False),
        group=dict(rank=128, proj="random", scale_type="channel", scale=1.0, update_proj_gap=200, proj_type="std")),
    "apollo_mini": OptimizerSpec(
        APOLLOAdamW, "APOLLO-Mini: tensor-wise scaling from a rank-1 sketch, x sqrt(128); SGD-like memory",
        ctor=dict(**_ADAM, eps=1e-6, scale_front=False, disable_nl=False),
        group=dict(rank=1, proj="random", scale_type="tensor", scale=128.0, update_proj_gap=200, proj_type="std")),
    "fira_adamw": OptimizerSpec(
        FiraAdamW, "Fira: GaLore plus the norm-scaled out-of-subspace residual with a growth limiter",
        ctor=dict(**_ADAM, eps=1e-6), group=dict(rank=128, alpha=0.25, **_SVD)),
    "adamw_8bit": OptimizerSpec(
        AdamW8bit, "AdamW with blockwise 8-bit moments (bitsandbytes' scheme, pure torch); 2.03 B/param",
        ctor=dict(**_ADAM, eps=1e-8, min_8bit_size=4096, state_dtype="8bit"), low_rank=False),
    "galore_adamw_8bit": OptimizerSpec(
        GaLoreAdamW8bit, "GaLore with blockwise 8-bit moments of the projected gradient",
        ctor=dict(**_ADAM, eps=1e-8, min_8bit_size=4096, state_dtype="8bit"),
        group=dict(rank=128, scale=0.25, **_SVD)),
    "adam_mini": OptimizerSpec(
        AdamMini, "Adam-mini: one second moment per head / row / tensor (partition from names and config); ~4 B/param",
        ctor=dict(**_ADAM, eps=1e-8), low_rank=False, from_model=True),
    "adafactor": OptimizerSpec(
        Adafactor, "Adafactor: factored second moment, update clipping; 4(m+n) bytes per m x n weight",
        ctor=_ADAFACTOR, low_rank=False),
    "came": OptimizerSpec(
        CAME, "CAME: Adafactor's factored moment plus a confidence-weighted first moment; ~4 B/param",
        ctor=dict(eps=(1e-30, 1e-16), clip_threshold=1.0, betas=(0.9, 0.999, 0.9999)), low_rank=False),
    "galore_adafactor": OptimizerSpec(
        GaLoreAdafactor, "GaLore + Adafactor: factored moments of the projected gradient",
        ctor=_ADAFACTOR, group=dict(rank=128, scale=0.25, **_SVD)),
    "frugal": OptimizerSpec(
        FRUGAL, "FRUGAL (paper's pretraining default): AdamW on 25% of the weight tensors at a time, "
        "descending, sign-SGD on the rest",
        ctor=dict(projection="blocks", block_order="descending", **_FRUGAL)),
    "frugal_svd": OptimizerSpec(
        FRUGAL, "FRUGAL with a GaLore-style SVD subspace (rank = density x dim) and a sign-SGD residual",
        ctor=dict(projection="svd", proj_side="std", svd_method="exact", **_FRUGAL)),
}


# "<name>_8bit": the same optimizer with blockwise 8-bit moments (tensors under 4096 elements stay fp32).
for _base in ("adam_mini", "came", "apollo_adamw", "frugal", "frugal_svd", "fira_adamw", "galore_adafactor"):
    _spec = REGISTRY[_base]
    REGISTRY[_base + "_8bit"] = replace(
        _spec, summary=_spec.summary + "; moments in blockwise 8-bit", ctor={**_spec.ctor, "state_dtype": "8bit"})


def available_optimizers() -> list[str]:
    """The registered optimizer names."""
    return sorted(REGISTRY)


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.4)
    return f" Did you mean {match[0]!r}?" if match else ""


def get_spec(name: str) -> OptimizerSpec:
    """The spec registered under ``name``; ``ValueError`` naming the valid names and the closest one."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}.{_closest(str(name), REGISTRY)} "
                         f"Available: {', '.join(available_optimizers())}.")
    return REGISTRY[key]


def check_options(name: str, options: dict) -> dict:
    """The spec's defaults updated with ``options``; ``ValueError`` on an option the name does not take."""
    spec = get_spec(name)
    allowed = spec.options()
    for key in options:
        if key not in allowed:
            raise ValueError(f"optimizer {name!r} has no option {key!r}.{_closest(key, allowed)} "
                             f"Its options: {', '.join(sorted(allowed))}.")
    return {**allowed, **options}


def create_optimizer(name: str, model: nn.Module, **options) -> LowMemOptimizer:
    """Build optimizer ``name`` for ``model``'s trainable parameters (see ``available_optimizers()``)."""
    spec = get_spec(name)
    opts = check_options(name, options)
    if spec.from_model:
        return spec.cls(model.named_parameters(), model=model, **opts)
    split = split_parameters(model, opts.pop("target_modules")) if spec.low_rank else plain_split(model)
    group_opts = {k: opts.pop(k) for k in spec.group}
    ctor = {k: v for k, v in opts.items() if k in spec.ctor or k in COMMON_OPTIONS}

    def group(pairs, **keys):
        return {"params": [p for _, p in pairs], "param_names": [n for n, _ in pairs], **keys}

    groups = []
    if split.targets:
        target_keys = {"is_proj_params": True} if spec.cls is FRUGAL else group_opts
        groups.append(group(split.targets, **target_keys))
    if split.decay:
        groups.append(group(split.decay))
    if split.no_decay:
        groups.append(group(split.no_decay, weight_decay=0.0))
    return spec.cls(groups, **ctor)
