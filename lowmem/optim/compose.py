"""The one optimizer: per parameter, projector -> rule -> lift, with state in a chosen precision.

``LowMemOptimizer`` owns the param groups, the learning rate, where weight decay goes, the
per-parameter state dict and the step counter; everything algorithm-specific comes from the three
parts named in each param group (see ``projectors``, ``rules``, ``lifts``) and the state store.
Param-group keys are plain strings and numbers, and per-parameter state is tensors and plain
numbers, so ``state_dict()`` round-trips through ``torch.load(..., weights_only=True)``.

Group keys (all optional; defaults in ``GROUP_DEFAULTS``):

* projector: ``projector`` (identity | svd | random_orth | gaussian | coordinates | permutation |
  blocks), ``rank`` or ``density``, ``proj_type``, ``update_proj_gap``, ``svd_method``,
  ``coord_choice``, ``block_order``, ``reset_statistics``
* rule: ``rule`` (adamw_hf | adamw_torch | adafactor | came | adam_mini | sign_sgd | sgd), ``betas``,
  ``eps``, ``correct_bias``; Adafactor/CAME: ``clip_threshold``, ``decay_rate``, ``beta1``,
  ``scale_parameter``, ``relative_step``, ``warmup_init``; Adam-mini: ``mini_block``, ``head_numel``
* lift: ``lift`` (project_back | frugal | fira | apollo), ``scale``, ``scale_type``, ``scale_front``,
  ``disable_nl``, ``inactive_update_rule``, ``inactive_lr_scale``, ``proj_params_lr_scale``
* storage: ``state_dtype`` (None = the gradient's dtype | float32 | bfloat16 | 8bit), ``min_8bit_size``
* ``bf16_stochastic_round``: round bf16 parameters' updates stochastically (see ``fused``)
* ``skip_nonfinite`` (default True): a tensor whose gradient has NaN / inf skips its update (see ``nonfinite``)
* ``state_device="cpu"``: a GPU parameter's states live in CPU memory between updates (see ``offload_states``)
* ``lr``, ``weight_decay``; ``param_names`` (used in error messages only)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..kernels.codes_8bit import CHUNK
from . import fused
from .int8_weights import RecordedUpdate, int8_linear_of
from .lifts import Lift, make_lift
from .nonfinite import SkipCounter, finite_flags
from .offload_states import back_to_host, host_copy, offloads, to_device, wait_for_device
from .projectors import GaussianProjector, Projector, make_projector
from .rules import DEFAULT_BETAS, DEFAULT_EPS, Rule, make_rule
from .sharded import is_sharded
from .states import StateStore, make_store, state_bytes

GROUP_DEFAULTS = dict(
    lr=1e-3,
    weight_decay=0.0,
    betas=DEFAULT_BETAS,
    eps=DEFAULT_EPS,
    correct_bias=True,
    state_dtype=None,
    skip_nonfinite=True,
)


@dataclass
class Parts:
    """The three parts and the storage that one param group runs."""

    projector: Projector
    rule: Rule
    lift: Lift
    store: StateStore


def build_parts(group: dict) -> Parts:
    """Build a group's parts from its keys (cheap; validates every option)."""
    rule = make_rule(group)
    store = make_store(group["state_dtype"], group.get("min_8bit_size", 4096))
    return Parts(make_projector(group), rule, make_lift(group), store)


class LowMemOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` composed of a projector, a moment rule and a lift per param group.

    Memory: the rule's state on the projected gradient's shape (e.g. GaLore ``2mr`` moments plus an
    ``rn`` factor instead of AdamW's ``2mn``), in ``state_dtype``.
    """

    def __init__(self, params: Iterable, **defaults):
        self._step_parts: dict[int, Parts] = {}  # per param group, built once per step
        self._blocks_chosen: set[int] = set()  # groups whose block projector has chosen this step
        #: ``LayerwiseUpdates`` once ``enable_layerwise()`` ran: updates then run inside backward.
        self.layerwise = None
        self._skips = SkipCounter()
        self._screened = False  # the gradients of this step were already screened (``drop_nonfinite_grads``)
        merged = {**GROUP_DEFAULTS, **defaults}
        check_hyperparameters(merged)
        super().__init__(params, merged)

    @property
    def nonfinite_skips(self) -> int:
        """How many tensor updates were skipped because their gradient had NaN or inf values."""
        return self._skips.count

    def __setstate__(self, state: dict) -> None:
        """torch calls this from ``load_state_dict`` (new group dicts: drop the per-step caches) and when copying
        or unpickling, which keep only groups and state (rebuild the rest; a copy has no layer-wise hooks)."""
        super().__setstate__(state)
        self._step_parts, self._blocks_chosen, self._ordinals = {}, set(), None
        self._screened = False
        if not hasattr(self, "_skips"):
            self._skips = SkipCounter()
        if not hasattr(self, "layerwise"):
            self.layerwise = None

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking its parts and every parameter's shape (errors before any step)."""
        super().add_param_group(param_group)
        self._ordinals = None
        group = self.param_groups[-1]
        self.normalize_group(group)
        check_hyperparameters(group)
        parts = build_parts(group)
        if group["lr"] is None and not getattr(parts.rule, "relative_step", False):
            raise ValueError("lr=None: this optimizer needs a learning rate (e.g. lr=1e-3); only Adafactor with "
                             "relative_step=True computes its own.")
        parts.projector.check_group(len(group["params"]))
        index = len(self.param_groups) - 1
        full_rank = []
        for i, p in enumerate(group["params"]):
            name = self.param_name(index, i)
            if p.is_complex():
                raise ValueError(f"parameter {name} is complex ({p.dtype}): lowmem optimizers update real tensors "
                                 "only. Optimize torch.view_as_real(param) (a real view of the same memory) instead.")
            if group.get("projector", "identity") != "identity":
                parts.projector.check_shape(p.shape, name)
                if getattr(parts.projector, "full_rank", None) and parts.projector.full_rank(p.shape):
                    full_rank.append(f"{name} {tuple(p.shape)}")
        if full_rank:
            warnings.warn(parts.projector.full_rank_warning(full_rank), UserWarning, stacklevel=3)
        if parts.projector.chooses_ahead:
            self.activate_block(group, parts.projector.start(group))

    def activate_block(self, group: dict, indices: list[int], reset: bool = True) -> None:
        """Train only ``group``'s parameters at ``indices`` (BAdam's block): ``requires_grad`` and ``.grad`` follow;
        with ``reset`` every state of the group is dropped and the block's low-precision weights get an fp32 master
        copy (``master``) to update."""
        active = set(indices)
        for i, p in enumerate(group["params"]):
            p.requires_grad_(i in active)
            if i not in active:
                p.grad = None
            if reset:
                self.state.pop(p, None)
                if i in active and p.dtype != torch.float32:
                    self.state[p]["master"] = p.detach().float()

    def normalize_group(self, group: dict) -> None:
        """Hook for named presets: translate reference group keys into the compose keys."""

    def __repr__(self) -> str:
        """torch's listing of the param groups, headed by the name ``create_optimizer`` was given (if any)."""
        text = super().__repr__()
        name = getattr(self, "name", None)
        return text.replace(type(self).__name__, name, 1) if name else text

    def param_name(self, group_index: int, i: int) -> str:
        """Parameter ``i`` of group ``group_index`` as messages name it: its name in quotes, else its position."""
        names = self.param_groups[group_index].get("param_names")
        return f"'{names[i]}'" if names and names[i] else f"#{i} of param group {group_index}"

    @torch.no_grad()
    def drop_nonfinite_grads(self) -> int:
        """Set the ``.grad`` of every parameter whose gradient has NaN or inf values to None and count it as a
        skipped update (groups with ``skip_nonfinite``); returns how many. The lowmem Trainer calls this before it
        clips gradients, so a NaN in one tensor neither reaches the global norm nor the other tensors; the next
        ``step()`` then does not screen again."""
        bad = self._screen()
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in bad:
                    p.grad = None
        self._screened = True
        return len(bad)

    def _screen(self) -> set[int]:
        """The ids of the parameters (in groups with ``skip_nonfinite``) whose gradient is not finite, each counted
        as a skip: one test per tensor, one host transfer for all of them."""
        entries = [(index, i, p) for index, group in enumerate(self.param_groups) if group.get("skip_nonfinite", True)
                   for i, p in enumerate(group["params"]) if p.grad is not None]
        for _, _, p in entries:
            _refuse_sparse(p.grad)  # before any tensor updates
        return {id(p) for p in self.count_nonfinite(entries, [p.grad for _, _, p in entries])}

    def count_nonfinite(self, entries: list[tuple[int, int, torch.Tensor]], grads: list[torch.Tensor]) -> list:
        """The parameters among ``entries`` (group index, place in the group, parameter) whose ``grads`` (what their
        updates would read) are not finite, each counted as a skipped update."""
        bad = []
        for (index, i, p), ok in zip(entries, finite_flags(grads) if entries else [], strict=True):
            if not ok:
                self._skips.skip(f"the gradient of {self.param_name(index, i)}", self.state.get(p, {}).get("step"))
                bad.append(p)
        return bad

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One update of every parameter that has a gradient.

        In layer-wise mode most parameters were already updated inside backward (their gradient is
        gone); this updates any that still hold one and closes the step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise is not None:
            self.layerwise.check_params()
            self.layerwise.release_updated()
        skipped = set() if self._screened else self._screen()
        for index, group in enumerate(self.param_groups):
            parts = self.parts_for_step(index)
            for p in [p for p in group["params"] if p.grad is not None and id(p) not in skipped]:
                if self.layerwise is not None:
                    self.layerwise.count_norm(p.grad)
                self.update_param(p, group, parts)
        for index, group in enumerate(self.param_groups):
            projector = self.parts_for_step(index, choose_blocks=False).projector
            if projector.chooses_ahead and projector.advance(group):
                self.activate_block(group, projector.switch(group))
        if self.layerwise is not None:
            self.layerwise.end_step()
        self._step_parts.clear()
        self._blocks_chosen.clear()
        self._screened = False
        return loss

    def parts_for_step(self, index: int, choose_blocks: bool = True) -> Parts:
        """Param group ``index``'s parts, built once per step; a block projector chooses its active
        tensors the first time this is asked with ``choose_blocks`` (before any of them updates)."""
        parts = self._step_parts.get(index)
        if parts is None:
            parts = self._step_parts[index] = build_parts(self.param_groups[index])
        if choose_blocks and parts.projector.group_level and index not in self._blocks_chosen:
            self._blocks_chosen.add(index)
            self._choose_blocks(self.param_groups[index], parts.projector)
        return parts

    def enable_layerwise(self, accumulation: str = "projected"):
        """Run each parameter's update inside backward, as soon as its gradient is complete, and free
        that gradient (see ``layerwise``). Returns the ``LayerwiseUpdates`` that holds the hooks."""
        from .layerwise import LayerwiseUpdates

        if self.layerwise is None:
            self.layerwise = LayerwiseUpdates(self, accumulation)
        return self.layerwise

    @torch.no_grad()
    def init_inactive_moments(self) -> None:
        """Give the tensors a block projector left inactive (FRUGAL) their moments, zero, as if active: a sharded
        checkpoint's loader asks for every entry a state could hold, then drops what the checkpoint lacks
        (``sharded_checkpoint``)."""
        for index, group in enumerate(self.param_groups):
            parts = self.parts_for_step(index, choose_blocks=False)
            if parts.projector.group_level:
                for p in group["params"]:
                    like = torch.zeros_like(p, dtype=state_dtype_for(p, p.dtype))
                    parts.rule.init_state(self.state[p], parts.store, like)
        self._step_parts.clear()

    def _choose_blocks(self, group: dict, projector) -> None:
        states = [self.state[p] for p in group["params"]]
        if not projector.due(states):
            return
        for state in states:
            state.clear()
            state["step"] = 0
            state["active"] = False
        for i in projector.choose(group, len(states)):
            states[i]["active"] = True

    def update_param(self, p: torch.Tensor, group: dict, parts: Parts, low: torch.Tensor | None = None) -> None:
        """Update ``p`` from ``p.grad``; ``low``: its projection already summed over micro-batches (no refresh
        is due then, and the lift only reads ``p.grad``'s shape and dtype)."""
        grad = p.grad
        _refuse_sparse(grad)
        if not grad.is_contiguous():  # a transposed or strided weight's gradient: the rules view it by rows and heads
            grad = grad.contiguous()
        if torch.is_tensor(group["lr"]):  # a 1-element tensor lr (checked when the group was added)
            group = {**group, "lr": group["lr"].item()}
        if offloads(group, p):  # states in CPU memory: streamed through the device for this update
            if low is None and _in_chunks(p, grad, parts) and int8_linear_of(p) is None:
                self._update_in_chunks(p, grad, self.state[p], group, parts, offload=True)  # a chunk's at a time
                return
            working = to_device(self.state[p], p.device)
            self._update_with_state(p, grad, working, group, parts, low)
            back_to_host(self.state[p], working)
        else:
            self._update_with_state(p, grad, self.state[p], group, parts, low)

    def _update_with_state(self, p, grad, state: dict, group: dict, parts: Parts, low: torch.Tensor | None) -> None:
        if isinstance(parts.projector, GaussianProjector) and "seed" not in state:
            # APOLLO's seed, as apollo-torch numbers them: the 1-based place among every group's parameters. Taken at
            # the first update, not at construction, so a parameter swapped in later (accelerate's FSDP2 preparation
            # replaces each one with its sharded DTensor, leaving state keyed by the old one behind) gets it too.
            state["seed"] = self._ordinal(p) + 1
        master = state.get("master")
        if master is not None:  # BAdam's fp32 copy of a low-precision weight in the active block
            self._update_tensor(master, grad.float(), state, group, parts, low)
            p.copy_(master)
            return
        int8 = int8_linear_of(p)
        if int8 is not None:  # int8 weights: update in fp32, store back with stochastic rounding
            self._update_int8(int8, p, grad, state, group, parts, low)
            return
        if low is None and fused.fused_adamw_8bit(p, grad, state, group, parts, self._ordinal(p)):
            return
        self._update_tensor(p, grad, state, group, parts, low)

    def _update_int8(self, int8, p, grad, state: dict, group: dict, parts: Parts, low: torch.Tensor | None) -> None:
        """The update of an int8 weight: recorded, then replayed on its fp32 values a piece at a time
        (``RecordedUpdate``); on a whole fp32 copy where the rule reads the weight or updates in chunks itself."""
        if parts.rule.reads_weight or (low is None and updates_in_chunks(parts, grad.shape)):
            updated = int8.dequantized(torch.float32)
            self._update_tensor(updated, grad, state, group, parts, low)
            int8.store_(updated, fused.round_seed(self._ordinal(p), state["step"]))
            return
        recorded = RecordedUpdate(grad)
        self._update(recorded, grad, state, group, parts, low)
        int8.update_(recorded.replay, fused.round_seed(self._ordinal(p), state["step"]))

    def _update_tensor(self, p, grad, state: dict, group: dict, parts: Parts, low: torch.Tensor | None) -> None:
        if low is None and _in_chunks(p, grad, parts):
            self._update_in_chunks(p, grad, state, group, parts)
        else:
            self._update(p, grad, state, group, parts, low)

    def update_param_in_chunks(self, p: torch.Tensor, group: dict, parts: Parts, grad_range: Callable) -> None:
        """``update_param`` of a tensor updated ``CHUNK`` elements at a time (``updates_in_chunks``), its gradient
        handed over a range of flat elements at a time, ``grad_range(start, end)``, instead of whole in ``p.grad``
        (the streamed layer-wise updates of the head and the embedding, ``streamed_rows``)."""
        if torch.is_tensor(group["lr"]):
            group = {**group, "lr": group["lr"].item()}
        self._update_in_chunks(p, grad_range, self.state[p], group, parts, offload=offloads(group, p))

    def _update_in_chunks(self, p, grad, state: dict, group: dict, parts: Parts, offload: bool = False) -> None:
        """An unprojected tensor under an elementwise rule, ``CHUNK`` elements at a time: the direction (and for
        8-bit moments their dequantized copies) then never exists for the whole tensor, which in a layer-wise step
        of a large embedding or head is that tensor's size again at the peak. Bit-identical to the whole tensor.
        ``grad``: the whole gradient, or a function of a flat range ``(start, end)`` giving that range of it.
        ``offload``: ``state`` lives in CPU memory and each chunk's part of it goes through ``p``'s device."""
        like = p.detach() if callable(grad) else grad
        dtype = state_dtype_for(p, like.dtype)
        if offload or dtype != like.dtype:  # stride 0: nothing the size of the tensor is allocated to describe it
            like = torch.zeros(1, dtype=dtype, device="cpu" if offload else like.device).expand(like.shape)
        parts.rule.init_state(state, parts.store, like)
        state.setdefault("step", 0)
        flat_p = p.view(-1)
        flat_grad = None if callable(grad) else grad.view(-1)
        grad_range = grad if callable(grad) else (lambda start, end: flat_grad[start:end])
        per_row = parts.rule.row_moments
        shaped = tuple(key for key in parts.rule.moments if key not in per_row)
        width = p.shape[-1] if parts.rule.row_local else 1
        for start, end in chunk_ranges(parts, p.shape):
            part = parts.store.chunk(state, shaped, start, end)
            if per_row:  # the ranges hold whole rows (on 8-bit block boundaries too): those rows' statistics
                part.update(parts.store.chunk(state, per_row, start // width, end // width))
            working = to_device(part, p.device) if offload else part
            self._update(flat_p[start:end], grad_range(start, end), working, group, parts, None, (p, start))
            if offload:
                back_to_host(part, working, wait=True)  # the host reads it next (8-bit: write_chunk)
            parts.store.write_chunk(state, part, shaped, start, end)
            if per_row:
                parts.store.write_chunk(state, part, per_row, start // width, end // width)
        state["step"] += 1

    def _ordinal(self, p: torch.Tensor) -> int:
        """``p``'s place among every group's parameters (what keys its rounding bits: stable across a resume)."""
        if getattr(self, "_ordinals", None) is None or id(p) not in self._ordinals:
            self._ordinals = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
        return self._ordinals[id(p)]

    def _update(self, p, grad, state: dict, group: dict, parts: Parts, low: torch.Tensor | None,
                whole: tuple | None = None) -> None:
        """``update_param`` on a tensor (or a chunk of one: ``whole`` = (the tensor, the chunk's start)) with its
        gradient and state; a bf16 ``p`` under ``bf16_stochastic_round`` is updated in fp32 and rounded once."""
        if p.dtype == torch.float16:  # fp16 weights: the step in fp32 (fp32 states), rounded once to the weight
            updated = p.float()  # (``state_dtype_for``)
            self._update(updated, grad.float(), state, group, parts, None if low is None else low.float(),
                         whole or (p, 0))
            p.copy_(updated)
            return
        if fused.wants_rounding(group, p):
            updated = p.float()
            self._update(updated, grad, state, {**group, "bf16_stochastic_round": False}, parts, low)
            owner, chunk = whole or (p, 0)
            fused.stochastic_round_into(p, updated, fused.round_seed(self._ordinal(owner), state["step"], chunk))
            return
        lr, wd = group["lr"], group["weight_decay"]
        if low is None:
            if parts.projector.needs_refresh(state):
                try:
                    parts.projector.refresh(state, grad)
                except torch.linalg.LinAlgError as err:  # an SVD of a gradient with NaN / inf
                    raise _nonfinite_refresh(group, whole[0] if whole else p, state) from err
                if group.get("reset_statistics") and "step" in state:
                    parts.rule.reset(state, parts.store)
            low = parts.projector.down(state, grad)
        state["step"] = state.get("step", 0) + 1
        if low is None:
            direction, step_size, decay_lr = None, lr, lr
        else:
            direction, step_size, decay_lr = parts.rule.direction(low, state, parts.store, lr, p)
        decay = parts.rule.decay
        if wd and decay == "mul_before":
            p.mul_(1 - decay_lr * wd)
        elif wd and decay == "add_before":
            p.add_(p, alpha=-float(decay_lr) * wd)
        parts.lift.apply(p, grad, low, direction, step_size, state, parts.projector, lr)
        if wd and decay == "after":
            p.add_(p, alpha=-decay_lr * wd)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load groups and state, keeping every state tensor's own dtype (moved to its param's device).

        torch's loader casts floating state to the parameter's dtype, which would turn fp32 moments of
        a bf16 model (``state_dtype="float32"``) into bf16 and FRUGAL's int64 indices into floats.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        for group in self.param_groups:  # BAdam: the saved block trains again
            projector = build_parts(group).projector
            if projector.chooses_ahead:
                self.activate_block(group, projector.active(group), reset=False)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(saved_ids, params, strict=True))
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, saved in saved_state.items():
            param = by_id[pid]
            if offloads(group_of[id(param)], param):  # offloaded states stay in (pinned) CPU memory
                self.state[param] = {k: host_copy(v) if torch.is_tensor(v) else v for k, v in saved.items()}
                continue
            self.state[param] = {
                k: v.to(device=param.device) if torch.is_tensor(v) else v for k, v in saved.items()
            }

    def state_dict(self) -> dict:
        """torch's ``state_dict``, after the copies of offloaded states (``offload_states``) have landed."""
        wait_for_device(self.param_groups)
        return super().state_dict()

    def state_bytes(self) -> int:
        """Exact bytes of every tensor this optimizer holds as state."""
        return sum(state_bytes(s) for s in self.state.values())


def _refuse_sparse(grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError("lowmem optimizers do not support sparse gradients")


def check_hyperparameters(group: dict) -> None:
    """``ValueError`` in torch.optim's words for a learning rate, weight decay, eps or beta out of range, and for a
    tensor ``lr`` of more than one element."""
    lr = group.get("lr")
    if torch.is_tensor(lr) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if lr is not None and not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")
    eps = group.get("eps")
    for value in eps if isinstance(eps, (tuple, list)) else [eps]:
        if value is not None and not 0.0 <= value < math.inf:
            raise ValueError(f"Invalid epsilon value: {eps}")
    for i, beta in enumerate(group.get("betas") or ()):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    beta1 = group.get("beta1")
    if beta1 is not None and not 0.0 <= beta1 < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
    weight_decay = group.get("weight_decay")
    if weight_decay is not None and not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    for flag, fix in (("maximize", "minimize the negated objective"), ("amsgrad", "use plain AdamW's moments")):
        if group.get(flag):
            raise ValueError(f"{flag}=True is not supported by lowmem optimizers (it would be ignored): {fix}.")


def updates_in_chunks(parts: Parts, shape: torch.Size) -> bool:
    """Whether a tensor of ``shape`` in a group with these parts is updated a range of elements at a time
    (``chunk_ranges``): over ``CHUNK`` elements, not projected, the plain lift, and an elementwise rule (or one whose
    rows are independent, on a matrix)."""
    local = parts.rule.elementwise or (parts.rule.row_local and len(shape) == 2)
    return math.prod(shape) > CHUNK and type(parts.projector) is Projector and type(parts.lift) is Lift and local


def chunk_ranges(parts: Parts, shape: torch.Size) -> list[tuple[int, int]]:
    """The flat ``(start, end)`` ranges a tensor of ``shape`` is updated in (``updates_in_chunks``): ``CHUNK``
    elements, or for a row-local rule about ``CHUNK`` elements of whole rows, their count a multiple of the state
    store's block (8-bit blocks then never straddle two ranges, in the row-shaped moments nor in the per-row ones)."""
    numel = math.prod(shape)
    unit = shape[-1] * getattr(parts.store, "blocksize", 1) if parts.rule.row_local else 1
    span = max(1, CHUNK // unit) * unit
    return [(start, min(start + span, numel)) for start in range(0, numel, span)]


def state_dtype_for(p: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a state made like ``p``'s gradient gets: fp32 for fp16 weights, whose step runs in fp32 (in fp16
    Adam's eps 1e-8 is 0 and Fira's / APOLLO's ratios overflow: a step there makes inf weights, as torch's AdamW
    does); the gradient's otherwise."""
    return torch.float32 if p.dtype == torch.float16 else dtype


def _nonfinite_refresh(group: dict, p: torch.Tensor, state: dict) -> FloatingPointError:
    """The error for an SVD projection refreshed from a gradient with NaN / inf, reachable with
    ``skip_nonfinite=False`` only: there is no projection to compute (on CPU torch raises ``LinAlgError``)."""
    names = dict(zip(map(id, group["params"]), group.get("param_names") or (), strict=False))
    name = names.get(id(p), f"a {tuple(p.shape)} weight")
    return FloatingPointError(
        f"the gradient of {name!r} has NaN or inf values at update {state.get('step', 0) + 1}, where its low-rank "
        "projection is recomputed from it by an SVD: it has none. Keep skip_nonfinite=True (the default: such "
        "updates are skipped).")


def _in_chunks(p: torch.Tensor, grad: torch.Tensor, parts: Parts) -> bool:
    """``updates_in_chunks`` for ``p``, whose weight and gradient must also be contiguous (flat views)."""
    return (updates_in_chunks(parts, grad.shape) and p.is_contiguous() and grad.is_contiguous()
            and not is_sharded(p))  # a sharded tensor's flat view is not this rank's rows
