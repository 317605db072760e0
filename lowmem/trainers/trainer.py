"""``Trainer`` that builds lowmem optimizers by name, through the Trainer's own ``create_optimizer`` override point.

``Trainer(model, args, optim="galore_adamw", optim_args="rank=64", optim_target_modules=["attn", "mlp"])`` works
as well as putting those three in ``TrainingArguments``. The training loop, scheduler, checkpointing and
resume are transformers' own; a lowmem optimizer's state is tensors and plain numbers, so the Trainer's
``weights_only=True`` loader restores it.
"""

from __future__ import annotations

import dataclasses

import transformers

from ..optim.registry import create_optimizer
from .arguments import TrainingArguments, layerwise_ddp_error

_OPTIM_FIELDS = ("optim", "optim_args", "optim_target_modules")


class Trainer(transformers.Trainer):
    """transformers' ``Trainer``; with lowmem's ``TrainingArguments`` its ``optim`` may name any lowmem optimizer."""

    def __init__(self, model=None, args=None, *positional, optim=None, optim_args=None, optim_target_modules=None,
                 **kwargs):
        overrides = {k: v for k, v in zip(_OPTIM_FIELDS, (optim, optim_args, optim_target_modules), strict=True)
                     if v is not None}
        if overrides:
            args = _with_optimizer(args, overrides)
        super().__init__(model, args, *positional, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        """A lowmem optimizer when ``args.optim`` names one, else transformers' own choice."""
        name = getattr(self.args, "lowmem_optim", None)
        if name is None:
            return super().create_optimizer(*args, **kwargs)
        if self.optimizer is None:
            model = args[0] if args else kwargs.get("model") or self.model
            optimizer = create_optimizer(name, model, **self.args.lowmem_options())
            if optimizer.layerwise is not None and self.accelerator.num_processes > 1:
                optimizer.layerwise.remove()  # the arguments may have changed since they were checked
                raise layerwise_ddp_error(name, self.accelerator.num_processes)
            self.optimizer = optimizer
        return self.optimizer

    def layerwise_updates(self):
        """The optimizer's ``LayerwiseUpdates`` when it updates inside backward, else None."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        return getattr(optimizer, "layerwise", None)

    def training_step(self, model, inputs, *args, **kwargs):
        """transformers' step; a layer-wise optimizer updates only in the last micro-batch of each step."""
        updates = self.layerwise_updates()
        if updates is None:
            return super().training_step(model, inputs, *args, **kwargs)
        updates.sync = self.accelerator.sync_gradients
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            updates.sync = True

    def log(self, logs: dict, *args, **kwargs) -> None:
        """transformers' log; in layer-wise mode ``grad_norm`` is the real norm (transformers 5.x would log 0, and
        4.57 nothing, since the gradients are gone by the time it looks)."""
        updates = self.layerwise_updates()
        if updates is not None and "loss" in logs and updates.last_grad_norm is not None:
            logs["grad_norm"] = updates.last_grad_norm
        super().log(logs, *args, **kwargs)


def _with_optimizer(args, overrides: dict) -> TrainingArguments:
    """lowmem ``TrainingArguments`` equal to ``args`` (or the defaults) with the optimizer fields replaced."""
    if args is None:
        return TrainingArguments(output_dir="trainer_output", **overrides)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    if not getattr(args, "max_grad_norm_given", args.max_grad_norm != 1.0):
        values["max_grad_norm"] = None  # unset: the default suits the new optimizer (0 for layer-wise ones)
    return TrainingArguments(**{**values, **overrides})
