"""Seeded zeroth-order perturbations and updates whose noise is drawn where it is used, never stored.

The contract: the noise of flat element ``e`` of a contiguous tensor under ``seed`` and ``offset`` is
``z[e] = tl.randn(seed, offset + e)`` (Triton's Philox; ``philox.randn`` is its torch twin). It depends on the seed
and the element's position only, so a tensor cut into pieces draws the same noise as a whole when each piece is
given its first element's position as ``offset``, and the perturbation and the update regenerate the same ``z``.

* ``perturbed(w, seed, offset, scales)``: fresh ``w + s z`` for one or two scales (the weights are not written);
* ``perturb_(w, seed, offset, scale)``: ``w += s z`` in place, as MeZO's reference code does. It does not restore
  bf16 / fp16 weights (each add rounds), so lowmem's MeZO uses ``perturbed`` instead;
* ``update_(w, seeds, grads, lr, weight_decay, round_seed, offset)``: the MeZO step
  ``w <- round(w (1 - lr wd) - lr sum_k g_k z_k)`` in place, in fp32, stochastically rounded for bf16 / fp16 with
  the uniforms ``tl.rand(round_seed, offset + e)`` (``common.stochastic_round``'s rule).

Each runs as a Triton kernel (``zo_noise_triton``) where ``dispatch.use_triton(w)`` says so (CUDA tensors), and as
its pure-torch twin otherwise. The twin computes the same fp32 operations in the same order from bit-identical
Philox integers; the floats differ only where ``log`` / ``cos`` / ``sqrt`` differ in the last bits (measured under
Triton's interpreter: at most 5e-7 on ``z``; on a GPU ``tl.randn`` takes an approximate ``sqrt``, so expect a few
fp32 ulps there). So fp32 results agree to rounding, and bf16 / fp16 updates make the same rounding decision given
the same fp32 value. One known difference: Triton's interpreter casts fp32 to bf16
by truncation, so under the interpreter (not on a GPU) ``perturbed`` / ``perturb_`` to bf16 may be 1 bf16 ulp
from the twin; the updates' stochastic rounding builds its bf16 values from bits and is unaffected.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch, philox
from .common import stochastic_round

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Elements per program of the kernels (the interpreter runs programs one by one in Python: larger is faster there).
BLOCK = 4096 if dispatch.interpreting() else 1024
#: Elements the twin handles at once (its Philox temporaries take about 100 bytes per element).
TWIN_CHUNK = 1 << 16


def _check(w: torch.Tensor, seeds: Sequence[int], offset: int) -> None:
    if w.dtype not in DTYPES:
        raise TypeError(f"zo_noise supports {', '.join(map(str, DTYPES))} tensors, not {w.dtype}")
    if not w.is_contiguous():
        raise ValueError("zo_noise needs a contiguous tensor: its noise is keyed by the flat element index")
    if offset < 0:
        raise ValueError(f"offset={offset} must be >= 0")
    for seed in seeds:
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed {seed} must be in [0, 2**64)")


def _kernels():
    from . import zo_noise_triton

    return zo_noise_triton


def _pieces(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + TWIN_CHUNK, n)) for a in range(0, n, TWIN_CHUNK)]


def _counter(offset: int, a: int, b: int, device: torch.device) -> torch.Tensor:
    return torch.arange(offset + a, offset + b, dtype=torch.int64, device=device)


def perturbed(w: torch.Tensor, seed: int, offset: int, scales: Sequence[float]) -> list[torch.Tensor]:
    """``(w + s z).to(w.dtype)`` for each of the one or two ``scales`` (fresh tensors, one draw of ``z``); ``w``
    itself is not written."""
    if len(scales) not in (1, 2):
        raise ValueError(f"perturbed takes one or two scales, got {len(scales)}")
    _check(w, [seed], offset)
    outs = [torch.empty_like(w, memory_format=torch.contiguous_format) for _ in scales]
    if w.numel() == 0:
        return outs
    if dispatch.use_triton(w):
        _kernels().perturbed(w, outs, seed, offset, list(scales), BLOCK)
    else:
        _perturbed_twin(w, outs, seed, offset, scales)
    return outs


def _perturbed_twin(w: torch.Tensor, outs: list[torch.Tensor], seed: int, offset: int,
                    scales: Sequence[float]) -> None:
    flat = w.view(-1)
    for a, b in _pieces(w.numel()):
        z = philox.randn(seed, _counter(offset, a, b, w.device))
        x = flat[a:b].float()
        for out, scale in zip(outs, scales, strict=True):
            out.view(-1)[a:b] = (x + scale * z).to(w.dtype)


def perturb_(w: torch.Tensor, seed: int, offset: int, scale: float) -> torch.Tensor:
    """``w += scale z`` in place (computed in fp32, stored in ``w``'s dtype); returns ``w``. Adding ``-scale z``
    afterwards restores fp32 weights to about an ulp, bf16 / fp16 ones not at all (use ``perturbed``)."""
    _check(w, [seed], offset)
    if w.numel() == 0:
        return w
    if dispatch.use_triton(w):
        _kernels().perturbed(w, [w], seed, offset, [scale], BLOCK)  # each element is read before it is written
    else:
        _perturbed_twin(w, [w], seed, offset, [scale])
    return w


def update_(w: torch.Tensor, seeds: Sequence[int], grads: Sequence[float], lr: float, weight_decay: float,
            round_seed: int, offset: int = 0) -> torch.Tensor:
    """The MeZO step ``w <- round(w (1 - lr wd) - lr sum_k grads[k] z_k)`` in place, ``z_k`` drawn under
    ``seeds[k]``; fp32 weights are stored as computed, bf16 / fp16 ones stochastically rounded with the uniforms
    drawn under ``round_seed``. Returns ``w``."""
    if len(seeds) != len(grads):
        raise ValueError(f"update_ needs one projected gradient per seed: {len(seeds)} seeds, {len(grads)} grads")
    _check(w, [*seeds, round_seed], offset)
    if w.numel() == 0:
        return w
    # -lr g_k and 1 - lr wd in float64, then fp32: the same numbers reach the kernel and the twin
    coefs = torch.tensor([-lr * g for g in grads], dtype=torch.float32)
    decay = 1.0 - lr * weight_decay
    if dispatch.use_triton(w):
        _kernels().update_(w, list(seeds), coefs.tolist(), decay, round_seed, offset, BLOCK)
    else:
        _update_twin(w, seeds, coefs.tolist(), decay, round_seed, offset)
    return w


def _update_twin(w: torch.Tensor, seeds: Sequence[int], coefs: list[float], decay: float, round_seed: int,
                 offset: int) -> None:
    flat = w.view(-1)
    for a, b in _pieces(w.numel()):
        counter = _counter(offset, a, b, w.device)
        new = flat[a:b].float() * decay
        for seed, coef in zip(seeds, coefs, strict=True):
            new += coef * philox.randn(seed, counter)
        if w.dtype == torch.float32:
            flat[a:b] = new
        else:
            flat[a:b] = stochastic_round(new, w.dtype, philox.rand(round_seed, counter))
