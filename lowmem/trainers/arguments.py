"""``TrainingArguments`` whose ``optim`` takes every lowmem optimizer name as well as transformers' own.

``optim="galore_adamw"`` (a registry name) or ``"galore+came+8bit"`` (a generic one) picks lowmem's optimizer;
lowmem's names win where transformers has the same one (``galore_adamw``, ``apollo_adamw``, ``adafactor``,
``adamw_8bit``...), since lowmem's need no extra package and resume through the Trainer's ``weights_only``
loader. Any other transformers name passes through unchanged. ``optim_args`` is transformers' string
(``"rank=64, update_proj_gap=100, scale=0.25"``, values read as Python literals) or a dict; it and the name are
checked when the arguments are built, so a typo fails before any model is loaded.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass, field

import torch
import transformers
from transformers.training_args import OptimizerNames

from ..checks import TRAINING, TRAINING_HINTS, check_all
from ..optim.registry import check_options, get_spec
from .checkpoints import RESUME_OPTIMIZER

#: TrainingArguments fields that become optimizer options, where the optimizer takes them in this form.
_ADAM_FIELDS = ("adam_beta1", "adam_beta2", "adam_epsilon")


def parse_optim_args(optim_args) -> dict:
    """``optim_args`` as a dict: a dict as is, or transformers' ``"key=value, key=value"`` string with each value
    read as a Python literal where it is one (``64``, ``0.25``, ``(0.9, 0.95)``) and kept as a string otherwise."""
    if optim_args is None or optim_args == "":
        return {}
    if isinstance(optim_args, dict):
        return dict(optim_args)
    options = {}
    for item in _split_top_level(str(optim_args)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"optim_args item {item!r} is not key=value; "
                             'write e.g. optim_args="rank=64, scale=0.25"')
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            text = value.strip()  # YAML's spelling of a flag, as recipes write it (nesterov=true)
            options[key.strip()] = {"true": True, "false": False}.get(text.lower(), text)
    return options


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``betas=(0.9, 0.95)`` stays one item."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in (i.strip() for i in items) if item]


def is_lowmem_name(name: str) -> bool:
    """Whether ``name`` is a lowmem registry name or a valid generic ``<method>+<rule>[+<precision>]``."""
    try:
        get_spec(name)
    except ValueError:
        return False
    return True


def _transformers_names() -> set[str]:
    return {member.value for member in OptimizerNames}


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' ``TrainingArguments``; ``optim`` also takes lowmem's names (see the module docstring).

    For a lowmem name, ``learning_rate``, ``weight_decay``, ``adam_beta1/2`` and ``adam_epsilon`` reach the optimizer
    wherever it takes them in that form (CAME's three betas and the factored rules' eps pair come from
    ``optim_args``), ``optim_args`` overrides them, and ``optim_target_modules`` picks the projected weights.

    Layer-wise names (``"galore_adamw_layerwise"``, or ``optim_args="layerwise=True"``) update each weight inside
    backward, so gradients cannot be clipped by their global norm: ``max_grad_norm`` defaults to 0 for them (to
    1.0 otherwise, as in transformers), and an explicit positive value is an error. They also refuse fp16
    (its loss scaling reaches the update unscaled; use bf16) and more than one process (DDP reduces gradients
    after the hooks have used them).

    ``optim="mezo"`` (zeroth-order) likewise has ``max_grad_norm`` 0 by default and refuses a positive one, fp16 and
    more than one process; its options (``zo_eps``, ``zo_samples``, ``seed``) come through ``optim_args``.

    ``linear_cross_entropy=True`` has the lowmem ``Trainer`` patch a LLaMA / Qwen2 / Mistral model (peft-wrapped or
    not) so that its loss comes from the last hidden states and the head's weight a block of vocabulary at a time,
    never the ``tokens x vocab`` logits (``lowmem.kernels.model_patch``); MeZO refuses it (it perturbs the head
    through its forward, so the logits would be computed anyway). Left unset (None), the Trainer turns it on where
    it is exact and nothing else needs the training logits (``trainers.trainer.linear_ce_by_default``), as
    ``lowmem plan`` prices it; ``False`` keeps the model's own loss.
    """

    optim: str = field(default=transformers.TrainingArguments.__dataclass_fields__["optim"].default, metadata={
        "help": "A lowmem optimizer (see lowmem.available_optimizers(); also '<method>+<rule>[+<precision>]' and "
                "'<name>_layerwise') or a transformers OptimizerNames value."})
    max_grad_norm: float | None = field(default=None, metadata={
        "help": "Max gradient norm (default 1.0; 0 for layer-wise lowmem optimizers, which cannot clip)."})
    linear_cross_entropy: bool | None = field(default=None, metadata={
        "help": "Compute a LLaMA / Qwen2 / Mistral causal LM's loss without materializing its logits (linear + "
                "cross-entropy a block of vocabulary at a time; Triton kernels on CUDA). The model then returns "
                "logits=None when given labels in training. Default (unset): on for those models in one process "
                "with the Trainer's own loss and a gradient-based optimizer; False keeps the logits."})
    resume_optimizer: str = field(default="check", metadata={
        "help": "On resume: 'check' (the checkpoint's optimizer and options must be this run's; only learning_rate "
                "may change), 'reset' (fresh optimizer state from the saved weights; the step and schedule continue) "
                "or 'keep' (load the saved optimizer state unchecked: a checkpoint that records no optimizer)."})
    ignore_checksums: bool = field(default=False, metadata={
        "help": "On resume, load the checkpoint's files without checking them against its manifest (sizes and "
                "SHA-256), for checkpoints edited by hand."})

    def __post_init__(self):
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # launched by torchrun on a machine with no GPU: without use_cpu, accelerate starts the process group
            # yet runs each process alone (every one training on all the data); with it, gloo DDP or FSDP2
            self.use_cpu = True
        check_all(self, TRAINING, TRAINING_HINTS)  # learning_rate=inf, max_steps=0...: one line naming the key
        if self.max_steps == -1 and self.num_train_epochs == 0:
            raise ValueError("num_train_epochs=0 with max_steps=-1 trains nothing: give epochs, or max_steps")
        if self.resume_optimizer not in RESUME_OPTIMIZER:
            raise ValueError(f"resume_optimizer={self.resume_optimizer!r}: use one of {', '.join(RESUME_OPTIMIZER)}")
        self.max_grad_norm_given = self.max_grad_norm is not None
        if self.max_grad_norm is None:
            self.max_grad_norm = 1.0
        name = self.optim.value if isinstance(self.optim, OptimizerNames) else str(self.optim)
        if not is_lowmem_name(name):
            if name not in _transformers_names():
                get_spec(name)  # raises: lowmem's names, the closest match and the generic spelling
            self.lowmem_optim = None
            super().__post_init__()
            return
        self.lowmem_optim = name
        if self.deepspeed:
            raise ValueError(f"optim={name!r} with DeepSpeed: ZeRO flattens the parameters into 1-D buffers, so an "
                             "optimizer that reads each weight's shape (projections, factored or per-row moments) "
                             "would see none. Shard with FSDP2 instead: fsdp=True (fsdp_config={'version': 2}, "
                             "torch.distributed.fsdp.fully_shard), which keeps every weight's shape.")
        self.optim = OptimizerNames.ADAMW_TORCH  # the parent's enum check; restored below
        super().__post_init__()
        self.optim = name
        options = self.lowmem_options()  # checks optim_args and the target modules now, not at the first step
        if options.get("weight_dtype") == "int8" and self.world_size > 1:
            raise ValueError(f"optim_args weight_dtype='int8' with {self.world_size} processes: int8 weights are not "
                             "sharded or all-reduced by DDP / FSDP2 yet. Launch a single process, or drop "
                             "weight_dtype to train the float weights on several.")
        if get_spec(name).zeroth_order:
            self._check_zeroth_order()
        elif options["layerwise"]:
            self._check_layerwise()

    @property
    def place_model_on_device(self) -> bool | None:
        """False for offloaded MeZO (``optim_args="offload=ram"`` or ``"disk"``): the model stays where it was loaded
        (it does not fit on the device) until the optimizer streams its blocks; transformers decides otherwise."""
        name = getattr(self, "lowmem_optim", None)
        if name and get_spec(name).zeroth_order and self.lowmem_options().get("offload"):
            return False
        return super().place_model_on_device

    def _check_zeroth_order(self) -> None:
        """What a zeroth-order step cannot honour: there are no gradients to clip or to scale, and one process; and
        the loss cannot bypass the head, whose forward carries MeZO's perturbation."""
        name = self.lowmem_optim
        if self.linear_cross_entropy:
            raise ValueError(f"optim={name!r} with linear_cross_entropy=True: MeZO perturbs lm_head through its "
                             "forward, so the loss must compute the logits and the option would save nothing. Set "
                             "linear_cross_entropy=False.")
        self._refuse_clipping_fp16_and_ddp(
            f"optim={name!r} computes no gradients (it estimates one scalar per step from two forwards), so "
            f"max_grad_norm={self.max_grad_norm} has nothing to clip. Set max_grad_norm=0, and bound the step with a "
            "smaller learning_rate or zo_eps.",
            f"optim={name!r} with fp16: a zeroth-order step has no backward for the fp16 loss scaler to scale. Use "
            "bf16=True, or load the model in fp16 without fp16=True.",
            ValueError(f"optim={name!r} runs in one process ({self.world_size} were started): its update is one "
                       "scalar per seed, which DDP does not average. Launch a single process."))

    def _check_layerwise(self) -> None:
        name = self.lowmem_optim
        self._refuse_clipping_fp16_and_ddp(
            f"optim={name!r} updates each weight inside backward, before the other gradients exist, so "
            f"max_grad_norm={self.max_grad_norm} cannot clip by the global norm. Set max_grad_norm=0 (the logged "
            "grad_norm is still the real one), or drop '_layerwise' to clip.",
            f"optim={name!r} with fp16: the loss scaler's scaled gradients would reach the layer-wise update before "
            "they are unscaled. Use bf16=True, or drop '_layerwise'.")
        if self.fsdp and (self.fsdp_plugin_args or {}).get("fsdp_version", 2) != 2:
            raise ValueError(f"optim={name!r} under FSDP1: its flat parameters hide each weight's gradient. Use FSDP2 "
                             "(fsdp_config={'version': 2}, the default), or drop '_layerwise'.")

    def _refuse_clipping_fp16_and_ddp(self, clipping: str, fp16: str, ddp: ValueError | None = None) -> None:
        """For optimizers that cannot clip by the global norm, take fp16 loss scaling or (``ddp`` given) run in
        several processes: ``max_grad_norm`` defaults to 0 and a positive one is an error; fp16 and several processes
        are errors."""
        if not self.max_grad_norm_given:
            self.max_grad_norm = 0.0
        elif self.max_grad_norm > 0:
            raise ValueError(clipping)
        if self.fp16:
            raise ValueError(fp16)
        if ddp is not None and self.world_size > 1:
            raise ddp

    def lowmem_options(self) -> dict:
        """The options ``lowmem.create_optimizer`` gets for this run (checked against the optimizer's)."""
        spec = get_spec(self.lowmem_optim)
        allowed = spec.options()
        options = {"lr": self.learning_rate, "weight_decay": self.weight_decay}
        if len(allowed.get("betas", ())) == 2:
            options["betas"] = (self.adam_beta1, self.adam_beta2)
        if isinstance(allowed.get("eps"), float):
            options["eps"] = self.adam_epsilon
        if self.optim_target_modules is not None:
            if "target_modules" not in allowed:
                raise ValueError(f"optim={self.lowmem_optim!r} projects nothing, so optim_target_modules does not "
                                 "apply; drop it or pick a low-rank optimizer (e.g. 'galore_adamw', 'galore+came').")
            options["target_modules"] = self.optim_target_modules
        extra = parse_optim_args(self.optim_args)
        try:
            return check_options(self.lowmem_optim, {**options, **extra})
        except ValueError as err:
            raise ValueError(f"optim_args={self.optim_args!r}: {err}") from None
