"""MeZO: zeroth-order fine-tuning with the memory of inference (SPSA with the seed trick).

Each step draws a seed, evaluates the loss at ``W + eps z`` and ``W - eps z`` (two forwards, no autograd), and
moves every trainable tensor by ``-lr (g z + wd W)`` with ``g = (L+ - L-) / (2 eps)``; ``z`` is regenerated from
the seed (``perturb``), so nothing of size ``W`` is kept. With ``zo_samples = q > 1`` (n-SPSA) each step averages
``g_k z_k`` over ``q`` seeds; with gradient accumulation each seed's ``g`` is averaged over the micro-batches
(the same ``z`` for all of them).

Used two ways:

* a plain loop: ``optimizer.step(closure)``, where ``closure()`` returns the loss of the current batch (it is
  called ``2q`` times, under ``torch.no_grad``, with the model in eval mode);
* the lowmem ``Trainer`` (``optim="mezo"``): its ``training_step`` calls ``estimate`` once per micro-batch, and
  the Trainer's own ``optimizer.step()`` and learning-rate scheduler do the rest.

Memory: no gradients and no optimizer state; during a forward, one block of noise (4 MiB) beside a linear layer
or embedding, or a perturbed copy of a smaller module's own tensors. With the Philox noise (``noise="philox"``,
the default on CUDA with Triton) the kernels draw ``z`` in registers: only the perturbed rows take memory, and the
update is one pass over each weight.

With ``offload="ram"`` or ``"disk"`` the decoder blocks live off the device (``lowmem.offload``), each step runs
the *dual* forward (the batch taken twice, the first copy at ``W + eps z`` and the second at ``W - eps z``, so each
block is brought to the device once per step and runs both), and a block's update is applied the next time the
block is resident, before anything reads it. The closure then returns the pair of losses (``pair_loss``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .compose import check_hyperparameters
from .nonfinite import SkipCounter
from .perturb import ZOParameters, check_noise, make_noise

_ZO = "zo"  # the key of the step counter in ``Optimizer.state`` (kept by state_dict / load_state_dict)


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO) over ``model``'s trainable tensors; see the module docstring.

    ``lr``: MeZO's grid is 1e-7 to 1e-6 for full fine-tuning, 1e-5 to 1e-4 for LoRA, 1e-3 to 1e-2 for prefix tuning;
    ``zo_eps``: the perturbation size (1e-3 full, 1e-2 LoRA, 1e-1 prefix); ``zo_samples``: seeds per step;
    ``seed``: the base of every step's seed (a run is reproducible, and resumes with the same noise).
    ``weight_decay`` applies to tensors of two or more dimensions (not to biases or norm weights).
    ``noise``: how ``z`` is drawn (``lowmem.optim.perturb``): ``"torch"``, torch generators per block of rows;
    ``"philox"``, Triton's Philox inside the perturbation and update kernels (their torch twins off CUDA: the same
    noise, so a CPU run reproduces a GPU run); ``"auto"`` (default), ``"philox"`` where the kernels run (CUDA with
    Triton, see ``lowmem.kernels.dispatch``), else ``"torch"``. The choice changes the noise, so resume a run with
    the same one. ``skip_nonfinite`` (default): a step whose projected gradient is NaN or inf (a loss that overflowed)
    updates nothing and keeps the step count, counted in ``nonfinite_skips``; with False such a loss is an error.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-6, weight_decay: float = 0.0, zo_eps: float = 1e-3,
                 zo_samples: int = 1, seed: int = 0, offload: str | None = None, offload_dir: str | None = None,
                 offload_layers: str | None = None, offload_device: str | None = None, noise: str = "auto",
                 skip_nonfinite: bool = True):
        if not zo_eps > 0:
            raise ValueError(f"zo_eps={zo_eps} must be positive: it is the size of the perturbation (MeZO uses 1e-3 "
                             "for full fine-tuning, 1e-2 with LoRA, 1e-1 for prefix tuning).")
        if int(zo_samples) != zo_samples or zo_samples < 1:
            raise ValueError(f"zo_samples={zo_samples} must be a positive integer (the seeds averaged per step).")
        if lr is None:
            raise ValueError("lr=None: MeZO needs a learning rate (1e-7 to 1e-6 for full weights).")
        check_hyperparameters({"lr": lr, "weight_decay": weight_decay})
        if offload is None and (offload_dir or offload_layers or offload_device):
            raise ValueError("offload_dir / offload_layers / offload_device only apply with offload='ram' or 'disk'; "
                             "set offload, or drop them.")
        check_noise(noise)  # before the streamer moves anything
        self.zo = ZOParameters(model)
        for name, p in self.zo.named:
            if p.is_complex():
                raise ValueError(f"parameter '{name}' is complex ({p.dtype}): MeZO perturbs real tensors only. Train "
                                 "a real view of it (torch.view_as_real) instead.")
        decay = [p for _, p in self.zo.named if p.dim() >= 2]
        no_decay = [p for _, p in self.zo.named if p.dim() < 2]
        groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay))
        #: ``lowmem.offload.BlockStreamer`` when the decoder blocks are offloaded (then each step runs the dual
        #: forward, and a block's update waits until the block is next resident). Built last: offloaded tensors
        #: are empty placeholders between their turns, so nothing may read their shapes after this.
        self.streamer = None
        if offload is not None:
            from ..offload import BlockStreamer, make_store

            device = torch.device(offload_device or ("cuda" if torch.cuda.is_available() else "cpu"))
            store = make_store(offload, offload_dir, pin=device.type == "cuda")
            self.streamer = BlockStreamer(model, store, device, offload_layers)
        # after the streamer: offloaded tensors now live (as placeholders) on the device the updates run on
        self.zo.noise = make_noise(noise, [p for _, p in self.zo.named])
        self.zo_eps, self.zo_samples, self.seed = zo_eps, int(zo_samples), int(seed)
        self.skip_nonfinite = bool(skip_nonfinite)
        self._skips = SkipCounter()
        self.state[_ZO] = {"step": 0}
        self._projected: list[float] = [0.0] * self.zo_samples
        self._estimated = False
        self._checked = False
        #: The mean projected gradient of the last step (logged as ``projected_grad`` by the lowmem Trainer).
        self.last_projected_grad: float | None = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.state.setdefault(_ZO, {"step": 0})

    @property
    def nonfinite_skips(self) -> int:
        """How many steps updated nothing because their projected gradient was NaN or inf."""
        return self._skips.count

    def step_seed(self, sample: int) -> int:
        """The seed of sample ``sample`` in the current step (from ``seed`` and the step count only)."""
        return (self.seed * 1_000_003 + self.state[_ZO]["step"]) * 64 + sample

    @torch.no_grad()
    def estimate(self, loss_fn: Callable[[], torch.Tensor], weight: float = 1.0) -> torch.Tensor:
        """Evaluate ``loss_fn`` at ``W +- eps z`` for each of the step's seeds and add ``weight * g`` to the step's
        projected gradients (``weight`` = 1 / micro-batches per step averages them). Returns the mean of the
        losses, an estimate of the loss at ``W``."""
        model = self.zo.model
        training = model.training
        model.eval()  # dropout off: both forwards evaluate the same function
        try:
            return self._estimate(loss_fn, weight)
        finally:
            model.train(training)

    def _estimate(self, loss_fn: Callable[[], torch.Tensor], weight: float) -> torch.Tensor:
        total = 0.0
        for k in range(self.zo_samples):
            seed = self.step_seed(k)
            with self.zo.recording() as touched:
                if self.streamer is None:
                    with self.zo.perturbed(seed, self.zo_eps):
                        plus = float(loss_fn())
                else:
                    with self.zo.perturbed(seed, self.zo_eps, -self.zo_eps):
                        plus, minus = _pair(loss_fn())
            if not self._checked:
                self._warn_untouched(touched)
            if self.streamer is None:
                with self.zo.perturbed(seed, -self.zo_eps):
                    minus = float(loss_fn())
            if not self.skip_nonfinite and not (abs(plus) < float("inf") and abs(minus) < float("inf")):
                raise FloatingPointError(f"MeZO: the loss is not finite at W + eps z ({plus}) or W - eps z ({minus}) "
                                         f"at step {self.state[_ZO]['step']}; lower lr or zo_eps (or pass "
                                         "skip_nonfinite=True to skip such steps).")
            self._projected[k] += weight * (plus - minus) / (2 * self.zo_eps)
            total += (plus + minus) / 2
        self._estimated = True
        return torch.tensor(total / self.zo_samples)

    def _warn_untouched(self, touched: set[int]) -> None:
        self._checked = True
        missed = [name for i, (name, _) in enumerate(self.zo.named) if i not in touched]
        if missed:
            warnings.warn(f"MeZO: {len(missed)} trainable tensors (e.g. {missed[0]!r}) were not used by a forward of "
                          "the module that owns them, so they are never perturbed and get no gradient estimate; "
                          "freeze them (requires_grad=False).", stacklevel=3)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Apply ``W -= lr (mean_k g_k z_k + wd W)`` from the estimates since the last step (``closure``, if
        given, is estimated first). Stochastic rounding for bf16 / fp16 weights."""
        loss = self.estimate(closure) if closure is not None else None
        if not self._estimated:
            raise RuntimeError("MeZO.step() needs a loss estimate first: pass a closure returning the loss, or call "
                               "estimate(loss_fn) for each micro-batch (the lowmem Trainer does so for optim='mezo').")
        grads = [g / self.zo_samples for g in self._projected]
        if not all(abs(g) < float("inf") for g in grads):  # NaN fails the test too
            self.last_projected_grad = sum(grads)
            if not self.skip_nonfinite:
                raise FloatingPointError(f"MeZO: the projected gradient is {self.last_projected_grad} at step "
                                         f"{self.state[_ZO]['step']}; lower lr or zo_eps.")
            self._skips.skip(f"MeZO's projected gradient ({self.last_projected_grad})", self.state[_ZO]["step"])
            self._projected = [0.0] * self.zo_samples
            self._estimated = False
            return loss
        seeds = [self.step_seed(k) for k in range(self.zo_samples)]
        blocks = self.streamer.block_of if self.streamer is not None else {}
        for group in self.param_groups:
            for p in group["params"]:
                args = (p, self.zo.index[id(p)], seeds, grads, float(group["lr"]), group["weight_decay"])
                if id(p) in blocks:  # offloaded: updated when its block is next on the device
                    self.streamer.defer(blocks[id(p)], lambda args=args: self._update(*args))
                else:
                    self._update(*args)
        self.last_projected_grad = sum(grads)
        self._projected = [0.0] * self.zo_samples
        self._estimated = False
        self.state[_ZO]["step"] += 1
        return loss

    def _update(self, p: torch.Tensor, index: int, seeds: list[int], grads: list[float], lr: float,
                wd: float) -> None:
        """``p -= lr (sum_k g_k z_k + wd p)`` in fp32, stochastically rounded for bf16 / fp16, by the noise that
        drew ``z`` (``p.data`` is read now: an offloaded block's update runs when the block is resident)."""
        if lr == 0:
            return
        self.zo.noise.update(p.data, index, seeds, grads, lr, wd)


def _pair(losses) -> tuple[float, float]:
    if not (isinstance(losses, (tuple, list)) and len(losses) == 2):
        raise TypeError("offloaded MeZO runs both perturbed models in one forward of the batch taken twice, so the "
                        "loss function must return (loss at W + eps z, loss at W - eps z): use "
                        "lowmem.optim.zo.pair_loss(model, batch) for a causal LM.")
    return float(losses[0]), float(losses[1])


def pair_loss(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's loss at ``W + eps z`` and at ``W - eps z`` from one forward of the batch taken twice (the
    dual forward: under ``ZOParameters.perturbed(seed, eps, -eps)`` the first copy sees the first perturbation and
    the second copy the second), each computed as the model computes its own ``loss``."""
    labels = inputs["labels"]
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.dim() else v for k, v in inputs.items()
               if k != "labels"}
    logits = model(**doubled).logits
    vocab = model.config.vocab_size
    return tuple(model.loss_function(logits=half, labels=labels, vocab_size=vocab) for half in logits.chunk(2))
