"""Drop-in classes under the reference packages' names, as thin presets over ``LowMemOptimizer``.

Each accepts its reference's constructor and param-group keys, so switching is one import:

* ``GaLoreAdamW``  (galore-torch): groups with ``rank, update_proj_gap, scale, proj_type``
* ``APOLLOAdamW``  (apollo-torch): groups with ``rank, proj, scale_type, scale, update_proj_gap,
  proj_type``; ``scale_front`` and ``disable_nl`` on the constructor
* ``FiraAdamW``    (fira): groups with ``rank, update_proj_gap, alpha, proj_type``
* ``FRUGAL``       (fzmushko/FRUGAL's GaloreAdamW / CoordAdamW / BlockAdamW in one class): groups
  marked ``is_proj_params``; ``projection`` picks svd | random | randperm | coordinates | blocks

Groups without the projection keys run the same numeric core as full-rank AdamW, as the
references do. Every class also takes lowmem's ``skip_nonfinite`` (default True: a tensor whose gradient has NaN or
inf values skips that step's update; see ``nonfinite``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..kernels import newton_schulz
from .adam_mini_blocks import adam_mini_groups, model_dims
from .compose import LowMemOptimizer, check_hyperparameters
from .rules import make_rule

_HF_CORE = dict(rule="adamw_hf")


class _HFCoreOptimizer(LowMemOptimizer):
    """The constructor GaLore and Fira share (the legacy transformers AdamW numeric core)."""

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True, no_deprecation_warning=False, state_dtype=None, skip_nonfinite=True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, state_dtype=state_dtype, **_HF_CORE, skip_nonfinite=skip_nonfinite)


class GaLoreAdamW(_HFCoreOptimizer):
    """GaLore (Zhao et al. 2024): AdamW moments in the top-r SVD subspace of each gradient.

    Memory per m x n weight (m >= n, fp32): ``4(2mr + rn)`` bytes, i.e. ``8r/n + 4r/m`` B/param
    against AdamW's 8.
    """

    def normalize_group(self, group):
        if "rank" in group:
            group.update(projector="svd", lift="project_back")
            group.setdefault("update_proj_gap", 200)
            group.setdefault("scale", 1.0)
            group.setdefault("proj_type", "std")


class APOLLOAdamW(LowMemOptimizer):
    """APOLLO (Zhu et al. 2024): channel- or tensor-wise gradient scaling estimated in a random rank-r
    sketch. APOLLO-Mini is ``rank=1, scale_type='tensor', scale=128``.

    Memory per m x n weight (m >= n, fp32): ``8mr`` bytes for the moments; the random matrix is
    regenerated from its seed rather than stored (apollo-torch also stores its ``4rn`` bytes).
    """

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
                 correct_bias=True, scale_front=False, disable_nl=False, no_deprecation_warning=True,
                 state_dtype=None, skip_nonfinite=True):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, scale_front=scale_front, disable_nl=disable_nl,
                         state_dtype=state_dtype, **_HF_CORE, skip_nonfinite=skip_nonfinite)

    def normalize_group(self, group):
        if "rank" in group:
            proj = group.setdefault("proj", "random")
            if proj not in ("random", "svd"):
                raise ValueError(f"unknown proj {proj!r} for APOLLO; use 'random' or 'svd'")
            group.update(projector="gaussian" if proj == "random" else "svd", lift="apollo")
            group.setdefault("scale_type", "channel")
            group.setdefault("scale", 1.0)
            group.setdefault("update_proj_gap", 200)
            group.setdefault("proj_type", "std")


class FiraAdamW(_HFCoreOptimizer):
    """Fira (Chen et al. 2024): GaLore plus the norm-scaled out-of-subspace residual and a limiter.

    Memory: as GaLore, plus one 0-d tensor per weight.
    """

    def normalize_group(self, group):
        if "rank" in group:
            group.update(projector="svd", lift="fira", scale=group.get("alpha", 1.0))
            group.setdefault("update_proj_gap", 200)
            group.setdefault("proj_type", "std")


_FRUGAL_PROJECTORS = {
    "svd": "svd",
    "random": "random_orth",
    "randperm": "permutation",
    "coordinates": "coordinates",
    "blocks": "blocks",
}


class FRUGAL(LowMemOptimizer):
    """FRUGAL (Zmushko et al. 2025): AdamW in a subspace, state-free sign-SGD on the rest.

    ``projection`` picks the subspace: ``svd`` / ``random`` / ``randperm`` (the reference's
    GaloreAdamW ``proj_type``, rank ``round(density * dim)`` on ``proj_side``), ``coordinates``
    (CoordAdamW, ``coord_choice`` columns | rows | randk) or ``blocks`` (BlockAdamW, whole tensors,
    ``block_order`` random | ascending | descending | mirror). Parameters outside the projected groups
    get plain AdamW. Random choices draw from the global torch RNG, as the reference does.

    Memory: AdamW states on the active subspace only, e.g. ``8 * density`` B/param on average for
    blocks; nothing for the state-free residual.
    """

    def __init__(self, params: Iterable, proj_params=None, proj_params_lr_scale=1.0, update_gap=200,
                 density=0.25, reset_statistics=True, inactive_update_rule="sign_sgd", inactive_lr_scale=1.0,
                 projection="svd", proj_side="std", coord_choice="columns", block_order="random",
                 lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, correct_bias=True,
                 svd_method="exact", state_dtype=None, skip_nonfinite=True):
        if projection not in _FRUGAL_PROJECTORS:
            raise ValueError(f"unknown FRUGAL projection {projection!r}; use one of {tuple(_FRUGAL_PROJECTORS)}")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        if proj_params is not None:
            proj_ids = {id(p) for p in proj_params}
            params = [
                {"params": [p for p in params if id(p) not in proj_ids], "is_proj_params": False},
                {"params": list(proj_params), "is_proj_params": True},
            ]
        self._frugal = dict(
            projector=_FRUGAL_PROJECTORS[projection], density=density, update_proj_gap=update_gap,
            proj_type=proj_side, coord_choice=coord_choice, block_order=block_order,
            reset_statistics=reset_statistics, inactive_update_rule=inactive_update_rule,
            inactive_lr_scale=inactive_lr_scale, proj_params_lr_scale=proj_params_lr_scale, lift="frugal",
            svd_method=svd_method,
        )
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         correct_bias=correct_bias, rule="adamw_torch", state_dtype=state_dtype,
                         skip_nonfinite=skip_nonfinite)

    def normalize_group(self, group):
        if group.get("is_proj_params"):
            for key, value in self._frugal.items():
                group.setdefault(key, value)


def _eps_pair(name: str, eps) -> tuple:
    """``eps`` as the pair ``(eps1, eps2)`` that Adafactor-style rules take, else a ``ValueError`` saying so."""
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise ValueError(f"{name} takes two eps values (eps1 for the squared gradient, eps2 for the parameter "
                         f"scale), e.g. eps=(1e-30, 1e-3); got eps={eps!r}")
    return tuple(eps)


def check_adafactor_lr(lr, relative_step: bool, warmup_init: bool) -> None:
    """Raise a ``ValueError`` naming the fix when Adafactor's lr options contradict each other."""
    if lr is not None and relative_step:
        raise ValueError(
            "Adafactor got both lr and relative_step=True: the relative step computes its own lr. "
            "Pass lr=None to keep the relative step, or relative_step=False to use your lr."
        )
    if lr is None and not relative_step:
        raise ValueError("Adafactor with relative_step=False needs an lr (e.g. lr=1e-3).")
    if warmup_init and not relative_step:
        raise ValueError("Adafactor's warmup_init works with relative_step=True only.")


class Adafactor(LowMemOptimizer):
    """Adafactor with ``transformers.optimization.Adafactor``'s constructor and numbers.

    Memory per m x n weight: ``4(m + n)`` bytes (factored second moment), ``+ 4mn`` with ``beta1``.
    """

    def __init__(self, params: Iterable, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                 beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False,
                 state_dtype=None, skip_nonfinite=True):
        check_adafactor_lr(lr, relative_step, warmup_init)
        super().__init__(params, lr=lr, eps=_eps_pair("Adafactor", eps), clip_threshold=clip_threshold,
                         decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                         relative_step=relative_step, warmup_init=warmup_init, state_dtype=state_dtype,
                         rule="adafactor", skip_nonfinite=skip_nonfinite)


class GaLoreAdafactor(Adafactor):
    """galore-torch's ``GaLoreAdafactor``: Adafactor statistics on the GaLore-projected gradient.

    Groups with ``rank, update_proj_gap, scale, proj_type`` are projected; the rest run Adafactor.
    Memory per m x n weight (m >= n): ``4(m + r)`` for the factored moment plus the ``rn`` projector.
    """

    normalize_group = GaLoreAdamW.normalize_group


class CAME(LowMemOptimizer):
    """CAME with came-pytorch's constructor and numbers (``lr`` is required).

    Memory per m x n weight: ``4mn + 8(m + n)`` bytes (about 4 B/param).
    """

    def __init__(self, params: Iterable, lr=None, eps=(1e-30, 1e-16), clip_threshold=1.0,
                 betas=(0.9, 0.999, 0.9999), weight_decay=0.0, state_dtype=None, skip_nonfinite=True):
        check_hyperparameters(dict(lr=lr, eps=eps, betas=betas, weight_decay=weight_decay))
        if lr is None or lr <= 0:
            raise ValueError(f"CAME needs a positive lr (e.g. lr=2e-4, 1-3x smaller than AdamW's); got {lr!r}")
        if len(betas) != 3:
            raise ValueError(f"CAME takes three betas (b1, b2, b3), e.g. (0.9, 0.999, 0.9999); got {betas!r}")
        super().__init__(params, lr=lr, eps=_eps_pair("CAME", eps), clip_threshold=clip_threshold, betas=tuple(betas),
                         weight_decay=weight_decay, state_dtype=state_dtype, rule="came", skip_nonfinite=skip_nonfinite)


class Muon(LowMemOptimizer):
    """Muon with ``torch.optim.Muon``'s constructor and numbers (every parameter a matrix; ``eps`` is the
    Newton-Schulz normalization's floor). lowmem's ``muon`` name builds the usual split instead: Muon on the hidden
    matrices, AdamW on the rest.

    Memory: one momentum per weight, ``4mn`` bytes fp32 (``state_dtype`` may make it bf16 or 8-bit).
    """

    def __init__(self, params: Iterable, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                 ns_coefficients=newton_schulz.COEFFICIENTS, eps=newton_schulz.EPS, ns_steps=newton_schulz.STEPS,
                 adjust_lr_fn=None, state_dtype=None, skip_nonfinite=True):
        check_hyperparameters(dict(lr=lr, weight_decay=weight_decay))
        super().__init__(params, lr=lr, weight_decay=weight_decay, rule="muon", momentum=momentum, nesterov=nesterov,
                         ns_coefficients=tuple(ns_coefficients), ns_eps=eps, ns_steps=ns_steps,
                         adjust_lr_fn=adjust_lr_fn, state_dtype=state_dtype, skip_nonfinite=skip_nonfinite)
        make_rule(self.param_groups[0])  # the options' errors now, not at the first step
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates matrices only; got a parameter of shape {tuple(p.shape)}. Give "
                                     "vectors, embeddings and the head to AdamW, or use create_optimizer('muon', "
                                     "model), which splits them so.")


def _check_8bit_args(amsgrad: bool, percentile_clipping: int = 100) -> None:
    if amsgrad:
        raise ValueError("amsgrad is not supported by the 8-bit optimizers (nor by bitsandbytes' 8-bit Adam)")
    if percentile_clipping != 100:
        raise ValueError("percentile_clipping was removed in bitsandbytes 0.50 and is not supported; "
                         "clip gradients with max_grad_norm / torch.nn.utils.clip_grad_norm_ instead")


class AdamW8bit(LowMemOptimizer):
    """AdamW with blockwise 8-bit moments, bitsandbytes' ``AdamW8bit`` constructor and scheme: dynamic
    quantization map (signed m, unsigned v), blocks of 256 with an fp32 absmax, dequantize -> update ->
    requantize each step, tensors under ``min_8bit_size`` elements in fp32. Pure torch (runs anywhere).

    Memory: ``2 (1 + 4/256)`` = 2.03 B/param for large tensors (fp32 AdamW: 8).
    """

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False, state_dtype="8bit", skip_nonfinite=True):
        _check_8bit_args(amsgrad)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rule="adamw_torch",
                         state_dtype=state_dtype, min_8bit_size=min_8bit_size, skip_nonfinite=skip_nonfinite)


class GaLoreAdamW8bit(AdamW8bit):
    """galore-torch's ``GaLoreAdamW8bit``: 8-bit AdamW moments of the GaLore-projected gradient.

    Groups with ``rank, update_proj_gap, scale, proj_type`` are projected. Unlike galore-torch's class
    it runs on CPU and with bitsandbytes >= 0.50 (whose changed positional arguments make the
    reference skip every update of projected tensors under 4096 elements).
    Memory per m x n weight (m >= n): ``2mr (1 + 4/256)`` moments plus the ``rn`` projector.
    """

    def __init__(self, params: Iterable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False, state_dtype="8bit", skip_nonfinite=True):
        _check_8bit_args(amsgrad, percentile_clipping)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         min_8bit_size=min_8bit_size, state_dtype=state_dtype, skip_nonfinite=skip_nonfinite)

    normalize_group = GaLoreAdamW.normalize_group


class BAdam(LowMemOptimizer):
    """BAdam (Luo et al. 2024): AdamW on one transformer layer at a time, the other parameters frozen; the block
    switches every ``switch_interval`` steps (``switch_mode``: ascending, descending, random, fixed; see
    ``projectors.LayerBlockProjector``). Takes ``(name, parameter)`` pairs: blocks are found from the names.
    Embeddings, the final norm and the head do not train, as in the reference's defaults.

    Memory: AdamW states (and an fp32 master copy of a low-precision weight) for one layer only, and gradients for
    that layer only. ``weight_decay`` applies to every tensor of the block (the reference's behaviour: its groups take
    the base optimizer's own weight decay).
    """

    def __init__(self, named_params: Iterable, model=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 switch_interval=50, switch_mode="descending", start_block=None, state_dtype=None,
                 skip_nonfinite=True):
        named = list(named_params)
        group = {"params": [p for _, p in named], "param_names": [n for n, _ in named]}
        super().__init__([group], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rule="adamw_torch",
                         projector="layer_blocks", switch_interval=switch_interval, switch_mode=switch_mode,
                         start_block=start_block, state_dtype=state_dtype, skip_nonfinite=skip_nonfinite)


class AdamMini(LowMemOptimizer):
    """Adam-mini with adam-mini 1.1.1's ``Adam_mini`` arguments (``named_parameters``, ``dim``, ``n_heads``,
    ``n_kv_heads``...); pass ``model=`` instead of ``dim``/``n_heads`` to read them from ``model.config``.

    Memory: about 4 B/param (fp32): the first moment plus one second moment per head / row / tensor.
    """

    def __init__(self, named_parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *,
                 model_sharding=None, dim=None, n_heads=None, n_kv_heads=None, verbose=False, model=None,
                 state_dtype=None, skip_nonfinite=True):
        if model is not None and (dim is None or n_heads is None):
            config_dim, config_heads = model_dims(getattr(model, "config", None))
            dim, n_heads = dim or config_dim, n_heads or config_heads
        if n_kv_heads is not None and n_heads and n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        groups = adam_mini_groups(list(named_parameters), dim, n_heads, weight_decay)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rule="adam_mini",
                         state_dtype=state_dtype, skip_nonfinite=skip_nonfinite)
