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

from ..kernels import adam_8bit, blockwise_8bit, newton_schulz
from ..kernels.codes_8bit import CHUNK
from ..kernels.common import adam_moments_
from ..kernels.dispatch import use_triton
from .sharded import is_sharded, placed_like, whole
from .states import StateStore

#: 8-bit Adam updates tensors larger than this a chunk at a time (whole blocks; bit-identical to the whole tensor).
#: Its temporaries are about 42 bytes per element (dequantized moments, the quantizer's keys and gathers): a quarter
#: of the quantizer's chunk keeps them at 5 MiB instead of 21 (the 1.1B GaLore 8-bit layer-wise step's peak fell by
#: 16 MiB), for about 10% more time in that update on a CPU (``benchmarks/bench_8bit_chunk.py``: 1.10x).
CHUNK_8BIT = CHUNK // 4


class Rule:
    """Base rule: state-free SGD (``N = g``)."""

    #: Where the numeric core applies weight decay: ``mul_before``, ``add_before`` or ``after``.
    decay = "mul_before"
    #: The state keys holding the rule's statistics (what ``reset`` zeroes).
    moments: tuple[str, ...] = ()
    #: Whether each element's direction depends only on that element's gradient and moments (then the optimizer
    #: may update a large unprojected tensor a chunk of elements at a time: ``init_state`` first, on the whole).
    elementwise = False
    #: Whether each row's does (a 2-D tensor then goes a range of whole rows at a time); ``row_moments``: the state
    #: keys holding one value per row (the others are shaped like the gradient).
    row_local = False
    row_moments: tuple[str, ...] = ()
    #: Whether ``direction`` reads the weight's values (not only its shape): an int8 weight is then dequantized
    #: whole for the update instead of a piece at a time (``int8_weights.RecordedUpdate``).
    reads_weight = False

    def direction(self, grad: torch.Tensor, state: dict, store: StateStore, lr: float, param: torch.Tensor):
        return grad, lr, lr

    def init_state(self, state: dict, store: StateStore, grad: torch.Tensor) -> None:
        """Create the statistics for a gradient shaped like ``grad`` if they do not exist yet."""

    def reset(self, state: dict, store: StateStore) -> None:
        """Zero the statistics and restart bias correction (FRUGAL's ``reset_statistics``)."""
        state["step"] = 0
        for key in self.moments:
            if key in state:
                store.zero(state, key)


class SignSGD(Rule):
    """State-free sign descent: ``N = sign(g)``."""

    def direction(self, grad, state, store, lr, param):
        return grad.sign(), lr, lr


class AdamW(Rule):
    """Adam moments with either numeric core (see the module docstring)."""

    moments = ("exp_avg", "exp_avg_sq")
    elementwise = True

    def __init__(self, betas=(0.9, 0.999), eps: float = 1e-6, correct_bias: bool = True, core: str = "hf"):
        if core not in ("hf", "torch"):
            raise ValueError(f"unknown AdamW core {core!r}; use 'hf' or 'torch'")
        self.beta1, self.beta2 = betas
        self.eps, self.correct_bias, self.core = eps, correct_bias, core
        self.decay = "after" if core == "hf" else "mul_before"

    def init_state(self, state, store, grad):
        if "exp_avg" not in state:
            store.init(state, "exp_avg", grad, signed=True)
            store.init(state, "exp_avg_sq", grad, signed=False)

    def direction(self, grad, state, store, lr, param):
        self.init_state(state, store, grad)
        t = state["step"]
        if (use_triton(grad) and "exp_avg_absmax" in state and store.blocksize == blockwise_8bit.QBLOCK
                and state["exp_avg"].is_contiguous() and state["exp_avg_sq"].is_contiguous()):  # one Triton pass
            direction = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
            blockwise_8bit.adamw_8bit_update_(None, grad.contiguous(), state, beta1=self.beta1, beta2=self.beta2,
                                              eps=self.eps, bias_div=self._bias_div(t), out=direction)
            return direction, lr * self._step_factor(t), lr
        fused = adam_8bit.fused_applicable(state, grad)
        if "exp_avg_absmax" in state and grad.numel() > CHUNK_8BIT and not is_sharded(grad):  # sharded: whole
            direction = self._moments_in_chunks(grad, state, store, fused)
        else:
            direction = self._moments(grad, state, store, fused)
        return direction, lr * self._step_factor(t), lr

    def _moments(self, grad, state, store, fused: bool) -> torch.Tensor:
        """Update the moments in ``state`` from ``grad``; the direction ``m / (sqrt(v) + eps)``."""
        b1, b2, t = self.beta1, self.beta2, state["step"]
        if fused:
            direction = adam_8bit.adam_step_8bit(state, grad, b1, b2, self.eps, self._bias_div(t))
            if direction is not None:
                return direction
        m, v = store.load(state, "exp_avg"), store.load(state, "exp_avg_sq")
        direction = adam_moments_(m, v, grad, b1, b2, self.eps, self._bias_div(t))
        store.save(state, "exp_avg", m, signed=True)
        store.save(state, "exp_avg_sq", v, signed=False)
        return direction

    def _moments_in_chunks(self, grad, state, store, fused: bool) -> torch.Tensor:
        """8-bit moments ``CHUNK_8BIT`` elements at a time, bit-identical to the whole tensor at once (the same
        blocks, the same path): the dequantized moments and the quantizer's temporaries, about 50 bytes per
        element, would otherwise exist for a whole embedding-sized tensor together."""
        flat = grad.reshape(-1)
        out = torch.empty(flat.shape, dtype=torch.float32, device=grad.device)
        for start in range(0, flat.numel(), CHUNK_8BIT):
            end = min(start + CHUNK_8BIT, flat.numel())
            part = store.chunk(state, self.moments, start, end)
            out[start:end] = self._moments(flat[start:end], part, store, fused).reshape(-1)
            store.write_chunk(state, part, self.moments, start, end)
        return out.view(grad.shape)

    def _bias_div(self, t: int) -> float:
        """The second-moment correction the torch core divides ``sqrt(v)`` by (1 for the hf core)."""
        return math.sqrt(1.0 - self.beta2**t) if self.core == "torch" and self.correct_bias else 1.0

    def _step_factor(self, t: int) -> float:
        """The bias correction the step size carries: ``sqrt(1 - b2^t) / (1 - b1^t)`` (hf) or
        ``1 / (1 - b1^t)`` (torch, whose second-moment correction sits in the denominator)."""
        if not self.correct_bias:
            return 1.0
        if self.core == "hf":
            return math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)
        return 1.0 / (1.0 - self.beta1**t)


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.norm(2) / (t.numel() ** 0.5)


def _reusable(buffer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``buffer`` as the ``out=`` of a result in ``dtype`` (saves a full-size allocation), if the dtypes
    agree; None (a fresh tensor, as before) when states and gradient differ in dtype."""
    return buffer if buffer.dtype == dtype else None


def _factored_rsqrt(row: torch.Tensor, col: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``1 / sqrt(R C / mean(R))``: the rank-1 reconstruction of a factored second moment, inverted
    (written into ``out`` when given)."""
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return torch.mul(r_factor, col.unsqueeze(-2).rsqrt(), out=out)


def _init_factored(state: dict, store: StateStore, prefix: str, grad: torch.Tensor) -> None:
    """Row (``..., m``) and column (``..., n``) statistics for >= 2-D, a full tensor below. The row statistics are
    made from a slice of ``grad``, so an FSDP2-sharded gradient's keep its row sharding (each rank its own rows)."""
    if grad.dim() >= 2:
        store.init(state, prefix + "_row", torch.zeros_like(grad[..., 0]), signed=False)
        store.init(state, prefix + "_col", grad.new_zeros(grad.shape[:-2] + grad.shape[-1:]), signed=False)
    else:
        store.init(state, prefix, torch.zeros_like(grad), signed=False)


def _update_factored(state: dict, store: StateStore, prefix: str, value: torch.Tensor, beta: float) -> torch.Tensor:
    """EMA ``value`` into the (factored) statistics and return ``1 / sqrt(statistics)`` shaped like value.

    ``value`` is a temporary the caller gives up: the result reuses its buffer when the dtypes agree.
    """
    if value.dim() >= 2:
        row, col = store.load(state, prefix + "_row"), store.load(state, prefix + "_col")
        row.mul_(beta).add_(value.mean(dim=-1), alpha=1.0 - beta)
        col.mul_(beta).add_(value.mean(dim=-2), alpha=1.0 - beta)
        store.save(state, prefix + "_row", row, signed=False)
        store.save(state, prefix + "_col", col, signed=False)
        return _factored_rsqrt(row, col, out=_reusable(value, row.dtype))
    full = store.load(state, prefix)
    full.mul_(beta).add_(value, alpha=1.0 - beta)
    store.save(state, prefix, full, signed=False)
    return torch.rsqrt(full, out=_reusable(value, full.dtype))


class Adafactor(Rule):
    """Adafactor (Shazeer & Stern 2018) with transformers' semantics: factored second moment for
    >= 2-D inputs, ``beta2_t = 1 - t^decay_rate``, update clipping at RMS ``clip_threshold``,
    relative step ``min(1e-2 or 1e-6 t, 1/sqrt(t))`` scaled by ``max(eps2, RMS(W))``, optional beta1.

    Memory: ``4(m + n)`` bytes for an m x n input (``+ 4mn`` with beta1), fp32.
    """

    moments = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg")
    EPS = (1e-30, 1e-3)

    decay = "add_before"

    def __init__(self, eps=EPS, clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                 scale_parameter=True, relative_step=True, warmup_init=False):
        self.eps1, self.eps2 = eps
        self.clip, self.decay_rate, self.beta1 = clip_threshold, decay_rate, beta1
        self.scale_parameter, self.relative_step, self.warmup_init = scale_parameter, relative_step, warmup_init
        self.reads_weight = scale_parameter  # the step is scaled by RMS(W)

    def step_size(self, t: int, lr, param: torch.Tensor):
        """The lr of step ``t``: relative (from ``t``) or the group's, times ``max(eps2, RMS(W))``."""
        rel = lr
        if self.relative_step:
            rel = min(1e-6 * t if self.warmup_init else 1e-2, 1.0 / math.sqrt(t))
        if not self.scale_parameter:
            return rel
        return torch.clamp(_rms(param if param.dtype == torch.float32 else param.float()), min=self.eps2) * rel

    def direction(self, grad, state, store, lr, param):
        g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            _init_factored(state, store, "exp_avg_sq", g)
            if self.beta1 is not None:
                store.init(state, "exp_avg", g, signed=True)
        t = state["step"]
        step = self.step_size(t, lr, param)
        beta2t = 1.0 - math.pow(t, self.decay_rate)
        # One full-size temporary per step: g^2 + eps1, then 1/sqrt(V) in its buffer, then the update.
        update = _update_factored(state, store, "exp_avg_sq", torch.square(g).add_(self.eps1), beta2t).mul_(g)
        update.div_((_rms(update) / self.clip).clamp_(min=1.0))
        update.mul_(step)
        if self.beta1 is not None:
            m = store.load(state, "exp_avg")
            m.mul_(self.beta1).add_(update, alpha=1 - self.beta1)
            store.save(state, "exp_avg", m, signed=True)
            update.copy_(m)  # a copy: the lift may scale its direction in place
        return update, 1.0, step


class CAME(Rule):
    """CAME (Luo et al. 2023): Adafactor's factored second moment plus a confidence-weighted first
    moment, whose instability ``(U - m)^2`` is kept factored too. Constant betas, no bias correction.

    Memory: ``4mn + 8(m + n)`` bytes for an m x n input (about 4 B/param), fp32.
    """

    moments = Adafactor.moments + ("exp_avg_res_row", "exp_avg_res_col")
    EPS, BETAS = (1e-30, 1e-16), (0.9, 0.999, 0.9999)

    decay = "add_before"

    def __init__(self, eps=EPS, clip_threshold=1.0, betas=BETAS):
        self.eps1, self.eps2 = eps
        self.clip = clip_threshold
        self.beta1, self.beta2, self.beta3 = betas

    def direction(self, grad, state, store, lr, param):
        g = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad
        factored = g.dim() >= 2
        if "exp_avg" not in state:
            store.init(state, "exp_avg", g, signed=True)
            _init_factored(state, store, "exp_avg_sq", g)
            if factored:
                _init_factored(state, store, "exp_avg_res", g)
        # One full-size temporary per step, reused: g^2 + eps1 -> U -> (U - m)^2 + eps2 -> the direction.
        update = _update_factored(state, store, "exp_avg_sq", torch.square(g).add_(self.eps1), self.beta2).mul_(g)
        update.div_((_rms(update) / self.clip).clamp_(min=1.0))
        m = store.load(state, "exp_avg")
        m.mul_(self.beta1).add_(update, alpha=1 - self.beta1)
        store.save(state, "exp_avg", m, signed=True)
        if factored:
            instability = torch.sub(update, m, out=_reusable(update, torch.result_type(update, m)))
            instability.square_().add_(self.eps2)
            update = _update_factored(state, store, "exp_avg_res", instability, self.beta3).mul_(m)
        else:
            update.copy_(m)  # a copy: the lift may scale its direction in place
        return update, lr, lr


class AdamMini(Rule):
    """Adam-mini (Zhang et al. 2024): Adam's first moment, but one second moment per block.

    ``block``: ``elementwise`` (plain Adam, for biases), ``heads`` (one per attention head: the tensor
    viewed as ``(-1, head_numel)``), ``rows`` (one per output neuron) or ``tensor`` (one scalar). The
    moments use ``lerp`` and the torch-style eps placement, as adam-mini 1.1.1 does.
    Memory: ``4mn`` bytes for m plus a handful for the block means (about 4 B/param; Adam: 8).
    """

    BLOCKS = ("elementwise", "heads", "rows", "tensor")
    moments = ("exp_avg", "exp_avg_sq")

    def __init__(self, betas=(0.9, 0.999), eps=1e-8, block="tensor", head_numel=None):
        if block not in self.BLOCKS:
            raise ValueError(f"unknown Adam-mini block {block!r}; use one of {self.BLOCKS}")
        self.beta1, self.beta2 = betas
        self.eps, self.block, self.head_numel = eps, block, head_numel
        self.elementwise = block == "elementwise"
        #: ``rows``: each row's direction depends only on that row's gradient and moments, so the optimizer may
        #: update a large tensor a range of whole rows at a time; ``row_moments`` hold one value per row.
        self.row_local = block == "rows"
        self.row_moments = ("exp_avg_sq",) if block == "rows" else ()

    def init_state(self, state, store, grad):
        if "exp_avg" in state:
            return
        g = grad.view(-1, self.head_numel) if self.block == "heads" else grad
        store.init(state, "exp_avg", g, signed=True)
        if self.block == "elementwise":
            second = g
        elif self.block == "tensor":
            second = g.new_zeros(())
        else:  # one mean per row (neuron) or per head
            second = g[:, :1]
        store.init(state, "exp_avg_sq", second, signed=False)

    def direction(self, grad, state, store, lr, param):
        """Also on a range of whole rows of a ``rows`` tensor, flat (``row_local``): its moments' matching parts."""
        b1, b2, t = self.beta1, self.beta2, state["step"]
        self.init_state(state, store, grad)
        g = grad.view(-1, self.head_numel) if self.block == "heads" else grad
        v = store.load(state, "exp_avg_sq")
        square = None
        if self.block == "elementwise":
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
        else:
            square = g * g  # the step's one full-size temporary; its buffer then takes the direction
            if self.block == "tensor":
                v.mul_(b2).add_(torch.sum(square) / g.numel(), alpha=1 - b2)
            else:  # one mean per row: ``v`` holds one value per row of the (flat or 2-D) gradient
                v.mul_(b2).add_(torch.mean(square.view(v.shape[0], -1), dim=1).view(v.shape), alpha=1 - b2)
        store.save(state, "exp_avg_sq", v, signed=False)
        m = store.load(state, "exp_avg")
        m.lerp_(g if g.dtype == m.dtype else g.to(m.dtype), 1 - b1)  # states may differ from the grad's dtype
        store.save(state, "exp_avg", m, signed=True)
        h = (v.sqrt() / math.sqrt(1 - b2**t)).add_(self.eps)
        bias_correction1 = 1 - b1**t
        if self.block == "elementwise":
            return torch.div(m, h, out=_reusable(h, torch.result_type(m, h))), lr / bias_correction1, lr
        scale = (1 / bias_correction1) / h
        if self.block != "tensor":
            m, scale = m.view(v.shape[0], -1), scale.view(v.shape[0], 1)
        out = _reusable(square.view(m.shape), torch.result_type(m, scale))
        return torch.mul(m, scale, out=out).view(grad.shape), lr, lr


class Muon(Rule):
    """Muon (Keller Jordan 2024; ``torch.optim.Muon``): a momentum ``B <- mu B + (1 - mu) g`` (torch's lerp form),
    Nesterov's ``g + mu (B - g)`` or ``B`` itself orthogonalized by Newton-Schulz (``kernels.newton_schulz``), the
    step scaled for the matrix's shape by ``adjust_lr_fn`` (None / ``original``: ``sqrt(max(1, rows / cols))``;
    ``match_rms_adamw``: ``0.2 sqrt(max(rows, cols))``, Moonshot's, so AdamW's lr fits), weight decay ``W *= 1 - lr
    wd`` before. Matrices only; on a projected gradient the iteration runs on the ``r x n`` momentum.

    Memory: one momentum tensor shaped like its input (``4mn`` bytes fp32).
    """

    moments = ("momentum_buffer",)
    ADJUST_LR = (None, "original", "match_rms_adamw")

    def __init__(self, momentum=0.95, nesterov=True, coefficients=newton_schulz.COEFFICIENTS,
                 steps=newton_schulz.STEPS, eps=newton_schulz.EPS, adjust_lr_fn=None):
        if adjust_lr_fn not in self.ADJUST_LR:
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r}; use 'original' (the default), 'match_rms_adamw' or None")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon's momentum={momentum}: give a value in [0, 1) (0.95 is Muon's)")
        if len(tuple(coefficients)) != 3:
            raise ValueError(f"ns_coefficients={coefficients!r}: give three values (a, b, c), e.g. "
                             f"{newton_schulz.COEFFICIENTS}")
        self.momentum, self.nesterov, self.coefficients = momentum, nesterov, tuple(coefficients)
        self.steps, self.eps, self.adjust_lr_fn = steps, eps, adjust_lr_fn

    def init_state(self, state, store, grad):
        if "momentum_buffer" not in state:
            store.init(state, "momentum_buffer", grad, signed=True)

    def direction(self, grad, state, store, lr, param):
        if grad.dim() != 2:
            raise ValueError(f"Muon updates matrices only; got a gradient of shape {tuple(grad.shape)}. Leave "
                             "vectors, embeddings and the head to AdamW (the muon name does).")
        self.init_state(state, store, grad)
        buf = store.load(state, "momentum_buffer")
        buf.lerp_(grad if grad.dtype == buf.dtype else grad.to(buf.dtype), 1 - self.momentum)
        update = grad.lerp(buf.to(grad.dtype), self.momentum) if self.nesterov else buf
        direction = placed_like(newton_schulz.orthogonalize(whole(update), self.coefficients, self.steps, self.eps),
                                update)  # sharded (FSDP2): one process's products on every rank, each its rows
        store.save(state, "momentum_buffer", buf, signed=True)
        return direction, lr * self.lr_ratio(param.shape), lr

    def lr_ratio(self, shape) -> float:
        rows, cols = shape[:2]
        if self.adjust_lr_fn == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return math.sqrt(max(1, rows / cols))


class SinkGD(Rule):
    """SinkGD (Scetbon et al. 2025, "Gradient Multi-Normalization for Stateless and Scalable LLM Training"): the
    gradient of a matrix normalized by SR-Sinkhorn, ``iterations`` alternations of scaling every row to l2 norm
    ``sqrt(n)`` and every column to ``sqrt(m)`` (so the update's RMS is about 1, as Adam's), then ``W -= lr X``;
    decoupled weight decay before. Stateless: no moments at all.

    Memory: nothing kept; one fp32 copy of the (projected) gradient while it runs.
    """

    def __init__(self, iterations: int = 5, eps: float = 1e-8):
        if not (isinstance(iterations, int) and iterations >= 1):
            raise ValueError(f"sinkgd_iterations={iterations!r}: give a whole number of at least 1 (5 is the paper's)")
        self.iterations, self.eps = iterations, eps

    def direction(self, grad, state, store, lr, param):
        if grad.dim() != 2:
            raise ValueError(f"SinkGD normalizes matrices only; got a gradient of shape {tuple(grad.shape)}. Leave "
                             "vectors, embeddings and the head to AdamW (the sinkgd name does).")
        x = grad.to(torch.float32, copy=True)
        rows, cols = x.shape
        for _ in range(self.iterations):
            x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp(min=self.eps)).mul_(math.sqrt(cols))
            x.div_(torch.linalg.vector_norm(x, dim=0, keepdim=True).clamp(min=self.eps)).mul_(math.sqrt(rows))
        return x, lr, lr


RULES = ("adamw_hf", "adamw_torch", "adafactor", "came", "adam_mini", "muon", "sinkgd", "sign_sgd", "sgd")


#: The AdamW defaults every param group starts with (``compose.GROUP_DEFAULTS``); the factored rules replace them
#: by their own when left as they are.
DEFAULT_BETAS, DEFAULT_EPS = (0.9, 0.999), 1e-8


def _options(name: str, betas, eps, n_betas: int, eps_pair: tuple | None):
    """``(betas, eps)`` checked for rule ``name``: ``n_betas`` betas; an ``(eps1, eps2)`` pair when ``eps_pair`` is
    the rule's default pair, else one eps. The untouched AdamW defaults become the rule's own."""
    betas = tuple(betas)
    if eps_pair is not None:
        if eps == DEFAULT_EPS:
            eps = eps_pair
        elif not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"rule {name!r} takes an eps pair (eps1, eps2), e.g. eps={eps_pair}; got eps={eps!r}")
        eps = tuple(eps)
    elif isinstance(eps, (tuple, list)):
        raise ValueError(f"rule {name!r} takes one eps (e.g. eps=1e-8); got eps={eps!r}")
    if n_betas == 3 and betas == DEFAULT_BETAS:
        betas = CAME.BETAS
    if len(betas) != n_betas:
        example = CAME.BETAS if n_betas == 3 else DEFAULT_BETAS
        raise ValueError(f"rule {name!r} takes {n_betas} betas, e.g. betas={example}; got betas={betas!r}")
    return betas, eps


def make_rule(group: dict) -> Rule:
    """Build the rule named by ``group['rule']`` from the group's options (a clear error on a wrong one)."""
    name = group.get("rule", "adamw_torch")
    betas, eps, correct_bias = group["betas"], group["eps"], group["correct_bias"]
    if name == "adafactor":
        _, pair = _options(name, DEFAULT_BETAS, eps, 2, Adafactor.EPS)
        return Adafactor(pair, group.get("clip_threshold", 1.0), group.get("decay_rate", -0.8),
                         group.get("beta1"), group.get("scale_parameter", True), group.get("relative_step", True),
                         group.get("warmup_init", False))
    if name == "came":
        betas, pair = _options(name, betas, eps, 3, CAME.EPS)
        return CAME(pair, group.get("clip_threshold", 1.0), betas)
    if name in ("adam_mini", "adamw_hf", "adamw_torch"):
        betas, eps = _options(name, betas, eps, 2, None)
    if name == "adam_mini":
        return AdamMini(betas, eps, group.get("mini_block", "tensor"), group.get("head_numel"))
    if name == "adamw_hf":
        return AdamW(betas, eps, correct_bias, core="hf")
    if name == "adamw_torch":
        return AdamW(betas, eps, correct_bias, core="torch")
    if name == "muon":
        return Muon(group.get("momentum", 0.95), group.get("nesterov", True),
                    group.get("ns_coefficients", newton_schulz.COEFFICIENTS),
                    group.get("ns_steps", newton_schulz.STEPS), group.get("ns_eps", newton_schulz.EPS),
                    group.get("adjust_lr_fn"))
    if name == "sinkgd":
        return SinkGD(group.get("sinkgd_iterations", 5), group.get("sinkgd_eps", 1e-8))
    if name == "sign_sgd":
        return SignSGD()
    if name == "sgd":
        return Rule()
    raise ValueError(f"unknown rule {name!r}; use one of {RULES}")
