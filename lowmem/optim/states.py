"""State storage: how a rule's moment tensors are kept between steps.

Rules never allocate or read state tensors directly: they ask a ``StateStore`` for a zeroed tensor,
for a working view to update, and hand the view back. For full-precision storage (fp32, bf16) the
working view *is* the stored tensor and is updated in place, so the arithmetic is the same
sequence of in-place ops the reference optimizers run (bit-identical in the same dtype). Blockwise
8-bit storage (``quantized.BlockwiseQuantStore``) has the same interface: ``load`` dequantizes,
``save`` requantizes.

Memory: one tensor per moment with the low-rank gradient's shape, ``element_size(dtype)`` bytes each
(8-bit: one byte per element plus an fp32 absmax per block of 256).
"""

from __future__ import annotations

import torch

from .quantized import BlockwiseQuantStore
from .sharded import local

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class StateStore:
    """Full-precision storage in a fixed dtype, or in the gradient's dtype when ``dtype`` is None.

    The interface every store implements (blockwise 8-bit included):

    * ``init(state, key, like, signed)``: create ``state[key]`` as zeros shaped like ``like``;
      ``signed`` says whether the values can be negative (first moments) or not (second moments);
    * ``load(state, key)``: the tensor to update in place (a dequantized fp32 copy for 8-bit);
    * ``save(state, key, working, signed)``: store the working tensor back (requantize for 8-bit);
    * ``zero(state, key)``: reset to zeros, keeping the storage;
    * ``chunk(state, keys, start, end)`` / ``write_chunk(state, part, keys, start, end)``: a state dict over a
      range of elements (``start`` a multiple of ``kernels.codes_8bit.CHUNK``), and storing it back.
    """

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    def init(self, state: dict, key: str, like: torch.Tensor, signed: bool = True) -> None:
        state[key] = torch.zeros_like(like, dtype=self.dtype or like.dtype)

    def load(self, state: dict, key: str) -> torch.Tensor:
        return state[key]

    def save(self, state: dict, key: str, working: torch.Tensor, signed: bool = True) -> None:
        if working is not state[key]:
            state[key].copy_(working)

    def zero(self, state: dict, key: str) -> None:
        state[key].zero_()

    def chunk(self, state: dict, keys, start: int, end: int) -> dict:
        """A state dict over elements ``start:end`` of ``keys``: views, updated in place (``write_chunk`` has
        nothing to copy back). The optimizer uses it to update a large tensor a chunk of elements at a time."""
        return {"step": state["step"], **{key: state[key].view(-1)[start:end] for key in keys}}

    def write_chunk(self, state: dict, part: dict, keys, start: int, end: int) -> None:
        """Store a chunk from ``chunk`` back (views: already in place)."""


def state_bytes(state: dict) -> int:
    """Exact bytes held by the tensors of one parameter's optimizer state (on this rank, for sharded state)."""
    return sum(local(v).numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


_8BIT = ("8bit", "int8", "uint8", "blockwise_8bit")

#: 8-bit first moments, second moments in full precision (what an embedding gets where an 8-bit second moment
#: would not do: ``registry.create_optimizer``).
FIRST_MOMENTS_8BIT = {"8bit+bfloat16": torch.bfloat16, "8bit+float32": torch.float32}

#: The accepted values of the ``state_dtype`` option (``None`` follows the gradient's dtype).
STATE_DTYPES = (None, "float32", "bfloat16", "8bit")


def make_store(name: str | torch.dtype | None, min_8bit_size: int = 4096) -> StateStore:
    """The store for a ``state_dtype`` option: full precision (None = the gradient's dtype, float32,
    bfloat16) or blockwise 8-bit (``"8bit"``; tensors under ``min_8bit_size`` elements stay fp32), or 8-bit first
    moments with second moments in bf16 / fp32 (``"8bit+bfloat16"``, ``"8bit+float32"``)."""
    if name is None or isinstance(name, torch.dtype):
        return StateStore(name)
    key = str(name).lower()
    if key in _8BIT:
        return BlockwiseQuantStore(min_8bit_size=min_8bit_size)
    if key in FIRST_MOMENTS_8BIT:
        return BlockwiseQuantStore(min_8bit_size=min_8bit_size, unsigned_dtype=FIRST_MOMENTS_8BIT[key])
    if key not in _DTYPES:
        raise ValueError(
            f"unknown state_dtype {name!r}; use one of {STATE_DTYPES} "
            "(None keeps moments in the gradient's dtype, as the reference optimizers do)"
        )
    return StateStore(_DTYPES[key])
