"""Lifts: HOW a subspace direction becomes a full-rank update of the weight.

A lift receives the raw gradient ``G``, its projection ``R`` (None when the projector kept nothing,
e.g. an inactive FRUGAL block), the rule's direction ``N`` and step size ``s``, and applies
``W -= s * U`` (plus any state-free residual) to the parameter in place.

| lift          | update ``U``                                                        | used by      |
|---------------|---------------------------------------------------------------------|--------------|
| project_back  | ``alpha * up(N)``                                                   | GaLore, AdamW|
| frugal        | ``up(N)`` (lr x proj_params_lr_scale) + sign-SGD/SGD of ``G - up(R)`` | FRUGAL       |
| fira          | ``alpha * up(N) + limit(phi * (G - alpha * up(R)))``                | Fira         |
| apollo        | ``sqrt(alpha) * limit(phi * G)``, phi channel- or tensor-wise       | APOLLO(-Mini)|

``phi`` is the ratio of the direction's norm to the projected gradient's norm, per channel along
the dimension the rank does not cut (rows when the rank sits on the right, columns when on the left)
or for the whole tensor. The limiter (Fira's norm-growth limiter, gamma = 1.01) caps the growth of
``||S||`` between steps; it keeps one 0-d tensor in the state and never syncs with the host.
"""

from __future__ import annotations

import math

import torch

from .projectors import Projector
from .sharded import settled

LIMITER_GAMMA = 1.01


def growth_limiter(norm: torch.Tensor, state: dict, gamma: float = LIMITER_GAMMA) -> torch.Tensor | None:
    """The divisor that caps ``norm`` at ``gamma`` x the previous step's; records the limited norm.

    None on the first step (nothing to compare with). A 0-d tensor otherwise: no host sync. A sharded norm is
    reduced here, so the state keeps a plain replicated value (which a checkpoint saves as one tensor).
    """
    norm = settled(norm)
    if "limiter_norm" not in state:
        state["limiter_norm"] = norm
        return None
    growth = norm / (state["limiter_norm"] + 1e-8)
    # Exactly 1.0 when the norm grew less than gamma (dividing gamma by itself is not 1.0 in bf16).
    limiter = torch.where(growth >= gamma, growth / gamma, 1.0)
    state["limiter_norm"] = norm / limiter
    return limiter


def limit_norm_growth(update: torch.Tensor, state: dict, gamma: float = LIMITER_GAMMA) -> torch.Tensor:
    """Rescale ``update`` (in place) so its norm grows at most ``gamma`` x over the previous step's."""
    limiter = growth_limiter(torch.norm(update), state, gamma)
    return update if limiter is None else update.div_(limiter)


def scaled_norm(grad: torch.Tensor, coef: torch.Tensor, side: str, scale_type: str) -> torch.Tensor:
    """``||grad * coef||`` without forming the product: the norms of the rows/columns coef scales."""
    if scale_type == "tensor":
        return torch.linalg.vector_norm(grad, dtype=torch.float32) * coef
    dim = 1 if side == "right" else 0
    return torch.linalg.vector_norm(coef.reshape(-1) * torch.linalg.vector_norm(grad, dim=dim, dtype=torch.float32))


def channel_ratio(direction: torch.Tensor, low: torch.Tensor, side: str, scale_type: str) -> torch.Tensor:
    """``||N|| / (||R|| + 1e-8)`` per channel (broadcastable to the full gradient) or per tensor."""
    if scale_type == "tensor":
        return torch.norm(direction) / (torch.norm(low) + 1e-8)
    if side == "right":  # R is m x r: one factor per row
        return (torch.norm(direction, dim=1) / (torch.norm(low, dim=1) + 1e-8)).unsqueeze(1)
    if side == "left":  # R is r x n: one factor per column
        return torch.norm(direction, dim=0) / (torch.norm(low, dim=0) + 1e-8)
    raise ValueError("channel-wise scaling needs a one-sided projection (proj_type std/reverse_std/left/right)")


class Lift:
    """Base lift: ``W -= s * alpha * up(N)`` (GaLore's back-projection; plain AdamW when alpha = 1)."""

    #: Whether the update reads the full gradient, not only its projection (then layer-wise gradient
    #: accumulation cannot be kept in the projected space).
    needs_full_gradient = False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def apply(self, p, grad, low, direction, step_size, state, projector: Projector, lr: float) -> None:
        direction = _like(direction, grad)
        if projector.add_up_(p, state, direction, self.scale, -step_size):
            return
        update = projector.up(state, direction, grad)
        if self.scale != 1.0:
            update = update * self.scale if update is grad else update.mul_(self.scale)
        p.add_(update, alpha=-step_size)


def _like(direction: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """States may be kept in another dtype than the gradient: compute the update in the grad's."""
    return direction if direction.dtype == grad.dtype else direction.to(grad.dtype)


class FrugalLift(Lift):
    """FRUGAL: the stateful subspace update plus a state-free update of the residual."""

    needs_full_gradient = True

    RULES = ("sign_sgd", "sgd", "no")

    def __init__(self, inactive_update_rule="sign_sgd", inactive_lr_scale=1.0, proj_params_lr_scale=1.0):
        if inactive_update_rule not in self.RULES:
            raise ValueError(f"unknown inactive_update_rule {inactive_update_rule!r}; use one of {self.RULES}")
        super().__init__(1.0)
        self.rule, self.inactive_scale, self.proj_scale = inactive_update_rule, inactive_lr_scale, proj_params_lr_scale

    def apply(self, p, grad, low, direction, step_size, state, projector, lr):
        active_lr = lr * self.proj_scale
        update = None
        if direction is not None:
            update = projector.up(state, _like(direction, grad) * (-self.proj_scale * step_size), grad)
        if self.rule != "no":
            residual = projector.residual(state, grad, low)
            if residual is not None:
                if self.rule == "sign_sgd":  # in place unless the residual is the gradient itself
                    free = residual.sign() if residual is grad else residual.sign_()
                else:
                    free = residual
                inactive_lr = active_lr * self.inactive_scale
                if update is None:
                    update = free * -inactive_lr
                else:
                    update.add_(free, alpha=-inactive_lr)
        if update is not None:
            p.add_(update)


class FiraLift(Lift):
    """Fira: back-projection plus the norm-scaled residual, alpha inside the residual as the reference."""

    needs_full_gradient = True

    def apply(self, p, grad, low, direction, step_size, state, projector, lr):
        direction = _like(direction, grad)
        phi = channel_ratio(direction, low, projector.side(grad.shape), "channel")
        residual = torch.sub(grad, projector.up(state, low, grad).mul_(self.scale)).mul_(phi)
        residual = limit_norm_growth(residual, state)
        update = projector.up(state, direction, grad).mul_(self.scale).add_(residual)
        p.add_(update, alpha=-step_size)


class ApolloLift(Lift):
    """APOLLO / APOLLO-Mini: scale the raw gradient channel- or tensor-wise, times sqrt(alpha)."""

    needs_full_gradient = True

    def __init__(self, scale=1.0, scale_type="channel", scale_front=False, limiter=True):
        if scale_type not in ("channel", "tensor"):
            raise ValueError(f"unknown scale_type {scale_type!r}; use 'channel' or 'tensor'")
        super().__init__(scale)
        self.scale_type, self.scale_front, self.limiter = scale_type, scale_front, limiter

    def apply(self, p, grad, low, direction, step_size, state, projector, lr):
        side = projector.side(grad.shape)
        if grad.dtype == torch.float32:
            self._apply_fused(p, grad, low, direction, step_size, state, side)
        else:
            self._apply_in_reference_order(p, grad, low, direction, step_size, state, side)

    def _apply_fused(self, p, grad, low, direction, step_size, state, side):
        """fp32: S = sqrt(alpha) * limit(phi * G) is never formed, only its per-channel coefficient (an m- or
        n-vector, or a scalar); the limiter reads ||phi * G|| from G's row/column norms and the weight takes
        the update in one addcmul_. Saves the m x n temporary and four passes over it; equal to the
        reference to fp32 rounding (~1e-7 relative)."""
        root = math.sqrt(self.scale)
        coef = channel_ratio(direction, low, side, self.scale_type)
        if self.scale_front:
            coef = coef * root
        if self.limiter:
            limiter = growth_limiter(scaled_norm(grad, coef, side, self.scale_type), state)
            if limiter is not None:
                coef = coef / limiter
        if not self.scale_front:
            coef = coef * root
        p.addcmul_(grad, coef, value=-step_size)

    def _apply_in_reference_order(self, p, grad, low, direction, step_size, state, side):
        """bf16/fp16: form S in the gradient's dtype with apollo-torch's sequence of roundings, so
        low-precision weights stay bit-identical to the reference (one fused rounding drifts by ulps)."""
        update = grad * channel_ratio(_like(direction, grad), low, side, self.scale_type)
        if self.scale_front:
            update *= math.sqrt(self.scale)
        if self.limiter:
            update = limit_norm_growth(update, state)
        if not self.scale_front:
            update *= math.sqrt(self.scale)
        p.add_(update, alpha=-step_size)


def make_lift(group: dict) -> Lift:
    """Build the lift named by ``group['lift']`` with the group's options."""
    name = group.get("lift", "project_back")
    if name == "project_back":
        return Lift(group.get("scale", 1.0))
    if name == "frugal":
        return FrugalLift(
            group.get("inactive_update_rule", "sign_sgd"),
            group.get("inactive_lr_scale", 1.0),
            group.get("proj_params_lr_scale", 1.0),
        )
    if name == "fira":
        return FiraLift(group.get("scale", 1.0))
    if name == "apollo":
        return ApolloLift(
            group.get("scale", 1.0),
            group.get("scale_type", "channel"),
            group.get("scale_front", False),
            not group.get("disable_nl", False),
        )
    raise ValueError(f"unknown lift {name!r}; use 'project_back', 'frugal', 'fira' or 'apollo'")
