"""Where offloaded blocks live between their turns on the compute device: CPU RAM or disk.

A store holds each block's tensors by name. ``load(i)`` returns them on the CPU, ``save(i, tensors)`` keeps new
values. Both are called from the streamer's background thread, one call at a time and in order, so a block is
never read while its update is still being written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class RamStore:
    """Blocks in CPU RAM, pinned (page-locked) when the compute device is CUDA so copies to it run asynchronously.

    With a CPU compute device the stored tensors are the block's tensors themselves: nothing is copied, and
    updates land in place.
    """

    def __init__(self, pin: bool = False):
        self.pin = pin
        self.blocks: dict[int, dict[str, torch.Tensor]] = {}

    def save(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        stored = self.blocks.get(index)
        if stored is None:
            self.blocks[index] = {name: self._host(t) for name, t in tensors.items()}
            return
        for name, t in tensors.items():
            if stored[name] is not t:
                stored[name].copy_(t)

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to("cpu").contiguous()
        return t.pin_memory() if self.pin else t

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return self.blocks[index]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for block in self.blocks.values() for t in block.values())


class DiskStore:
    """One safetensors file per block under ``directory``, read memory-mapped; an update is written to a temporary
    file and renamed over the old one, so an interrupted write never leaves a half-written block."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def save(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        target = self.path(index)
        partial = target.with_suffix(".partial")
        save_file({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, str(partial))
        os.replace(partial, target)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.path(index)))

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("block-*.safetensors"))


def make_store(kind: str, directory: str | os.PathLike | None = None, pin: bool = False):
    """``"ram"`` or ``"disk"`` (which needs ``directory``)."""
    if kind == "ram":
        return RamStore(pin=pin)
    if kind == "disk":
        if directory is None:
            raise ValueError("offload='disk' needs offload_dir: a directory for the blocks' safetensors files (as much "
                             "free space as the blocks' weights).")
        return DiskStore(directory)
    raise ValueError(f"unknown offload store {kind!r}; use 'ram' (CPU memory) or 'disk' (with offload_dir)")
