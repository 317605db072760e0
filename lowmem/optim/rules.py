"""Rules: HOW moments are kept for a (possibly projected) gradient.

A rule takes the gradient it is given (full or low-rank), its state, the group's lr and the parameter,
and returns ``(direction N, step_size, decay_lr)``: the lift turns them into ``W -= step_size * lift(N)``
and the optimizer decays the weight by ``decay_lr * weight_decay`` where the rule's numeric core puts
it (``decay``: ``mul_before`` = torch's ``W *= 1 - lr wd``; ``add_before`` = ``W += -lr wd W`` before the
update, Adafactor/CAME; ``after`` = after the update, the legacy transformers AdamW). A rule knows
nothing about projection.

Two AdamW numeric cores recur in the reference code and differ in the last bits:

* ``hf`` (GaLore, APOLLO, Fira copy the legacy transformers AdamW):
  ``N = m / (sqrt(v) + eps)``, step ``lr sqrt(1 - b2^t) / (1 - b1^t)``, decay applied *after* the update.
* ``torch`` (torch.optim.AdamW, FRUGAL):
  ``N = m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, step ``lr / (1 - b1^t)``, decay applied *before*.

Memory: AdamW keeps two tensors shaped like its input; sign-SGD and SGD keep nothing.
"""

from __future__ import annotations

import math

import torch

from .states import StateStore


class Rule:
    """Base rule: state-free SGD (``N = g``)."""

    stateful = False
    #: Where the numeric core applies weight decay: ``mul_before``, ``add_before`` or ``after``.
    decay = "mul_before"

    def direction(self, grad: torch.Tensor, state: dict, store: StateStore, lr: float, param: torch.Tensor):
        return grad, lr, lr

    def reset(self, state: dict, store: StateStore) -> None:
        """Zero the statistics and restart bias correction (FRUGAL's ``reset_statistics``)."""
        state["step"] = 0


class SignSGD(Rule):
    """State-free sign descent: ``N = sign(g)``."""

    def direction(self, grad, state, store, lr, param):
        return grad.sign(), lr, lr


class AdamW(Rule):
    """Adam moments with either numeric core (see the module docstring)."""

    stateful = True

    def __init__(self, betas=(0.9, 0.999), eps: float = 1e-6, correct_bias: bool = True, core: str = "hf"):
        if core not in ("hf", "torch"):
            raise ValueError(f"unknown AdamW core {core!r}; use 'hf' or 'torch'")
        self.beta1, self.beta2 = betas
        self.eps, self.correct_bias, self.core = eps, correct_bias, core
        self.decay = "after" if core == "hf" else "mul_before"

    def direction(self, grad, state, store, lr, param):
        if "exp_avg" not in state:
            store.init(state, "exp_avg", grad, signed=True)
            store.init(state, "exp_avg_sq", grad, signed=False)
        m, v = store.load(state, "exp_avg"), store.load(state, "exp_avg_sq")
        b1, b2, t = self.beta1, self.beta2, state["step"]
        m.mul_(b1).add_(grad, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = v.sqrt()
        factor = 1.0
        if self.core == "hf":
            denom.add_(self.eps)
            if self.correct_bias:
                factor = math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        else:
            if self.correct_bias:
                denom.div_(math.sqrt(1.0 - b2**t))
                factor = 1.0 / (1.0 - b1**t)
            denom.add_(self.eps)
        direction = torch.div(m, denom, out=denom)
        store.save(state, "exp_avg", m, signed=True)
        store.save(state, "exp_avg_sq", v, signed=False)
        return direction, lr * factor, lr

    def reset(self, state, store: StateStore):
        state["step"] = 0
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                store.zero(state, key)


def make_rule(name: str, betas=(0.9, 0.999), eps: float = 1e-6, correct_bias: bool = True) -> Rule:
    """Build a rule from its name: ``adamw_hf``, ``adamw_torch``, ``sign_sgd`` or ``sgd``."""
    if name == "adamw_hf":
        return AdamW(betas, eps, correct_bias, core="hf")
    if name == "adamw_torch":
        return AdamW(betas, eps, correct_bias, core="torch")
    if name == "sign_sgd":
        return SignSGD()
    if name == "sgd":
        return Rule()
    raise ValueError(f"unknown rule {name!r}; use 'adamw_hf', 'adamw_torch', 'sign_sgd' or 'sgd'")
