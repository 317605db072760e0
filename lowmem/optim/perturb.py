"""Seeded weight perturbations for zeroth-order training, without ever writing the trained weights.

MeZO evaluates the loss at ``W + eps z`` and ``W - eps z``. Its reference code adds ``eps z`` to the weights in
place and subtracts it again, which does not restore bf16 or fp16 weights (every add rounds: after 1000 steps of
no update at all, bf16 weights have drifted by 12% of their RMS). Here the trained weights are never changed by a
perturbation: while a module runs its forward, its perturbed weights exist only as a scratch copy:

* ``nn.Linear``: the output is computed a block of output rows at a time from ``W[rows] + s z[rows]``;
* ``nn.Embedding``: the looked-up rows are ``W[ids] + s z[ids]``, gathered a block of rows at a time;
* any other module owning trainable tensors (norms, GPT-2's ``Conv1D``, peft's prefix encoder...): its own
  tensors are swapped for perturbed copies for the duration of its forward.

So the extra memory is one block (``Z_BLOCK`` elements) for linears and embeddings, and the module's own tensors
for the others (small: norm weights, biases, adapters).

The noise ``z`` is keyed, not drawn from a running generator, so the same ``z`` comes back whatever order modules
run in, however often a tied weight is visited, and whatever else used the global RNG, which is what lets the update
regenerate it and the offloaded (``lowmem.offload``) and plain forms agree. Two noises, chosen by ``MeZO``:

* ``Noise`` (torch generators): block ``b`` of parameter ``i`` (rows of the parameter viewed as a matrix,
  ``Z_BLOCK`` elements at most) under step seed ``s`` is ``randn`` from a generator seeded with ``(s, i, b)``;
* ``PhiloxNoise`` (Triton's Philox, ``lowmem.kernels.zo_noise``): flat element ``e`` of parameter ``i`` is
  ``tl.randn(block_key(s, i, 0), e)``, drawn inside the kernels that perturb and update (the pure-torch twin
  off CUDA), so ``z`` is never stored and does not depend on the row blocks.

Updates to bf16 / fp16 weights are stochastically rounded (``kernels.common.stochastic_round``): a MeZO step moves
a weight by about 1e-7, far below half a bf16 ulp, so round-to-nearest would drop almost all of it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import dispatch, zo_noise
from ..kernels.common import stochastic_round

#: The most elements of ``z`` generated at once (4 MiB of fp32): the scratch memory of a perturbed linear layer.
Z_BLOCK = 1 << 20
#: Elements of a low-precision weight rounded at once by ``Noise.update`` (the rounding's temporaries: ~16 B each).
UPDATE_ELEMENTS = 1 << 16
#: MeZO's ``noise`` choices: ``auto`` is ``philox`` where the Triton kernels run (``dispatch.use_triton``).
NOISES = ("auto", "torch", "philox")
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (the golden ratio's), to spread seeds over the key space
_MASK = (1 << 63) - 1
#: Key tags that keep the rounding noise independent of the perturbation noise.
_Z, _ROUND = 0, 1


def block_key(seed: int, index: int, block: int, tag: int = _Z) -> int:
    """The generator seed of one block of noise: a 63-bit mix of the step seed, parameter index and block."""
    key = seed & _MASK
    for value in (index, block, tag):
        key = ((key ^ (value + 1)) * _MIX + 0x632BE59BD9B4E019) & _MASK
    return key


def row_blocks(p: torch.Tensor) -> list[tuple[int, int]]:
    """``p`` viewed as ``rows x rest`` (rows = its first dimension), cut into blocks of whole rows of at most
    ``Z_BLOCK`` elements (one row per block if a row is larger): the unit of noise generation."""
    rows = p.shape[0] if p.dim() else 1
    per_block = max(1, Z_BLOCK // max(1, p.numel() // max(rows, 1)))
    return [(start, min(start + per_block, rows)) for start in range(0, rows, per_block)]


class Noise:
    """Keyed noise on one device (a generator reseeded per block)."""

    def __init__(self):
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, key: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(key)

    def normal(self, seed: int, index: int, block: int, shape, device) -> torch.Tensor:
        """``z`` for one block of parameter ``index`` under ``seed``: fp32 standard normal of ``shape``."""
        device = torch.device(device)
        return torch.randn(shape, generator=self._generator(device, block_key(seed, index, block)),
                           dtype=torch.float32, device=device)

    def uniform(self, seed: int, index: int, block: int, shape, device) -> torch.Tensor:
        """Uniform [0, 1) fp32 for the stochastic rounding of one block (independent of ``normal``'s)."""
        device = torch.device(device)
        return torch.rand(shape, generator=self._generator(device, block_key(seed, index, block, _ROUND)),
                          dtype=torch.float32, device=device)

    def perturbed_rows(self, p: torch.Tensor, seed: int, index: int, block: int, start: int, end: int,
                       scales: Sequence[float]) -> list[torch.Tensor]:
        """Rows ``start:end`` (block ``block``) of ``p + scale z`` for each scale, in ``p``'s dtype (fresh tensors
        from one draw of ``z``)."""
        w = rows(p, start, end)
        z = self.normal(seed, index, block, w.shape, p.device)
        if len(scales) == 1:  # in place: the scratch is z and the result
            return [z.mul_(scales[0]).add_(w).to(p.dtype)]
        return [(z * scale).add_(w).to(p.dtype) for scale in scales]

    def update(self, data: torch.Tensor, index: int, seeds: Sequence[int], grads: Sequence[float], lr: float,
               wd: float) -> None:
        """``data -= lr (sum_k g_k z_k + wd data)`` a block of rows at a time (the noise's unit), computed in fp32
        and stored once, ``UPDATE_ELEMENTS`` at a time (so the rounding's temporaries stay small)."""
        for block, (start, end) in enumerate(row_blocks(data)):
            w = rows(data, start, end)
            direction = None
            for seed, g in zip(seeds, grads, strict=True):
                z = self.normal(seed, index, block, w.shape, data.device)
                direction = z.mul_(g) if direction is None else direction.add_(z, alpha=g)
            uniform = None
            if data.dtype != torch.float32:
                uniform = self.uniform(seeds[0], index, block, w.shape, data.device)
            step = max(1, UPDATE_ELEMENTS // max(1, w[0].numel() if w.dim() > 1 else 1))
            for a in range(0, w.shape[0], step):
                piece, new = w[a:a + step], w[a:a + step].float()  # fp32: ``new`` is ``piece`` (updated in place)
                if wd:
                    new.mul_(1.0 - lr * wd)
                new.add_(direction[a:a + step], alpha=-lr)
                if uniform is not None:
                    piece.copy_(stochastic_round(new, data.dtype, uniform[a:a + step]))


class PhiloxNoise:
    """Keyed noise from Triton's Philox: element ``e`` of parameter ``index`` (flat, row-major) under step seed
    ``seed`` is ``tl.randn(block_key(seed, index, 0), e)``. Perturbations and updates run as the
    ``lowmem.kernels.zo_noise`` kernels on CUDA (the noise is drawn in registers, never stored) and as their torch
    twins elsewhere, which draw the same noise: a CPU run reproduces a GPU run's noise."""

    def key(self, seed: int, index: int) -> int:
        """The Philox seed of parameter ``index``'s noise under step seed ``seed``."""
        return block_key(seed, index, 0)

    def round_key(self, seed: int, index: int) -> int:
        """The Philox seed of the uniforms that stochastically round parameter ``index``'s update."""
        return block_key(seed, index, 0, _ROUND)

    def perturbed_rows(self, p: torch.Tensor, seed: int, index: int, block: int, start: int, end: int,
                       scales: Sequence[float]) -> list[torch.Tensor]:
        """Rows ``start:end`` of ``p + scale z`` for each scale, in ``p``'s dtype (fresh tensors; the row block
        only bounds their size: the rows' noise starts at their first element's flat index)."""
        w = rows(p, start, end).contiguous()
        offset = start * math.prod(p.shape[1:]) if p.dim() else 0
        return zo_noise.perturbed(w, self.key(seed, index), offset, scales)

    def update(self, data: torch.Tensor, index: int, seeds: Sequence[int], grads: Sequence[float], lr: float,
               wd: float) -> None:
        """``data -= lr (sum_k g_k z_k + wd data)`` in place, in fp32, stochastically rounded for bf16 / fp16 with
        uniforms keyed by the first seed (one pass over ``data``: ``zo_noise.update_``)."""
        target = data if data.is_contiguous() else data.contiguous()
        zo_noise.update_(target, [self.key(s, index) for s in seeds], grads, lr, wd, self.round_key(seeds[0], index))
        if target is not data:
            data.copy_(target)


def check_noise(kind: str) -> None:
    """``ValueError`` unless ``kind`` is one of ``NOISES``."""
    if kind not in NOISES:
        raise ValueError(f"noise={kind!r} is unknown: use one of {NOISES} ('philox' reproduces on CPU the noise of a "
                         "CUDA run, whose 'auto' is 'philox')")


def make_noise(kind: str, trained: list[torch.Tensor]) -> Noise | PhiloxNoise:
    """The noise MeZO draws: ``torch`` (``Noise``), ``philox`` (``PhiloxNoise``), or ``auto``: ``philox`` where the
    Triton kernels run on the ``trained`` tensors (CUDA with Triton installed) and take their dtypes, else
    ``torch``. ``philox`` on a dtype the kernels do not take (fp64) is an error here, before any step."""
    check_noise(kind)
    unsupported = sorted({str(t.dtype) for t in trained if t.dtype not in zo_noise.DTYPES})
    if kind == "auto":
        kind = "philox" if not unsupported and dispatch.use_triton(trained[0]) else "torch"
    if kind == "philox" and unsupported:
        raise TypeError(f"noise='philox' draws fp32 / fp16 / bf16 weights' noise, not {', '.join(unsupported)}: use "
                        "noise='torch', or cast the model")
    return PhiloxNoise() if kind == "philox" else Noise()


def rows(p: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows ``start:end`` of ``p`` (a 0-d tensor is one row)."""
    return p.reshape(1) if p.dim() == 0 else p[start:end]


@dataclass
class Perturbation:
    """The perturbation of one forward: the step's seed and one scale per equal part of the batch: ``(eps,)`` or
    ``(-eps,)`` for one forward, ``(eps, -eps)`` for the dual forward (both perturbed models in one batch)."""

    seed: int
    scales: tuple[float, ...]
    noise: Noise | PhiloxNoise
    #: The dual forward's whole batch size (learnt from the first module to run, which sees the token ids).
    batch: int | None = None

    def perturbed_rows(self, p: torch.Tensor, index: int, block: int, start: int, end: int) -> list[torch.Tensor]:
        """Rows ``start:end`` (block ``block``) of ``p + scale z`` for each scale, in ``p``'s dtype (fresh tensors
        from one draw of ``z``, by the noise)."""
        return self.noise.perturbed_rows(p, self.seed, index, block, start, end, self.scales)

    def perturbed(self, p: torch.Tensor, index: int) -> list[torch.Tensor]:
        """The whole of ``p + scale z`` for each scale (for the small tensors of generic modules)."""
        out = [torch.empty_like(p) for _ in self.scales]
        for block, (start, end) in enumerate(row_blocks(p)):
            for whole, part in zip(out, self.perturbed_rows(p, index, block, start, end), strict=True):
                rows(whole, start, end).copy_(part)
        return out

    def split(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], bool]:
        """``x``'s parts along the batch dimension, one per scale (views), and whether ``x`` is shared by the whole
        batch instead (batch dimension 1, e.g. GPT-2's position ids under a batch of several): then every scale
        gets all of ``x``, and ``join`` spreads each output over its part of the batch."""
        n = len(self.scales)
        if n == 1:
            return (x,), False
        if x.shape[0] == 1 and self.batch and self.batch > n:
            return (x,) * n, True
        if x.shape[0] % n:
            raise ValueError(f"the dual forward runs both perturbed models in one batch, so a module's batch "
                             f"dimension must be even; got {tuple(x.shape)}")
        if self.batch is None:
            self.batch = x.shape[0]  # the first module to run sees the whole batch (token ids)
        return x.chunk(n, dim=0), False

    def join(self, outputs: list[torch.Tensor], shared: bool) -> torch.Tensor:
        """The outputs of ``split``'s parts as one batch (each spread over its part when ``shared``)."""
        if shared:
            part = self.batch // len(self.scales)
            outputs = [o.expand(part, *o.shape[1:]) for o in outputs]
        return torch.cat(outputs, dim=0)


class ZOParameters:
    """A model's trainable tensors (``named_parameters`` order, each once), the modules that own them, and the
    perturbed forwards that evaluate the model at ``W + scale z`` without changing ``W``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("zeroth-order training: the model has no trainable parameters (requires_grad=True); "
                             "unfreeze the weights to train, or wrap the model with peft (LoRA, prefix tuning).")
        self.index = {id(p): i for i, (_, p) in enumerate(self.named)}
        self.owners = []  # (module, [(attribute, index)]) for every module that holds trainable tensors itself
        for module in model.modules():
            own = [(attr, self.index[id(p)]) for attr, p in module.named_parameters(recurse=False)
                   if id(p) in self.index]
            if own:
                self.owners.append((module, own))
        #: The noise of the perturbations and updates (``MeZO`` sets it from its ``noise`` option).
        self.noise: Noise | PhiloxNoise = Noise()
        self._touched: set[int] | None = None

    @contextlib.contextmanager
    def perturbed(self, seed: int, *scales: float) -> Iterator[None]:
        """Within the block, every forward of the model sees ``W + scale z(seed)`` for each trainable ``W``; with
        two scales, the first half of every batch sees the first and the second half the second (the dual forward:
        each module runs both perturbed models while it is resident)."""
        perturbation = Perturbation(seed, tuple(scales), self.noise)
        installed = []
        try:
            for module, own in self.owners:
                previous = module.__dict__.get("forward")
                module.forward = self._forward(module, own, perturbation, previous or module.forward,
                                               previous is not None)
                installed.append((module, previous))
            yield
        finally:
            for module, previous in installed:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous

    @contextlib.contextmanager
    def recording(self) -> Iterator[set[int]]:
        """Collect the indices of the tensors the perturbed forwards within the block actually used."""
        self._touched = set()
        try:
            yield self._touched
        finally:
            self._touched = None

    def _forward(self, module: nn.Module, own, perturbation: Perturbation, original, replaced: bool):
        """The forward ``module`` runs under ``perturbation``: a blocked linear / embedding, or ``original`` with the
        module's own trainable tensors swapped for perturbed copies (also when another library already replaced
        the module's forward, ``replaced``, so that its wrapper still runs)."""
        if type(module) is nn.Linear and not replaced:
            def run(x):
                return _perturbed_linear(module, x, perturbation, self.index)
        elif type(module) is nn.Embedding and module.max_norm is None and not replaced:
            def run(ids):
                return _perturbed_embedding(module, ids, perturbation, self.index)
        else:
            def run(*args, **kwargs):
                return _perturbed_call(module, own, original, perturbation, args, kwargs)

        def recorded(*args, **kwargs):
            if self._touched is not None:
                self._touched.update(i for _, i in own)
            return run(*args, **kwargs)
        return recorded


def _perturbed_call(module: nn.Module, own, original, perturbation: Perturbation, args, kwargs):
    """``original`` with the module's own trainable tensors swapped for perturbed copies, once per scale (on that
    scale's part of the first tensor argument; the outputs are concatenated along the batch dimension)."""
    saved = [(attr, getattr(module, attr).data) for attr, _ in own]
    copies = [perturbation.perturbed(data, i) for (_, data), (_, i) in zip(saved, own, strict=True)]
    calls, shared = _split_batch(perturbation, args, kwargs)
    outputs = []
    try:
        for j, (a, k) in enumerate(calls):
            for (attr, _), copy in zip(own, copies, strict=True):
                getattr(module, attr).data = copy[j]
            outputs.append(original(*a, **k))
    finally:
        for attr, data in saved:
            getattr(module, attr).data = data
    return outputs[0] if len(outputs) == 1 else _join(perturbation, outputs, shared)


def _split_batch(perturbation: Perturbation, args, kwargs) -> tuple[list[tuple[tuple, dict]], bool]:
    """One ``(args, kwargs)`` per scale: the first tensor argument split along the batch, and every other tensor
    argument with the same batch size with it (OPT's position embedding takes the mask and the position ids)."""
    if len(perturbation.scales) == 1:
        return [(args, kwargs)], False
    first = next((v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.dim()), None)
    if first is None:
        raise ValueError("the dual forward splits a module's tensor arguments along the batch; this module got none")
    parts, shared = perturbation.split(first)
    n = len(parts)

    def pieces(value):
        if value is first:
            return parts
        if not shared and torch.is_tensor(value) and value.dim() and value.shape[0] == first.shape[0]:
            return value.chunk(n, dim=0)
        return (value,) * n
    split_args = [pieces(v) for v in args]
    split_kwargs = {k: pieces(v) for k, v in kwargs.items()}
    return [(tuple(a[j] for a in split_args), {k: v[j] for k, v in split_kwargs.items()}) for j in range(n)], shared


def _join(perturbation: Perturbation, outputs: list, shared: bool):
    first = outputs[0]
    if torch.is_tensor(first):
        return perturbation.join(outputs, shared)
    if isinstance(first, tuple):
        return type(first)(_join(perturbation, list(parts), shared) for parts in zip(*outputs, strict=True))
    raise TypeError(f"the dual forward cannot join outputs of type {type(first).__name__}")


def _perturbed_linear(module: nn.Linear, x: torch.Tensor, perturbation: Perturbation, index: dict) -> torch.Tensor:
    """``F.linear(x, W + s z_W, b + s z_b)`` per scale, a block of output rows at a time (``b`` perturbed only if
    trained)."""
    weight, bias = module.weight, module.bias
    i_weight, i_bias = index.get(id(weight)), index.get(id(bias)) if bias is not None else None
    parts, shared = perturbation.split(x)
    biases = [bias] * len(parts)
    if i_bias is not None:
        biases = perturbation.perturbed(bias.data, i_bias)
    if i_weight is None or weight.numel() == 0:  # untrained, or no element to perturb (``Linear(n, 0)``)
        outs = [F.linear(xj, weight, bj) for xj, bj in zip(parts, biases, strict=True)]
        return outs[0] if len(outs) == 1 else perturbation.join(outs, shared)
    blocks = row_blocks(weight)
    if len(blocks) == 1:  # the whole weight is one block: no output to assemble
        outs = [F.linear(xj, wj, bj) for xj, wj, bj in
                zip(parts, perturbation.perturbed_rows(weight.data, i_weight, 0, *blocks[0]), biases, strict=True)]
        return outs[0] if len(outs) == 1 else perturbation.join(outs, shared)
    outs = None
    for block, (start, end) in enumerate(blocks):
        ws = perturbation.perturbed_rows(weight.data, i_weight, block, start, end)
        for j, (xj, wj, bj) in enumerate(zip(parts, ws, biases, strict=True)):
            part = F.linear(xj, wj, None if bj is None else bj[start:end])
            if outs is None:  # one output; each scale writes its part of the batch (a copy of it when shared)
                whole = part.new_empty((x.shape[0] * (len(parts) if shared else 1),) + x.shape[1:-1]
                                       + (weight.shape[0],))
                outs = whole.chunk(len(parts), dim=0) if len(parts) > 1 else (whole,)
            outs[j][..., start:end] = part
    if shared:
        return perturbation.join([o for o in outs], shared)
    return whole


def _perturbed_embedding(module: nn.Embedding, ids: torch.Tensor, perturbation: Perturbation,
                         index: dict) -> torch.Tensor:
    """Rows ``ids`` of ``W + s z`` per scale: the looked-up rows with their noise, one row block at a time."""
    weight = module.weight.data
    i = index[id(module.weight)]
    split, shared = perturbation.split(ids)
    parts = [part.reshape(-1) for part in split]
    out = torch.empty(sum(p.numel() for p in parts), weight.shape[1], dtype=weight.dtype, device=weight.device)
    outs = out.chunk(len(parts), dim=0)
    for block, (start, end) in enumerate(row_blocks(weight)):
        hits = [((flat >= start) & (flat < end)).nonzero().squeeze(1) for flat in parts]
        if all(hit.numel() == 0 for hit in hits):
            continue
        block_rows = perturbation.perturbed_rows(weight, i, block, start, end)
        for flat, hit, rows_j, out_j in zip(parts, hits, block_rows, outs, strict=True):
            out_j[hit] = rows_j[flat[hit] - start]
    if shared:
        return perturbation.join([o.view(*ids.shape, weight.shape[1]) for o in outs], shared)
    return out.view(*ids.shape, weight.shape[1])
