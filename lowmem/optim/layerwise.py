"""Layer-wise updates: a ``LowMemOptimizer`` updates each parameter inside backward, then frees its gradient.

``optimizer.enable_layerwise()`` registers a post-accumulate-grad hook on every trainable parameter. When a
parameter's gradient is complete, the hook runs that parameter's ordinary update (the same code as
``step()``, so the result is the same) and drops the gradient, so the whole set of gradients never exists at
once. The optimizer stays one object: one set of param groups (one learning-rate schedule drives them all),
one ``state_dict`` with every moment and projector, and ``step()`` still closes each step.

Gradient accumulation. Only the last micro-batch of a step updates; the earlier ones run under
``with updates.accumulating():`` (the lowmem Trainer does this for you). What the gradients cost then:

* no accumulation: one parameter's gradient at a time;
* ``accumulation="projected"`` (default): a weight whose update reads only its projected gradient (GaLore's
  back-projection lift, any rule) keeps the running sum in the projected space, ``r x n`` instead of ``m x n``,
  except in a step where its projector refreshes: the new subspace needs the whole step's gradient, so that step
  keeps the full sum. FRUGAL, Fira and APOLLO read the full gradient (the residual / the channel scaling), and
  unprojected parameters have no smaller space: they keep a full-size sum in ``.grad`` as without layer-wise;
* ``accumulation="full"``: every parameter keeps its full-size sum in ``.grad`` (no saving on gradients).

Projection is linear, so the projected sum equals the projection of the summed gradient up to rounding.

``last_grad_norm`` is the 2-norm of the gradients the step used, taken before any update; in a projected
accumulation step a projected weight counts with its projected sum (the part its update sees).
Gradients cannot be clipped by their global norm here: each weight updates before the other gradients exist.

Under DDP (``updates.attach(ddp_model)``; the lowmem Trainer does it) a weight's local gradient is not the one to
use: the updates move into a DDP communication hook and run as each bucket's all-reduce completes, on the averaged
gradients, so every rank updates the same way as one process with the whole batch. Micro-batches before a step's
last only accumulate in ``.grad`` (under ``no_sync``; where DDP all-reduces them anyway, the hook leaves the average
there and the last all-reduce averages the sum). DDP keeps its full-size gradient buckets whatever the optimizer does,
so what layer-wise mode saves there is the optimizer's per-update temporaries.

Under FSDP2 each parameter is a shard, and torch's FSDP2 runs its post-accumulate-grad hooks right after the
reduce-scatter that produced the shard's gradient: the hooks above update there, on the reduced shard, and free it.
When accelerate swaps the sharded parameters in after the optimizer was built, ``follow_params()`` hooks them (the
lowmem Trainer calls it).
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from .sharded import is_sharded

ACCUMULATION_MODES = ("projected", "full")
#: Parameter attribute naming the ``LayerwiseUpdates`` whose hook updates it (a weak reference).
_OWNER = "_lowmem_layerwise_owner"


def check_accumulation(mode: str) -> None:
    """``ValueError`` naming the valid modes unless ``mode`` is one."""
    if mode not in ACCUMULATION_MODES:
        raise ValueError(f"layerwise_accumulation={mode!r}: use one of {ACCUMULATION_MODES} "
                         "('projected' keeps GaLore's accumulated gradient in its subspace).")


class LayerwiseUpdates:
    """The hooks that run a ``LowMemOptimizer``'s per-parameter updates inside backward (see the module doc)."""

    def __init__(self, optimizer, accumulation: str = "projected"):
        check_accumulation(accumulation)
        self.optimizer = optimizer
        self.accumulation = accumulation
        #: False while a backward only accumulates (a micro-batch before the last of a step).
        self.sync = True
        #: The 2-norm of the last finished step's gradients (None before the first).
        self.last_grad_norm: float | None = None
        self._squared_norm: torch.Tensor | None = None
        self._projected_sums: dict[torch.Tensor, torch.Tensor] = {}
        self._group_index: dict[torch.Tensor, int] = {}
        self._place: dict[torch.Tensor, int] = {}  # a parameter's place in its group (for messages)
        #: The DDP module whose all-reduce hook runs the updates (``attach``), else None.
        self.ddp = None
        self._updated: set[int] = set()  # ids of the parameters a DDP hook updated this step
        self._lock = threading.Lock()  # DDP's bucket callbacks may run on the process group's threads
        #: The head and embedding whose updates stream inside their backward (``stream_rows``).
        self.streamed = []
        self._handles = []
        self._bind()

    def _bind(self) -> None:
        """Hook the optimizer's parameters as they are now."""
        for index, group in enumerate(self.optimizer.param_groups):
            for place, p in enumerate(group["params"]):
                if p.requires_grad:
                    _take_over(p, self)
                    self._group_index[p], self._place[p] = index, place
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))

    @contextlib.contextmanager
    def accumulating(self):
        """Backward passes inside only accumulate gradients (micro-batches before a step's last)."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def attach(self, ddp_model) -> None:
        """Run the updates after DDP's all-reduce of each bucket instead of on the local gradients (see the module
        doc). Call once, after wrapping the model in ``DistributedDataParallel`` and before its first backward."""
        if self.ddp is ddp_model:
            return
        if self.ddp is not None:
            raise ValueError("these layer-wise updates are already attached to another DDP model")
        wrapped = {id(p) for p in ddp_model.parameters() if p.requires_grad}
        missing = [self.optimizer.param_name(self._group_index[p], self._place[p]) for p in self._group_index
                   if id(p) not in wrapped]
        if missing:
            raise ValueError(f"the DDP model does not hold the optimizer's parameters {missing[:3]}: wrap the model "
                             "the optimizer was built on.")
        ddp_model.register_comm_hook(ddp_model.process_group, self._ddp_hook)
        self.ddp = ddp_model

    def _ddp_hook(self, process_group, bucket):
        """DDP's default all-reduce (an average), then the updates of the bucket's parameters."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def update(future):
            reduced = future.value()[0]
            with self._lock, torch.no_grad():
                for p, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
                    self._update_reduced(p, grad.view_as(p))
            return reduced
        return allreduce_hook(process_group, bucket).then(update)

    def _update_reduced(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """The update of ``p`` with its all-reduced gradient (``.grad`` is DDP's until backward ends). In a micro-batch
        before a step's last (accelerate does not always skip DDP's all-reduce there) nothing updates: DDP leaves the
        average in ``.grad``, the next backward adds to it, and its all-reduce gives the average of the sum."""
        if p not in self._group_index or not self.sync:
            return
        own = p.grad
        p.grad = grad
        try:
            self._apply(p)
        finally:
            p.grad = own
        self._updated.add(id(p))

    def follow_params(self) -> None:
        """Hook the optimizer's parameters again if they were replaced since (accelerate's FSDP2 preparation swaps each
        for its sharded DTensor after the optimizer was built); the lowmem Trainer calls this before each step."""
        if all(p in self._group_index for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad):
            return
        if self.optimizer.state:
            raise ValueError("the optimizer's parameters were replaced after it stepped: its state is keyed by the old "
                             "ones. Shard the model before the first step.")
        self._unhook()
        self._bind()

    def _apply(self, p: torch.Tensor, low: torch.Tensor | None = None) -> None:
        """``p``'s update from ``p.grad`` (or its projected sum ``low``), counted in the step's norm, unless the
        gradient it would use is not finite (then counted as a skip)."""
        index = self._group_index[p]
        used = p.grad if low is None else low
        if self._finite(p, index, used):
            self.count_norm(used)
            self.optimizer.update_param(p, self.optimizer.param_groups[index], self.optimizer.parts_for_step(index),
                                        low)

    def release_updated(self) -> None:
        """Drop the gradients DDP left on the parameters its hook already updated (``step()`` calls this first)."""
        if self._updated:
            for p in self._group_index:
                if id(p) in self._updated:
                    p.grad = None

    @torch.no_grad()
    def _on_gradient(self, p: torch.Tensor) -> None:
        if p.grad is None:  # no gradient reached it (a streamed head or embedding updates in its own backward)
            return
        if self.ddp is not None:
            return  # the local gradient: DDP reduces it (or, in a micro-batch before the last, it accumulates)
        if not is_sharded(p):  # FSDP2 runs a shard's hooks after its reduce-scatter: that gradient is reduced
            _refuse_unreduced(self)
        index = self._group_index[p]
        if not self.sync:
            self._accumulate(p, self.optimizer.parts_for_step(index, choose_blocks=False))
            return
        low = self._projected_sums.pop(p, None)
        if low is not None:
            low.add_(self.optimizer.parts_for_step(index).projector.down(self.optimizer.state[p], p.grad))
        self._apply(p, low)
        p.grad = None

    def _finite(self, p: torch.Tensor, index: int, used: torch.Tensor) -> bool:
        """True when the gradient the update of ``p`` would use is finite (or the group does not screen); else the
        skip is counted (a NaN in any micro-batch reaches the step's sum, so one test per step covers them all)."""
        if not self.optimizer.param_groups[index].get("skip_nonfinite", True):
            return True
        return not self.optimizer.count_nonfinite([(index, self._place[p], p)], [used])

    def _accumulate(self, p: torch.Tensor, parts) -> None:
        """Move ``p.grad`` into its projected running sum where that is exact; else leave it in ``.grad``."""
        if self.accumulation != "projected" or parts.lift.needs_full_gradient or parts.projector.side(p.shape) is None:
            return
        state = self.optimizer.state[p]
        running = self._projected_sums.get(p)
        if running is None:
            if parts.projector.needs_refresh(state):
                return  # the refresh at this step's update needs the full summed gradient
            self._projected_sums[p] = parts.projector.down(state, p.grad)
        else:
            running.add_(parts.projector.down(state, p.grad))
        p.grad = None

    def count_norm(self, grad: torch.Tensor) -> None:
        """Add a gradient to this step's norm (no host sync)."""
        self._add_squared_norm(squared_norm(grad))

    def _add_squared_norm(self, squared: torch.Tensor) -> None:
        self._squared_norm = squared if self._squared_norm is None else self._squared_norm + squared

    def stream_rows(self, model) -> list:
        """Update ``model``'s output head and input embedding a range of rows at a time inside their own backward,
        where they can (``streamed_rows``); the modules that do."""
        from ..kernels.linear_ce import STREAM_ATTR
        from ..kernels.model_patch import is_patched
        from .streamed_rows import RowsConsumer, can_stream, stream

        def module(getter: str):
            get = getattr(model, getter, None)
            return get() if callable(get) else None

        head, embedding = module("get_output_embeddings"), module("get_input_embeddings")
        tied = getattr(head, "weight", None) is getattr(embedding, "weight", False)
        for layer in (head, embedding):
            if tied or not can_stream(self, layer):
                continue
            if layer is head and is_patched(model):  # the loss without logits hands over the rows (``linear_ce``)
                setattr(layer.weight, STREAM_ATTR, RowsConsumer(self, layer.weight))
            else:
                stream(self, layer)
            self.streamed.append(layer)
        return list(self.streamed)

    def check_params(self) -> None:
        """``ValueError`` if the optimizer's parameters are no longer the ones hooked (accelerate's FSDP2 preparation
        swaps each for its sharded DTensor): their updates would silently wait for ``step()``."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p not in self._group_index:
                    raise ValueError("the optimizer's parameters were replaced after its layer-wise hooks were set "
                                     f"({'by FSDP2 sharding' if is_sharded(p) else 'by new tensors'}), so those hooks "
                                     "never fire. Call optimizer.layerwise.follow_params() after sharding (the "
                                     "lowmem Trainer does), build the optimizer after wrapping the model, or drop "
                                     "'_layerwise'.")

    @torch.no_grad()
    def end_step(self) -> None:
        """Close a step (``optimizer.step()`` calls this): update weights whose projected sum got nothing from
        the last micro-batch, and record the step's gradient norm."""
        for p, low in list(self._projected_sums.items()):
            p.grad = torch.zeros_like(p)  # the lift reads only its shape and dtype
            self._apply(p, low)
            p.grad = None
        self._projected_sums.clear()
        self._updated.clear()
        if self._squared_norm is not None:
            self.last_grad_norm = self._squared_norm.sqrt().item()
        self._squared_norm = None

    def remove(self) -> None:
        """Remove the hooks (and a streamed head's forward); the optimizer goes back to updating in ``step()``."""
        self._unhook()
        from ..kernels.linear_ce import STREAM_ATTR

        for module in self.streamed:
            if STREAM_ATTR in module.weight.__dict__:
                delattr(module.weight, STREAM_ATTR)
            else:
                del module.forward  # the class's own forward again
        self.streamed.clear()
        self.optimizer.layerwise = None

    def _unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self._group_index:
            if _owner(p) is self:
                delattr(p, _OWNER)
        self._group_index.clear()
        self._place.clear()


def _refuse_unreduced(updates: LayerwiseUpdates) -> None:
    """``ValueError`` when several processes train and no DDP model is attached: each would update its weights
    with its own local gradient, silently training something else on every rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"layer-wise updates in {dist.get_world_size()} processes need the gradients reduced first: "
                         "wrap the model in DistributedDataParallel and call optimizer.layerwise.attach(ddp_model) "
                         "before the first backward (the lowmem Trainer does this), or drop '_layerwise'.")


def _owner(p: torch.Tensor):
    ref = getattr(p, _OWNER, None)
    owner = ref() if ref is not None else None
    return owner if owner is not None and p in owner._group_index else None


def _take_over(p: torch.Tensor, updates: LayerwiseUpdates) -> None:
    """One layer-wise optimizer per parameter: a new one (say, the Trainer rebuilding its optimizer) removes the
    hooks of the one before, which would otherwise update the weight a second time."""
    previous = _owner(p)
    if previous is not None and previous is not updates:
        previous.remove()
    setattr(p, _OWNER, weakref.ref(updates))


#: Elements of a 16-bit gradient whose fp32 norm is taken at once (``squared_norm``).
NORM_CHUNK = 1 << 20


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """The squared 2-norm of ``grad`` in fp32. A large 16-bit gradient is reduced ``NORM_CHUNK`` elements at a
    time: ``vector_norm(dtype=float32)`` casts the whole tensor first, which for a LLaMA-1.1B head's bf16 gradient is
    a 262 MB fp32 copy at the step's peak (and its one long fp32 sum is less accurate than the sum of chunks')."""
    if grad.dtype == torch.float32 or grad.numel() <= NORM_CHUNK or is_sharded(grad) or not grad.is_contiguous():
        return torch.linalg.vector_norm(grad, dtype=torch.float32).square()
    parts = [torch.linalg.vector_norm(part, dtype=torch.float32) for part in grad.view(-1).split(NORM_CHUNK)]
    return torch.stack(parts).square().sum()
