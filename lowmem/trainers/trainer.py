"""``Trainer`` that builds lowmem optimizers by name, through the Trainer's own ``create_optimizer`` override point,
and patches the model's loss to skip the logits when ``args.linear_cross_entropy`` asks, or by default where that is
exact (``linear_ce_by_default``; at init, before any step).

``Trainer(model, args, optim="galore_adamw", optim_args="rank=64", optim_target_modules=["attn", "mlp"])`` works
as well as putting those three in ``TrainingArguments``. The training loop, scheduler, checkpointing and
resume are transformers' own; a lowmem optimizer's state is tensors and plain numbers, so the Trainer's
``weights_only=True`` loader restores it.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
import transformers

from ..allocator import release_freed_memory
from ..kernels.model_patch import can_patch, patch_linear_cross_entropy
from ..optim.compose import LowMemOptimizer
from ..optim.int8_weights import quantize_linears
from ..optim.registry import create_optimizer, get_spec
from ..optim.sharded_checkpoint import prepare_to_load
from ..optim.zo import MeZO, pair_loss
from .arguments import TrainingArguments
from .checkpoints import (
    STAGING,
    CheckpointError,
    check_resume,
    newest_complete,
    optimizer_record,
    say,
    write_manifest,
)
from .fsdp import shard_cpu_processes, sharded_optimizer_dir

logger = transformers.utils.logging.get_logger(__name__)
_OPTIM_FIELDS = ("optim", "optim_args", "optim_target_modules")


class Trainer(transformers.Trainer):
    """transformers' ``Trainer``; with lowmem's ``TrainingArguments`` its ``optim`` may name any lowmem optimizer."""

    def __init__(self, model=None, args=None, *positional, optim=None, optim_args=None, optim_target_modules=None,
                 **kwargs):
        release_freed_memory()  # resident memory that follows the live tensors (glibc keeps freed blocks otherwise)
        overrides = {k: v for k, v in zip(_OPTIM_FIELDS, (optim, optim_args, optim_target_modules), strict=True)
                     if v is not None}
        if overrides:
            args = _with_optimizer(args, overrides)
        self._own_loss = type(self).compute_loss is transformers.Trainer.compute_loss \
            and kwargs.get("compute_loss_func") is None  # nothing else might read the training logits
        if model is not None:  # before the Trainer inspects the model or loads a checkpoint into it
            _prepare_model(model, args, self._own_loss)
        super().__init__(model, args, *positional, **kwargs)

    def create_accelerator_and_postprocess(self):
        """transformers' accelerator; FSDP2 asked for on CPU processes shards there too (``fsdp``)."""
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            shard_cpu_processes(self)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """transformers' ``train``; a resume first checks the checkpoint (``checkpoints.check_resume``: its files
        against the manifest, its optimizer against this run's) and ``True`` takes the newest *complete* one."""
        self._resume_changes, self._resume_saved = [], None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete(self.args.output_dir, not self.args.save_only_model)
        if resume_from_checkpoint not in (None, False):
            self._resume_changes, self._resume_saved = check_resume(resume_from_checkpoint, self.args)
            if "lr" in self._resume_changes:
                self._refuse_unscalable_schedule()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _refuse_unscalable_schedule(self) -> None:
        """A new learning rate on resume is applied by scaling a ``LambdaLR`` schedule (all of transformers' step
        schedules); any other would keep the saved rate, so it is refused before anything loads."""
        scheduler = self.lr_scheduler  # None unless given to the Trainer: made from lr_scheduler_type later
        kind = type(scheduler).__name__ if scheduler is not None else \
            getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
        if kind == "reduce_lr_on_plateau" or (scheduler is not None and not isinstance(
                scheduler, torch.optim.lr_scheduler.LambdaLR)):
            old = self._resume_saved["options"]["lr"]
            raise CheckpointError(f"learning_rate {old:g} -> {self.args.learning_rate:g} on resume: lowmem scales "
                                  f"transformers' step schedules (LambdaLR) to a new rate, not {kind}; resume with "
                                  f"learning_rate={old:g}")

    def _get_output_dir(self, trial):
        """transformers' run folder; while a checkpoint is saved, the staging folder it is written in."""
        staging = getattr(self, "_staging", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """transformers' checkpoint, written under ``.lowmem-saving/`` and renamed to ``checkpoint-N`` once every
        process has written its files and the manifest (sizes, hashes, the optimizer's name and options) is there:
        a ``checkpoint-N`` is always whole. With ``push_to_hub`` (its upload reads the folder after the save) the
        checkpoint is written in place, its manifest last."""
        run_dir = Path(self._get_output_dir(trial))
        final = run_dir / f"checkpoint-{self.state.global_step}"
        staging = None if self.args.push_to_hub else run_dir / STAGING
        if staging is not None:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)  # what a save cut short left
            self.accelerator.wait_for_everyone()
            self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        staged = final if staging is None else staging / final.name
        moved_best = staging is not None and str(self.state.best_model_checkpoint or "").startswith(str(staging))
        if moved_best:  # transformers named the best checkpoint where it was written
            self.state.best_model_checkpoint = str(run_dir / Path(self.state.best_model_checkpoint).name)
        self.accelerator.wait_for_everyone()  # every process's files are written
        if self.args.should_save:
            if moved_best and (staged / "trainer_state.json").is_file():
                self.state.save_to_json(str(staged / "trainer_state.json"))
            write_manifest(staged, optimizer_record(self.args))
            if staged != final:
                _publish(staged, final)
                self._rotate(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: Path) -> None:
        """transformers' checkpoint rotation (``save_total_limit``), on the run folder the checkpoint moved to."""
        if hasattr(self, "_rotate_checkpoints"):  # transformers 4.x
            self._rotate_checkpoints(use_mtime=True, output_dir=str(run_dir))
            return
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """transformers' load; a lowmem optimizer's sharded state first takes the entries the checkpoint holds.
        ``resume_optimizer="reset"`` loads the schedule only (fresh optimizer state); a changed ``learning_rate``
        scales the loaded schedule to it."""
        if checkpoint is not None and getattr(self.args, "resume_optimizer", "check") == "reset":
            self._restore_schedule_only(checkpoint)
            return None
        directory = sharded_optimizer_dir(self, checkpoint)
        optimizer = self._unwrapped_optimizer()
        updates = self.layerwise_updates()
        if updates is not None and self.is_fsdp_enabled:
            updates.follow_params()  # before the state is keyed by the sharded parameters
        if directory is not None and isinstance(optimizer, LowMemOptimizer):
            prepare_to_load(self.model, optimizer, directory)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and "lr" in getattr(self, "_resume_changes", ()):
            self._scale_schedule(self._resume_saved["options"]["lr"], self.args.learning_rate)
        return None

    def _scale_schedule(self, old: float, new: float) -> None:
        """The loaded schedule (its base rates, the groups' current and initial rates) times ``new / old``."""
        ratio = new / old
        scheduler, groups = self.lr_scheduler, self._unwrapped_optimizer().param_groups
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
        for group in groups:
            group["lr"] *= ratio
            if "initial_lr" in group:
                group["initial_lr"] *= ratio
        scheduler._last_lr = [group["lr"] for group in groups]
        say(f"learning_rate {old:g} -> {new:g} on resume: the schedule continues from step "
            f"{scheduler.last_epoch} at the new peak")

    def _restore_schedule_only(self, checkpoint) -> None:
        """``resume_optimizer="reset"``: the schedule's step from ``checkpoint``, this run's rates and a fresh
        optimizer state (transformers' schedules are ``LambdaLR``: rate = base x lambda(step))."""
        scheduler = self.lr_scheduler
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise CheckpointError(f"resume_optimizer=reset restarts transformers' step schedules; "
                                  f"lr_scheduler_type={self.args.lr_scheduler_type!r} is not one")
        path = Path(checkpoint) / "scheduler.pt"
        if not path.is_file():  # save_only_model: transformers then restarts the schedule too
            say(f"resume_optimizer=reset: fresh optimizer state; {checkpoint} has no scheduler.pt, so the schedule "
                "starts again")
            return
        saved = torch.load(path, weights_only=True)
        scheduler.last_epoch, scheduler._step_count = saved["last_epoch"], saved["_step_count"]
        rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                        strict=True)]
        for group, lr in zip(self._unwrapped_optimizer().param_groups, rates, strict=True):
            group["lr"] = lr
        scheduler._last_lr = rates
        say(f"resume_optimizer=reset: fresh optimizer state from the weights of {checkpoint}, the schedule at step "
            f"{scheduler.last_epoch}")

    def call_model_init(self, *args, **kwargs):
        """transformers' ``model_init`` call, its model patched like one given directly."""
        model = super().call_model_init(*args, **kwargs)
        _prepare_model(model, self.args, self._own_loss)
        return model

    def create_optimizer(self, *args, **kwargs):
        """A lowmem optimizer when ``args.optim`` names one, else transformers' own choice."""
        name = getattr(self.args, "lowmem_optim", None)
        if name is None:
            return super().create_optimizer(*args, **kwargs)
        if self.optimizer is None:
            model = args[0] if args else kwargs.get("model") or self.model
            self.optimizer = create_optimizer(name, model, **self.args.lowmem_options())
        return self.optimizer

    def _unwrapped_optimizer(self):
        """The optimizer ``create_optimizer`` built (accelerate wraps it once prepared)."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def layerwise_updates(self):
        """The optimizer's ``LayerwiseUpdates`` when it updates inside backward, else None."""
        optimizer = self._unwrapped_optimizer()
        return getattr(optimizer, "layerwise", None)

    def zeroth_order(self):
        """The optimizer when it is zeroth-order (``optim="mezo"``), else None."""
        optimizer = self._unwrapped_optimizer()
        return optimizer if isinstance(optimizer, MeZO) else None

    def training_step(self, model, inputs, *args, **kwargs):
        """transformers' step; a layer-wise optimizer updates only in the last micro-batch of each step; a
        zeroth-order one estimates the gradient from two forwards instead of a backward. After the last micro-batch
        a lowmem optimizer drops gradients with NaN / inf values (counted as skipped updates) before the Trainer
        clips: clipping by a non-finite global norm would turn every other gradient into NaN or zero."""
        zo = self.zeroth_order()
        if zo is not None:
            return self._zeroth_order_step(zo, model, inputs)
        updates = self.layerwise_updates()
        if updates is None:
            loss = super().training_step(model, inputs, *args, **kwargs)
            optimizer = self._unwrapped_optimizer()
            scaler = getattr(self.accelerator, "scaler", None)  # fp16: the loss scaler skips non-finite steps itself
            if self.accelerator.sync_gradients and isinstance(optimizer, LowMemOptimizer) and scaler is None:
                optimizer.drop_nonfinite_grads()  # before the Trainer clips: a NaN must not reach the global norm
            return loss
        if updates.ddp is None and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            updates.attach(model)  # update on the all-reduced gradients, as each bucket's reduction completes
        elif self.is_fsdp_enabled:
            updates.follow_params()  # accelerate swapped in the shards; FSDP2 runs their hooks after reduce-scatter
        updates.sync = self.accelerator.sync_gradients
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            updates.sync = True

    def _zeroth_order_step(self, zo: MeZO, model, inputs):
        """One micro-batch of a MeZO step: the loss at ``W +- eps z`` (model in eval mode, no autograd) adds its
        share to the step's projected gradient; the Trainer's ``optimizer.step()`` applies the update after the
        last micro-batch, and its scheduler sets the learning rate. Returns the loss as transformers does (divided
        by the micro-batches per step, since the Trainer sums them)."""
        inputs = self._prepare_inputs(inputs)
        accumulation = self.current_gradient_accumulation_steps

        def loss():
            with self.compute_loss_context_manager():
                if zo.streamer is not None:  # the dual forward: both losses from the batch taken twice
                    return pair_loss(model, inputs)
                return self.compute_loss(model, inputs)
        return zo.estimate(loss, weight=1.0 / accumulation).to(self.args.device) / accumulation

    def save_model(self, *args, **kwargs):
        """transformers' save (also of every checkpoint); with offloaded blocks, of the gathered weights (never the
        empty placeholders)."""
        zo = self.zeroth_order()
        if zo is None or zo.streamer is None:
            return super().save_model(*args, **kwargs)
        with zo.streamer.gathered():
            return super().save_model(*args, **kwargs)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """transformers' log; in layer-wise mode ``grad_norm`` is the real norm (transformers 5.x would log 0, and
        4.57 nothing, since the gradients are gone by the time it looks). MeZO logs ``projected_grad``, the step's
        directional derivative along its noise, and no ``grad_norm``: it never forms a gradient, and the norm of its
        estimate (``|projected_grad| * |z|``, about ``sqrt(parameters)`` times larger) is not comparable to one."""
        updates = self.layerwise_updates()
        if updates is not None and "loss" in logs and updates.last_grad_norm is not None:
            logs["grad_norm"] = updates.last_grad_norm
        skipped = getattr(self._unwrapped_optimizer(), "nonfinite_skips", 0)
        if skipped and "loss" in logs:
            logs["skipped_nonfinite"] = skipped
        zo = self.zeroth_order()
        if zo is not None:  # no gradient exists: transformers 5.x would log grad_norm 0 (4.57 nothing)
            logs.pop("grad_norm", None)
            if "loss" in logs and zo.last_projected_grad is not None:
                logs["projected_grad"] = zo.last_projected_grad
        super().log(logs, *args, **kwargs)


def _publish(staged: Path, final: Path) -> None:
    """Rename the complete ``staged`` checkpoint to ``final``; one already there (a run saved over) goes first."""
    replaced = staged.with_name(f"replaced-{final.name}")
    if final.exists():
        final.rename(replaced)
    staged.rename(final)
    shutil.rmtree(replaced, ignore_errors=True)
    try:
        staged.parent.rmdir()
    except OSError:
        pass


def _prepare_model(model, args, own_loss: bool) -> None:
    """What the run's options change in the model itself: the loss without logits (``linear_cross_entropy``, or its
    default) and int8 weights (``optim_args="weight_dtype=int8"``: the target linears converted now, so a
    checkpoint's int8 weights load into the same structure on resume)."""
    wanted = getattr(args, "linear_cross_entropy", False)
    if wanted is None and linear_ce_by_default(model, args, own_loss):
        logger.info("linear_cross_entropy: on by default for this model (its training loss without the logits); "
                    "linear_cross_entropy=False keeps them")
        wanted = True
    if wanted:
        patch_linear_cross_entropy(model)
    if getattr(args, "lowmem_optim", None) is not None:
        options = args.lowmem_options()
        if options.get("weight_dtype") == "int8":
            quantize_linears(model, options.get("target_modules"))


def linear_ce_by_default(model, args, own_loss: bool) -> bool:
    """Whether an unset ``linear_cross_entropy`` turns on: the model's loss is one the patch reproduces exactly
    (``model_patch.can_patch``: a LLaMA / Qwen2 / Mistral causal LM with a plain head), the Trainer computes the
    loss itself (``own_loss``: no ``compute_loss`` override or ``compute_loss_func`` that might read the training
    logits), the optimizer takes gradients (MeZO perturbs the head through its forward) and one process runs (the
    patch is not tested under DDP / FSDP2 yet). The planner prices the same default."""
    name = getattr(args, "lowmem_optim", None)
    if name is not None and get_spec(name).zeroth_order:
        return False
    return own_loss and args.world_size == 1 and can_patch(model)


def _with_optimizer(args, overrides: dict) -> TrainingArguments:
    """lowmem ``TrainingArguments`` equal to ``args`` (or the defaults) with the optimizer fields replaced."""
    if args is None:
        return TrainingArguments(output_dir="trainer_output", **overrides)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments)
              if f.init and hasattr(args, f.name)}  # lowmem's own fields too, when ``args`` has them
    if not getattr(args, "max_grad_norm_given", args.max_grad_norm != 1.0):
        values["max_grad_norm"] = None  # unset: the default suits the new optimizer (0 for layer-wise ones)
    return TrainingArguments(**{**values, **overrides})
