"""Optimizer states kept as blockwise 8-bit codes (the scheme of bitsandbytes' 8-bit optimizers).

The format, its maps and the pure-torch (de)quantizers live in ``lowmem.kernels.codes_8bit``; the store calls
``kernels.blockwise_8bit``, which runs the Triton kernels on CUDA and those twins elsewhere. Each block of 256
elements keeps one uint8 code per element and its absolute maximum in fp32: about 1.016 B/param per moment.
Tensors with fewer than ``min_8bit_size`` elements stay fp32.
"""

from __future__ import annotations

import math
import warnings

import torch

from ..kernels import blockwise_8bit
from ..kernels.codes_8bit import blocks_of, cached_map
from . import sharded


class BlockwiseQuantStore:
    """``StateStore`` keeping large moments as blockwise 8-bit codes (the format: ``kernels.codes_8bit``).

    Per quantized key: ``state[key]`` uint8 codes shaped like the moment, ``state[key + "_absmax"]``
    fp32 block maxima and ``state[key + "_signed"]`` a plain bool naming the map (``load`` is not
    told the signedness, and a plain bool costs no tensor bytes and survives ``weights_only``).
    Tensors with fewer than ``min_8bit_size`` elements are kept as plain fp32 in ``state[key]``; with
    ``unsigned_dtype``, second moments (``signed=False``) are kept as plain tensors of that dtype (see
    ``states.make_store``'s ``"8bit+bfloat16"``).
    ``load`` returns a fresh dequantized fp32 tensor; ``save`` requantizes it.

    Sharded moments (FSDP2 DTensors, sharded by rows): each rank quantizes its own rows. Its blocks are one
    process's blocks when every rank's rows start on a block boundary, and the block maxima then form a DTensor
    sharded the way torch shards (equal chunks of blocks), which a checkpoint (torch.distributed.checkpoint)
    reshards to another world size. That holds for the usual sizes (rows of 4096 or 11008 elements, rank 128 moments
    split in halves); a sharded moment where it does not is kept in fp32, with one warning naming it.
    """

    def __init__(self, min_8bit_size: int = 4096, blocksize: int = 256, unsigned_dtype: torch.dtype | None = None):
        self.min_8bit_size, self.blocksize = min_8bit_size, blocksize
        self.unsigned_dtype = unsigned_dtype
        self._warned_unaligned = False

    def init(self, state: dict, key: str, like: torch.Tensor, signed: bool = True) -> None:
        if not signed and self.unsigned_dtype is not None:  # second moments kept in full precision
            state[key] = torch.zeros_like(like, dtype=self.unsigned_dtype)
            return
        if like.numel() < self.min_8bit_size or (sharded.is_sharded(like) and not self._blocks_align(like)):
            state[key] = torch.zeros_like(like, dtype=torch.float32)  # the whole tensor's size, sharded or not
            return
        # contiguous whatever ``like``'s strides: codes are read and written in flat order, on every path. A sharded
        # moment keeps this rank's rows as codes (a DTensor placed like ``like``) and their blocks' maxima.
        part = sharded.local(like)
        state[key] = sharded.like(torch.empty_like(part, dtype=torch.uint8, memory_format=torch.contiguous_format),
                                  like)
        blocks = -(-part.numel() // self.blocksize)
        absmax = torch.empty(blocks, dtype=torch.float32, device=part.device)
        state[key + "_absmax"] = self._absmax_like(absmax, like)
        state[key + "_signed"] = bool(signed)
        self.zero(state, key)

    def _blocks_align(self, like: torch.Tensor) -> bool:
        """Whether a sharded tensor's shards split its flat blocks as one process has them (``blocks_align``);
        else its moments stay fp32, warned once."""
        world = like.device_mesh.size()
        aligned = like.device_mesh.ndim == 1 and blocks_align(tuple(like.shape), world, self.blocksize)
        if not aligned and not self._warned_unaligned:
            self._warned_unaligned = True
            warnings.warn(f"8-bit states of a sharded {tuple(like.shape)} tensor stay fp32 over {world} ranks: its "
                          f"shards do not start on blocks of {self.blocksize} elements, so its blocks would depend on "
                          "where the shards split (same for any other such tensor).", UserWarning, stacklevel=4)
        return aligned

    def _absmax_like(self, absmax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A sharded moment's block maxima as a DTensor of all its blocks, sharded by chunks of blocks."""
        if not sharded.is_sharded(like):
            return absmax
        return sharded.like(absmax, like, shape=(-(-like.numel() // self.blocksize),))

    def load(self, state: dict, key: str) -> torch.Tensor:
        if key + "_absmax" not in state:
            return state[key]
        codes = sharded.local(state[key])
        code = cached_map(state[key + "_signed"], codes.device)
        absmax = sharded.local(state[key + "_absmax"])
        values = blockwise_8bit.dequantize_blockwise(codes, absmax, code, self.blocksize)
        return sharded.like(values, state[key])

    def save(self, state: dict, key: str, working: torch.Tensor, signed: bool = True) -> None:
        if key + "_absmax" not in state:
            if working is not state[key]:
                state[key].copy_(working)
            return
        # the new tensors replace the old ones (no copy pass); they have the same shapes and dtypes
        codes, absmax = blockwise_8bit.quantize_blockwise(
            sharded.local(working), cached_map(signed, working.device), self.blocksize)
        state[key] = sharded.like(codes, working)
        state[key + "_absmax"] = self._absmax_like(absmax, working)
        state[key + "_signed"] = bool(signed)

    def chunk(self, state: dict, keys, start: int, end: int) -> dict:
        """A state dict over elements ``start:end`` of the quantized ``keys`` (views; ``start`` on a block
        boundary), for updating a large tensor a chunk at a time; ``write_chunk`` stores the result back."""
        part = {"step": state["step"]}
        for key in keys:
            part[key] = state[key].view(-1)[start:end]
            if key + "_absmax" in state:  # else a full-precision tensor (under min_8bit_size): a view suffices
                part[key + "_absmax"] = state[key + "_absmax"][blocks_of(start, end, self.blocksize)]
                part[key + "_signed"] = state[key + "_signed"]
        return part

    def write_chunk(self, state: dict, part: dict, keys, start: int, end: int) -> None:
        """Copy a chunk's codes and block maxima (replaced by ``save``) back into the whole tensors."""
        for key in [k for k in keys if k + "_absmax" in state]:
            state[key].view(-1)[start:end].copy_(part[key].view(-1))
            state[key + "_absmax"][blocks_of(start, end, self.blocksize)].copy_(part[key + "_absmax"])

    def zero(self, state: dict, key: str) -> None:
        if key + "_absmax" not in state:
            state[key].zero_()
            return
        code = cached_map(state[key + "_signed"], state[key].device)
        state[key].fill_(int(torch.argmin(code.abs())))  # the index of 0.0 in the map
        state[key + "_absmax"].zero_()


def blocks_align(shape: tuple, world: int, blocksize: int) -> bool:
    """Whether the dim-0 shards of a tensor of ``shape`` over ``world`` ranks (torch's chunks: ``ceil(rows / world)``
    rows each) start on whole blocks of ``blocksize`` flat elements and hold the blocks torch's chunks of the block
    maxima give each rank (see ``BlockwiseQuantStore``)."""
    rows, row = shape[0], math.prod(shape[1:])
    blocks = -(-rows * row // blocksize)
    rows_each, blocks_each = -(-rows // world), -(-blocks // world)
    return (rows_each * row) % blocksize == 0 and all(
        -(-max(0, min(rows_each, rows - i * rows_each)) * row // blocksize)
        == max(0, min(blocks_each, blocks - i * blocks_each)) for i in range(world))
