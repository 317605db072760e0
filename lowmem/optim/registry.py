"""Optimizer names -> presets + defaults, and ``create_optimizer`` to build one for a model.

``create_optimizer("galore_adamw", model, lr=1e-2, rank=256)`` splits the model's trainable
parameters (see ``targets``), puts the attention/MLP weights in the low-rank group with the name's
defaults, and gives embeddings, the head and norms a plain AdamW group of the same numeric core.
Biases and norm weights get no weight decay. Options are checked before anything is built: an
unknown name or option raises ``ValueError`` listing the valid ones and the closest match.

Besides the fixed names (``REGISTRY``), any ``<method>+<rule>[+<precision>]`` works, e.g.
``"galore+came"``, ``"apollo+adamw+8bit"``, ``"frugal+adam_mini"``, ``"none+adafactor+bf16"``
(the parts: ``composition_parts()``). The method brings its projector, lift and defaults from its
registered name (``galore`` -> ``galore_adamw``); the rule replaces that name's AdamW in every param
group, with the defaults of its own registered name (``came`` -> ``came``); the precision sets
``state_dtype``. ``adamw`` is the method's own numeric core (``adamw_hf`` for GaLore / Fira / APOLLO,
``adamw_torch`` otherwise), so ``"galore+adamw"`` is exactly ``"galore_adamw"``. With ``adam_mini``
the projected weights keep one second moment per row of the projected gradient
(``mini_block="rows"``) and the other parameters follow Adam-mini's partition from names and
``model.config``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..checks import OPTIONS as OPTION_BOUNDS
from ..checks import option_of_its_kind
from ..kernels import newton_schulz
from .adam_mini_blocks import adam_mini_groups, model_dims
from .compose import LowMemOptimizer, check_hyperparameters
from .int8_weights import quantize_linears
from .layerwise import check_accumulation
from .presets import (
    CAME,
    FRUGAL,
    Adafactor,
    AdamMini,
    AdamW8bit,
    APOLLOAdamW,
    BAdam,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    check_adafactor_lr,
)
from .sharded import is_sharded
from .states import BlockwiseQuantStore, make_store
from .targets import check_not_lora, plain_split, split_parameters
from .zo import MeZO

#: Options every name accepts; low-rank names also take ``target_modules`` (which weights to project).
#: ``bf16_stochastic_round``: bf16 weights' updates rounded stochastically (``fused``), set on every param group.
#: ``skip_nonfinite``: a tensor whose gradient has NaN / inf values skips that step's update (``nonfinite``).
#: ``weight_dtype="int8"`` (low-rank names): the projected linears' weights stored in int8 (``int8_weights``).
#: ``dense_state_dtype`` (low-rank names): the state precision of the tensors not projected (embedding, head, norms),
#: when it should differ from ``state_dtype``; an embedding's second moment is never 8-bit (see ``create_optimizer``).
#: ``dense_rule`` (low-rank names): the rule of those tensors when it should not be the name's AdamW: ``"adam_mini"``
#: gives them Adam-mini's partition (one second moment per token of the embedding and the head, per norm tensor):
#: half their state, and the head and embedding still update a range of rows at a time.
#: ``offload_states``: a GPU parameter's states kept in CPU memory between its updates (``offload_states``).
COMMON_OPTIONS = dict(lr=1e-3, weight_decay=0.0, state_dtype=None, layerwise=False, layerwise_accumulation="projected",
                      bf16_stochastic_round=False, skip_nonfinite=True, offload_states=False)
WEIGHT_DTYPES = (None, "int8")
DENSE_RULES = (None, "adam_mini")
_ADAM = dict(betas=(0.9, 0.999))
#: ``<name>_layerwise`` is ``<name>`` with ``layerwise=True``.
LAYERWISE_SUFFIX = "_layerwise"


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
    #: Generic names: the rule every param group runs (None: the class's own) ...
    rule: str | None = None
    #: ... and the options set on every param group (the rule's, ``min_8bit_size``).
    every_group: dict = field(default_factory=dict)
    #: Generic names: the state precision the name fixes (a different ``state_dtype`` is an error).
    precision: str | None = None
    #: The rule of the target group only (Muon: the matrices), the others keeping the name's AdamW.
    target_rule: str | None = None
    #: ``<name>_layerwise``: updates run inside backward.
    layerwise: bool = False
    #: Estimates the gradient from forwards only (``cls(model, **options)``; no states, no layer-wise form).
    zeroth_order: bool = False
    #: Runs in one process only (BAdam: it freezes layers by ``requires_grad``, which DDP and FSDP fix when they wrap).
    single_process: bool = False

    def options(self) -> dict:
        if self.zeroth_order:
            return {"lr": COMMON_OPTIONS["lr"], "weight_decay": 0.0, "skip_nonfinite": True, **self.ctor}
        targets = {"target_modules": None, "weight_dtype": None, "dense_state_dtype": None, "dense_rule": None} \
            if self.low_rank else {}
        return {**COMMON_OPTIONS, **targets, **self.ctor, **self.group, **self.every_group}


_SVD = dict(update_proj_gap=200, proj_type="std", svd_method="exact")
# Muon's options (torch.optim.Muon's, ``eps`` named ``ns_eps``); one lr fits the matrices and AdamW's tensors with
# Moonshot's adjustment, so the name defaults to it (the drop-in ``Muon`` class keeps torch's default).
_MUON = dict(momentum=0.95, nesterov=True, ns_coefficients=newton_schulz.COEFFICIENTS, ns_steps=newton_schulz.STEPS,
             ns_eps=newton_schulz.EPS, adjust_lr_fn="match_rms_adamw")
# Adafactor with an external lr, as the HF Trainer's optim="adafactor" and the GaLore baselines run it.
_ADAFACTOR = dict(eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, scale_parameter=False,
                  relative_step=False, warmup_init=False)
_FRUGAL = dict(**_ADAM, eps=1e-8, update_gap=200, density=0.25, reset_statistics=True, inactive_update_rule="sign_sgd",
               inactive_lr_scale=1.0, proj_params_lr_scale=1.0)

REGISTRY: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec(
        LowMemOptimizer, "full-rank AdamW (torch numeric core): two moments per weight",
        ctor=dict(**_ADAM, eps=1e-8), low_rank=False),
    "galore_adamw": OptimizerSpec(
        GaLoreAdamW, "GaLore: AdamW in the top-r SVD subspace, projected back x scale",
        ctor=dict(**_ADAM, eps=1e-6), group=dict(rank=128, scale=0.25, **_SVD)),
    "apollo_adamw": OptimizerSpec(
        APOLLOAdamW, "APOLLO: channel-wise gradient scaling from a rank-r random sketch",
        ctor=dict(**_ADAM, eps=1e-6, scale_front=False, disable_nl=False),
        group=dict(rank=128, proj="random", scale_type="channel", scale=1.0, update_proj_gap=200, proj_type="std")),
    "apollo_mini": OptimizerSpec(
        APOLLOAdamW, "APOLLO-Mini: tensor-wise scaling from a rank-1 sketch, x sqrt(128); almost no state on "
        "projected weights",
        ctor=dict(**_ADAM, eps=1e-6, scale_front=False, disable_nl=False),
        group=dict(rank=1, proj="random", scale_type="tensor", scale=128.0, update_proj_gap=200, proj_type="std")),
    "fira_adamw": OptimizerSpec(
        FiraAdamW, "Fira: GaLore plus the norm-scaled out-of-subspace residual with a growth limiter",
        ctor=dict(**_ADAM, eps=1e-6), group=dict(rank=128, alpha=0.25, **_SVD)),
    "muon": OptimizerSpec(
        LowMemOptimizer, "Muon: Nesterov momentum orthogonalized by Newton-Schulz on the hidden matrices (target "
        "modules); AdamW on embeddings, head and norms", ctor=dict(**_ADAM, eps=1e-8), group=dict(_MUON),
        target_rule="muon"),
    "sinkgd": OptimizerSpec(
        LowMemOptimizer, "SinkGD: stateless, the hidden matrices' gradients row/column-normalized (SR-Sinkhorn); AdamW "
        "on embeddings, head and norms", ctor=dict(**_ADAM, eps=1e-8), group=dict(sinkgd_iterations=5, sinkgd_eps=1e-8),
        target_rule="sinkgd"),
    "adamw_8bit": OptimizerSpec(
        AdamW8bit, "AdamW with blockwise 8-bit moments (bitsandbytes' scheme, pure torch); an embedding's second "
        "moment and tensors under 4096 elements stay fp32",
        ctor=dict(**_ADAM, eps=1e-8, min_8bit_size=4096, state_dtype="8bit"), low_rank=False),
    "galore_adamw_8bit": OptimizerSpec(
        GaLoreAdamW8bit, "GaLore with blockwise 8-bit moments of the projected gradient",
        ctor=dict(**_ADAM, eps=1e-8, min_8bit_size=4096, state_dtype="8bit"),
        group=dict(rank=128, scale=0.25, **_SVD)),
    "adam_mini": OptimizerSpec(
        AdamMini, "Adam-mini: a full first moment, one second moment per head / row / tensor (partition from names and "
        "config)",
        ctor=dict(**_ADAM, eps=1e-8), low_rank=False, from_model=True),
    "badam": OptimizerSpec(
        BAdam, "BAdam: AdamW on one transformer layer at a time (block coordinate descent), the rest frozen: "
        "gradients and states of one layer", ctor=dict(**_ADAM, eps=1e-8, switch_interval=50, switch_mode="descending",
                                                        start_block=None), low_rank=False, from_model=True,
        single_process=True),
    "adafactor": OptimizerSpec(
        Adafactor, "Adafactor: factored second moment, update clipping; 4(m+n) bytes per m x n weight",
        ctor=_ADAFACTOR, low_rank=False),
    "came": OptimizerSpec(
        CAME, "CAME: Adafactor's factored second moment plus a full, confidence-weighted first moment",
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
for _base in ("adam_mini", "came", "apollo_adamw", "frugal", "frugal_svd", "fira_adamw", "galore_adafactor", "muon"):
    _spec = REGISTRY[_base]
    REGISTRY[_base + "_8bit"] = replace(
        _spec, summary=_spec.summary + "; moments in blockwise 8-bit", ctor={**_spec.ctor, "state_dtype": "8bit"})


# Generic names "<method>+<rule>[+<precision>]".
#: method -> (the registered name whose projector, lift and defaults it reuses, its AdamW numeric core).
METHODS = {
    "none": ("adamw", "adamw_torch"),
    "galore": ("galore_adamw", "adamw_hf"),
    "fira": ("fira_adamw", "adamw_hf"),
    "apollo": ("apollo_adamw", "adamw_hf"),
    "apollo_mini": ("apollo_mini", "adamw_hf"),
    "frugal": ("frugal", "adamw_torch"),
    "frugal_svd": ("frugal_svd", "adamw_torch"),
}
METHOD_ALIASES = {"dense": "none", "identity": "none"}
#: rule -> the registered name whose defaults it takes (None: the method's AdamW, or no options).
RULES = {"adamw": None, "adafactor": "adafactor", "came": "came", "adam_mini": "adam_mini", "muon": "muon",
         "sinkgd": "sinkgd", "sgd": None, "sign_sgd": None}
#: Rules for the target matrices only (the method's AdamW keeps the embeddings, head and norms).
TARGET_RULES = ("muon", "sinkgd")
#: precision -> ``state_dtype``.
PRECISIONS = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "8bit": "8bit"}
_ADAMW_OPTIONS = ("betas", "eps")
_GENERIC_FORM = "'<method>+<rule>[+<precision>]'"


def composition_parts() -> dict[str, list[str]]:
    """The valid parts of a generic name ``<method>+<rule>[+<precision>]``, by position."""
    return {"method": [*METHODS, *METHOD_ALIASES], "rule": list(RULES), "precision": list(PRECISIONS)}


def _parts_help() -> str:
    return "; ".join(f"{pos}s: {', '.join(words)}" for pos, words in composition_parts().items())


def _part(position: str, word: str, name: str) -> str:
    """``word`` if it is a valid ``position`` part, else a ``ValueError`` listing them and the closest."""
    valid = composition_parts()[position]
    if word not in valid:
        raise ValueError(f"unknown {position} {word!r} in optimizer {name!r}.{_closest(word, valid)} "
                         f"Valid {position}s: {', '.join(valid)}.")
    return word


def compose_spec(name: str) -> OptimizerSpec:
    """The spec of a generic name ``<method>+<rule>[+<precision>]`` (see the module docstring)."""
    parts = [part.strip() for part in name.split("+")]
    if len(parts) == 2 and parts[0] in TARGET_RULES and parts[1] in PRECISIONS:  # "muon+8bit": none+muon+8bit
        parts = ["none", *parts]
    if len(parts) not in (2, 3):
        raise ValueError(f"optimizer {name!r} has {len(parts)} parts; a generic name is {_GENERIC_FORM}, "
                         f"e.g. 'galore+came' or 'galore+came+8bit' ({_parts_help()}).")
    method = _part("method", parts[0], name)
    method = METHOD_ALIASES.get(method, method)
    rule = _part("rule", parts[1], name)
    precision = PRECISIONS[_part("precision", parts[2], name)] if len(parts) == 3 else None
    base_name, core = METHODS[method]
    base = REGISTRY[base_name]
    ctor = {k: v for k, v in base.ctor.items() if k not in _ADAMW_OPTIONS}
    if rule in TARGET_RULES:  # e.g. galore+muon: Newton-Schulz on the projected momentum, AdamW elsewhere
        if method == "none":  # the rule's own name: its targets unprojected (e.g. none+muon+8bit is muon_8bit)
            base = REGISTRY[RULES[rule]]
            ctor = dict(base.ctor)
        if precision:
            ctor["state_dtype"] = precision
        summary = (f"{method} projection and lift, {parts[1]} on the target matrices (the method's AdamW elsewhere), "
                   f"states in {precision or 'the gradient dtype'}")
        every_group = {"min_8bit_size": 4096} if precision == "8bit" else {}
        return replace(base, summary=summary, ctor={**base.ctor, **ctor}, every_group=every_group,
                       group={**base.group, **REGISTRY[RULES[rule]].group}, target_rule=rule, precision=precision)
    if rule == "adamw":
        rule, every_group = core, {k: base.ctor[k] for k in _ADAMW_OPTIONS}
    else:
        every_group = dict(REGISTRY[RULES[rule]].ctor) if RULES[rule] else {}
    if precision:
        ctor["state_dtype"] = precision
    if precision == "8bit":
        every_group["min_8bit_size"] = 4096
    summary = f"{method} projection and lift, {parts[1]} moments, states in {precision or 'the gradient dtype'}"
    return replace(base, summary=summary, ctor=ctor, rule=rule, every_group=every_group, precision=precision)


REGISTRY["galore_came"] = replace(
    compose_spec("galore+came"), summary="GaLore + CAME: CAME's confidence-weighted moments of the projected gradient")
REGISTRY["galore_came_8bit"] = replace(
    compose_spec("galore+came+8bit"), summary=REGISTRY["galore_came"].summary + "; moments in blockwise 8-bit")


#: Zeroth-order names: they train from forwards only, so the gradient-based tooling (layer-wise updates, state
#: precisions, the parity and state benchmarks) does not apply to them.
ZEROTH_ORDER: dict[str, OptimizerSpec] = {
    "mezo": OptimizerSpec(
        MeZO, "MeZO: zeroth-order SGD from two perturbed forwards per step; no gradients, no state",
        ctor=dict(lr=1e-6, zo_eps=1e-3, zo_samples=1, seed=0, offload=None, offload_dir=None, offload_layers=None,
                  offload_device=None, noise="auto"), low_rank=False, zeroth_order=True),
}


def available_optimizers() -> list[str]:
    """The registered gradient-based optimizer names (generic ``<method>+<rule>[+<precision>]`` names work too;
    the zeroth-order ones are in ``zeroth_order_optimizers()``)."""
    return sorted(REGISTRY)


def zeroth_order_optimizers() -> list[str]:
    """The zeroth-order names (``"mezo"``): trained from forwards only, with the memory of inference."""
    return sorted(ZEROTH_ORDER)


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.4)
    return f" Did you mean {match[0]!r}?" if match else ""


def without_layerwise(name: str) -> str:
    """``name`` normalized (lower case, ``_`` for ``-``) and without a ``_layerwise`` suffix: the same method."""
    key = name.lower().replace("-", "_")
    return key[:-len(LAYERWISE_SUFFIX)] if key.endswith(LAYERWISE_SUFFIX) and key != LAYERWISE_SUFFIX else key


def get_spec(name: str) -> OptimizerSpec:
    """The spec of a registered or generic name; ``ValueError`` naming the valid names and the closest one."""
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if isinstance(key, str) and without_layerwise(key) != key:
        return replace(get_spec(without_layerwise(key)), layerwise=True)
    if key in REGISTRY:
        return REGISTRY[key]
    if key in ZEROTH_ORDER:
        return ZEROTH_ORDER[key]
    if isinstance(key, str) and "+" in key:
        return compose_spec(key)
    raise ValueError(f"unknown optimizer {name!r}.{_closest(str(name), {**REGISTRY, **ZEROTH_ORDER})} "
                     f"Available: {', '.join(available_optimizers())}; zeroth-order: "
                     f"{', '.join(zeroth_order_optimizers())}. "
                     f"Or compose one as {_GENERIC_FORM}, e.g. 'galore+came+8bit' ({_parts_help()}).")


def check_options(name: str, options: dict) -> dict:
    """The spec's defaults updated with ``options``; ``ValueError`` on an option the name does not take."""
    spec = get_spec(name)
    allowed = spec.options()
    options = dict(options)
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(f"optimizer {name!r} has no option {key!r}.{_closest(key, allowed)} "
                             f"Its options: {', '.join(sorted(allowed))}.")
        if not torch.is_tensor(value):  # a 1-element tensor lr is checked where its group is added
            options[key] = option_of_its_kind(key, value, allowed[key])
            if key in OPTION_BOUNDS and not (value is None and allowed[key] is None):
                OPTION_BOUNDS[key].check(key, options[key])
    opts = {**allowed, **options}
    check_hyperparameters(opts)
    if spec.zeroth_order:
        if spec.layerwise:
            raise ValueError(f"optimizer {name!r} has no layer-wise form: it computes no gradients, so there is "
                             f"nothing to update inside backward. Use {without_layerwise(name)!r}.")
        return opts
    if opts.get("weight_dtype") not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={opts['weight_dtype']!r} is not a weight storage lowmem has: use "
                         "weight_dtype='int8' (the projected linears' weights in int8 with stochastic rounding) or "
                         "leave it unset (the model's own dtype).")
    if opts.get("dense_state_dtype") is not None:
        make_store(opts["dense_state_dtype"])  # an unknown precision is an error now, naming the valid ones
    if opts.get("dense_rule") not in DENSE_RULES:
        raise ValueError(f"dense_rule={opts['dense_rule']!r} is not a rule lowmem gives the tensors it does not "
                         "project: use dense_rule='adam_mini' (one second moment per token of the embedding and "
                         "head) or leave it unset (the name's AdamW).")
    opts["layerwise"] = bool(opts["layerwise"] or spec.layerwise)  # a ``<name>_layerwise`` name sets it
    check_accumulation(opts["layerwise_accumulation"])
    if spec.rule:
        _check_generic(name, spec, options.get("state_dtype"), opts)
    if spec.precision:  # the name's precision wins over an equivalent spelling (torch.bfloat16, "bf16")
        opts["state_dtype"] = spec.precision
    return opts


def _check_generic(name: str, spec: OptimizerSpec, state_dtype, opts: dict) -> None:
    """A generic name's checks the preset classes would otherwise make: precision, tuple sizes, lr."""
    if spec.precision and state_dtype is not None and not _same_storage(state_dtype, spec.precision):
        raise ValueError(f"optimizer {name!r} keeps its states in {spec.precision!r} but state_dtype={state_dtype!r} "
                         "was passed too; drop state_dtype, or change the name's precision part "
                         f"({', '.join(PRECISIONS)}).")
    for key, default in spec.every_group.items():
        value = opts[key]
        if isinstance(default, tuple) and not (isinstance(value, (tuple, list)) and len(value) == len(default)):
            raise ValueError(f"{spec.rule}'s {key} takes {len(default)} values, e.g. {key}={default}; got {value!r}.")
    if spec.rule == "adafactor":
        check_adafactor_lr(opts["lr"], opts["relative_step"], opts["warmup_init"])
    if opts["lr"] is None and (spec.rule != "adafactor" or spec.cls is FRUGAL):
        raise ValueError(f"optimizer {name!r} needs an lr (e.g. lr=1e-3); only Adafactor's relative_step computes "
                         "its own, and FRUGAL's state-free residual steps with the lr.")


def _same_storage(a, b) -> bool:
    """Whether two ``state_dtype`` values store states the same way."""
    store_a, store_b = make_store(a), make_store(b)
    return type(store_a) is type(store_b) and getattr(store_a, "dtype", None) == getattr(store_b, "dtype", None)


def _group(pairs, **keys) -> dict:
    return {"params": [p for _, p in pairs], "param_names": [n for n, _ in pairs], **keys}


def _other_groups(rule: str | None, model: nn.Module, split, weight_decay) -> list[dict]:
    """Groups for the parameters that are not projected: Adam-mini's partition for the adam_mini rule,
    else one group with weight decay and one (biases, norms) without."""
    if rule == "adam_mini":
        rest = {id(p) for _, p in split.decay + split.no_decay}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in rest]
        return adam_mini_groups(named, *model_dims(getattr(model, "config", None)), weight_decay)
    groups = []
    if split.decay:
        groups.append(_group(split.decay))
    if split.no_decay:
        groups.append(_group(split.no_decay, weight_decay=0.0))
    return groups


def create_optimizer(name: str, model: nn.Module, **options) -> LowMemOptimizer | MeZO:
    """Build optimizer ``name`` for ``model``'s trainable parameters: a registered name
    (``available_optimizers()``), a generic ``<method>+<rule>[+<precision>]`` (``composition_parts()``) or a
    zeroth-order name (``zeroth_order_optimizers()``: ``"mezo"``, see ``zo``).

    With ``layerwise=True`` (or a ``<name>_layerwise`` name) every update runs inside backward (see ``layerwise``).
    With 8-bit states, embedding weights keep unquantized states, as transformers does for bitsandbytes: a tiny second
    moment (a rare token's, or a small coordinate beside large ones in its block) rounds to zero in 8 bits and its step
    blows up. They are fp32, or bf16 for a bf16 embedding (fp32's range, so nothing underflows; half the bytes).
    Under AdamW's and Adam-mini's rules only the second moment is (``_first_moments_may_be_8bit``).
    """
    spec = get_spec(name)
    opts = check_options(name, options)
    if spec.zeroth_order:
        return spec.cls(model, **opts)
    layerwise, accumulation = opts.pop("layerwise"), opts.pop("layerwise_accumulation")
    every_group = {key: bool(opts.pop(key)) for key in ("bf16_stochastic_round", "skip_nonfinite")}
    offload = opts.pop("offload_states")
    if spec.cls is BAdam:
        _check_badam(name, model, layerwise, offload)
    if offload:
        _check_offload(name, model)
        every_group["state_device"] = "cpu"
    optimizer = _build(name, spec, model, opts)
    for group in optimizer.param_groups:
        group.update(every_group)
    if spec.cls is not BAdam and any(isinstance(make_store(group["state_dtype"]), BlockwiseQuantStore)
                                     for group in optimizer.param_groups):  # BAdam never trains the embeddings
        _embedding_states_unquantized(optimizer, model)
    if layerwise:
        optimizer.enable_layerwise(accumulation).stream_rows(model)
    optimizer.name = name  # its repr says "galore+came+8bit (", not the class it is built on
    return optimizer


def _check_badam(name: str, model: nn.Module, layerwise: bool, offload: bool) -> None:
    """BAdam freezes all but one layer by ``requires_grad``: refused where that is not how parameters train (layer-wise
    updates, several processes) and with offloaded states (its fp32 master copies stay with the weights)."""
    if layerwise:
        raise ValueError(f"optimizer {name!r} with layerwise=True: BAdam already holds one layer's gradients only; "
                         "drop layerwise")
    if offload:
        raise ValueError(f"optimizer {name!r} with offload_states=True: not supported (BAdam holds one layer's "
                         "states, and its fp32 master copies stay with the weights); drop offload_states")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    if distributed or any(is_sharded(p) for p in model.parameters()):
        raise ValueError(f"optimizer {name!r} on several processes: not supported (BAdam freezes layers by "
                         "requires_grad, which DDP and FSDP fix when they wrap the model); run it in one process, or "
                         "use another optimizer")


def _check_offload(name: str, model: nn.Module) -> None:
    """``offload_states=True`` refused where it would not do what it says: sharded parameters (FSDP2 shards the
    states already; offloading them is FSDP's ``CPUOffloadPolicy``)."""
    if any(is_sharded(p) for p in model.parameters()):
        raise ValueError(f"optimizer {name!r} with offload_states=True on FSDP2-sharded parameters: not supported. "
                         "Each rank already holds 1/world of the states; for CPU offloading under FSDP2 use its "
                         "offload_policy=CPUOffloadPolicy(), or drop offload_states.")


def _build(name: str, spec: OptimizerSpec, model: nn.Module, opts: dict) -> LowMemOptimizer:
    if spec.low_rank:
        check_not_lora(model, name)
        if opts.pop("weight_dtype") == "int8":
            quantize_linears(model, opts["target_modules"])
    if spec.from_model:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # as for every other name
        return spec.cls(trainable, model=model, **opts)
    split = split_parameters(model, opts.pop("target_modules")) if spec.low_rank else plain_split(model)
    group_opts = {k: opts.pop(k) for k in spec.group}
    shared = {k: opts.pop(k) for k in spec.every_group}
    if spec.rule:
        shared["rule"] = spec.rule
    ctor = {k: v for k, v in opts.items() if k in spec.ctor or k in COMMON_OPTIONS}

    groups = []
    if split.targets:
        target_keys = {"is_proj_params": True} if spec.cls is FRUGAL else group_opts
        if spec.target_rule:
            target_keys = {**target_keys, "rule": spec.target_rule}
        if spec.rule == "adam_mini":
            target_keys = {**target_keys, "mini_block": "rows"}
        groups.append(_group(split.targets, **target_keys, **shared))
    dense = {"state_dtype": opts.pop("dense_state_dtype")} if opts.get("dense_state_dtype") is not None else {}
    dense_rule = opts.pop("dense_rule", None)
    others = _other_groups(dense_rule or spec.rule, model, split, ctor["weight_decay"])
    groups += [{**shared, **g, **dense} for g in others]  # a group's own rule (Adam-mini's) wins
    return spec.cls(groups, **ctor)


def _first_moments_may_be_8bit(group: dict, embeddings: list[torch.Tensor]) -> bool:
    """Whether an 8-bit group may keep its ``embeddings``' first moments in 8 bits: under a rule whose second moment
    is per element (AdamW) or per token (Adam-mini's rows partition), kept unquantized, and where each block of the
    first moment lies within one token's row (rows a multiple of the block). Rounding a first moment to zero drops a
    small step; it is the second moment's that blows one up. Measured as stable as full-precision states where 8-bit
    states explode (``tests/test_registry.py::test_embeddings_keep_an_8bit_first_moment_and_stay_stable``)."""
    store = make_store(group.get("state_dtype"))
    rule = group.get("rule", "adamw_torch")
    per_element_or_row = rule in ("adamw_torch", "adamw_hf") or (rule == "adam_mini"
                                                                  and group.get("mini_block") == "rows")
    return per_element_or_row and isinstance(store, BlockwiseQuantStore) and all(
        p.shape[-1] % store.blocksize == 0 for p in embeddings)


def _embedding_states_unquantized(optimizer: LowMemOptimizer, model: nn.Module) -> None:
    """Move the embedding weights of every param group into a copy of that group with fp32 states (bf16 for bf16
    embeddings); under AdamW and Adam-mini, only their second moment (see ``_first_moments_may_be_8bit``)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    embeddings = {id(w) for w in weights}
    full = "bfloat16" if weights and all(w.dtype == torch.bfloat16 for w in weights) else "float32"
    for group in list(optimizer.param_groups):
        keep = [i for i, p in enumerate(group["params"]) if id(p) not in embeddings]
        if len(keep) == len(group["params"]):
            continue
        moved_params = [p for i, p in enumerate(group["params"]) if i not in keep]
        dtype = f"8bit+{full}" if _first_moments_may_be_8bit(group, moved_params) else full
        if not keep:
            group["state_dtype"] = dtype
            continue
        moved = {key: value for key, value in group.items() if key not in ("params", "param_names")}
        names = group.get("param_names")
        moved["params"] = moved_params
        if names:
            moved["param_names"] = [n for i, n in enumerate(names) if i not in keep]
            group["param_names"] = [names[i] for i in keep]
        group["params"] = [group["params"][i] for i in keep]
        optimizer.add_param_group({**moved, "state_dtype": dtype})
