"""Which implementation of a kernel runs: its Triton kernel or its pure-torch twin.

``auto`` (the default) runs Triton on CUDA tensors when Triton imports, the twin otherwise. ``triton`` forces the
kernels (on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``, which is how the tests check them without a GPU);
``torch`` forces the twins everywhere. Choose with the environment variable ``LOWMEM_KERNELS`` or, in code,
``set_backend(name)`` / ``with backend(name):``.

Triton is imported only when a kernel is about to run, so lowmem imports (and runs on the twins) without it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor

BACKENDS = ("auto", "triton", "torch")
_triton_error: str | None = None
_triton_checked = False
_launch_error: str | None = None
_launch_checked = False


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is unknown: use one of {BACKENDS} (LOWMEM_KERNELS or set_backend)")
    return name


_backend = _check(os.environ.get("LOWMEM_KERNELS", "auto"))  # a typo fails at import, not at the first step


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``, read when Triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_error() -> str | None:
    """Why Triton cannot be used (None when it imports)."""
    global _triton_error, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            importlib.import_module("triton")
        except Exception as err:  # not installed, or a broken install: the twins still run
            _triton_error = f"{type(err).__name__}: {err}"
    return _triton_error


def current() -> str:
    """The backend asked for: ``auto``, ``triton`` or ``torch``."""
    return _check(_backend)


def set_backend(name: str) -> None:
    """Force ``triton`` or ``torch`` for this process, or go back to ``auto``."""
    global _backend
    _backend = _check(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``set_backend(name)`` for the duration of a ``with`` block."""
    before = current()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a kernel on ``tensors`` runs as Triton (True) or as its torch twin (False).

    Forcing ``triton`` where it cannot run is an error that says why, not a silent fallback."""
    name = current()
    if name == "torch" or any(isinstance(t, DTensor) for t in tensors):  # sharded: the composed path (torch ops)
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        return on_cuda and triton_error() is None and _launches(tensors[0].device)
    if triton_error() is not None:
        raise RuntimeError(f"LOWMEM_KERNELS=triton, but Triton does not import ({triton_error()}): install it "
                           "(`pip install triton`), or use LOWMEM_KERNELS=auto to run the torch twins")
    if not (on_cuda or (interpreting() and all(t.device.type == "cpu" for t in tensors))):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"LOWMEM_KERNELS=triton, but the tensors are on {devices}: Triton kernels need CUDA "
                           "tensors (or CPU tensors with TRITON_INTERPRET=1 set before Triton is imported)")
    return True


def _launches(device: torch.device) -> bool:
    """Whether a Triton kernel compiles and runs here (once per process): Triton can import yet fail at its first
    launch (no C compiler for its launcher, an unsupported GPU). ``auto`` then warns once and runs the twins."""
    global _launch_error, _launch_checked
    if not _launch_checked:
        _launch_checked = True
        try:
            from ._probe_triton import probe

            probe(device)
        except Exception as err:  # any failure to build or run a kernel: the twins still work
            _launch_error = f"{type(err).__name__}: {str(err)[:300]}"
            warnings.warn(f"lowmem: Triton kernels do not run here ({_launch_error}); using the torch twins "
                          "(LOWMEM_KERNELS=torch silences this)", RuntimeWarning, stacklevel=3)
    return _launch_error is None


def on_device(t: torch.Tensor):
    """The context a kernel on ``t`` launches in: ``t``'s CUDA device made current (Triton launches on the current
    device, so a tensor on ``cuda:1`` would otherwise be read from ``cuda:0``'s context)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
