"""Blockwise 8-bit codes in pure torch (the scheme of bitsandbytes' 8-bit optimizers): the dynamic maps, the
nearest-code search, and blockwise quantize / dequantize. ``blockwise_8bit`` runs its Triton kernels on CUDA and
these functions (their twins) elsewhere; ``adam_8bit`` compiles ``block_codes`` for the CPU; the optimizer's 8-bit
state store (``lowmem.optim.quantized.BlockwiseQuantStore``) keeps its moments in this format.

A moment tensor is flattened and cut into blocks of ``blocksize`` (256) elements. Each block keeps
its absolute maximum in fp32 and one uint8 code per element: the index of the entry of a 256-value
*dynamic map* nearest to ``x / absmax``. First moments use the signed map, second moments the
unsigned one. Rounding is to the nearest code, ties to the lower code (as bitsandbytes' pure-torch
backend), found by a table lookup on the float's bits (``nearest_code``; ~3x faster than bucketize).
A zero block has absmax 0 and dequantizes to exactly 0.

Memory: ``N`` bytes of codes plus ``4 * ceil(N / blocksize)`` bytes of absmax per moment, about
1.016 B/param at block size 256.

Known property (shared with bitsandbytes): the signed map has +1.0 but not -1.0 (its most negative
entry is about -0.99297), so a block whose largest-magnitude value is negative stores that value
about 0.7% too small, and requantizing the dequantized block shrinks its absmax by that factor.
Blocks led by a positive value, and all non-negative blocks, round-trip exactly.
"""

from __future__ import annotations

import torch

_MAPS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic quantization map: ``2**total_bits`` fp32 values in [-1, 1], sorted ascending.

    Exponent level ``i`` contributes the midpoints of ``linspace(0.1, 1)`` split into
    ``2**(i + total_bits - 1 - max_exponent_bits)`` intervals (twice as many when unsigned, which
    has no sign bit), scaled by ``10**(i + 1 - max_exponent_bits)``, with their negatives when
    signed; then 0 and 1 are added. Same values as bitsandbytes' ``create_dynamic_map``.
    """
    free_bits = total_bits - 1 - max_exponent_bits  # fraction bits of the smallest exponent level
    values = [0.0, 1.0]
    for i in range(max_exponent_bits):
        intervals = 2 ** (i + free_bits + (0 if signed else 1))
        edges = torch.linspace(0.1, 1, intervals + 1, dtype=torch.float32)
        mids = (10 ** (i + 1 - max_exponent_bits)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += mids.tolist() + ((-mids).tolist() if signed else [])
    if len(values) != 2**total_bits:
        raise ValueError(f"map has {len(values)} values, expected {2**total_bits}")
    return torch.tensor(sorted(values), dtype=torch.float32)


def cached_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The default 8-bit dynamic map for ``signed``, built once per device (on CPU, then moved)."""
    key = (bool(signed), torch.device(device))
    if key not in _MAPS:
        _MAPS[key] = dynamic_map(signed).to(key[1])
    return _MAPS[key]


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``x`` flattened, zero-padded to a multiple of ``blocksize`` and viewed as (blocks, blocksize)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


# Nearest-code search by table lookup: the float's sign, exponent and top 8 mantissa bits pick a *cell*;
# one int32 table entry per cell packs the code of the cell's lowest value (high 16 bits) and where,
# inside the cell, the next bound up lies (low 16 bits: the bound's low 15 key bits, or 0x7FFF when
# the bound is past the cell). One gather and one compare finish the search. Exact (equal to
# ``torch.bucketize(x, bounds)``, ties to the lower code) because no gap between codes is narrower than
# a cell (2**-8 relative; the narrowest gap, 0.99297 -> 1, is 0.7%), so a cell holds at most one bound.
_CELL_SHIFT = 23 - 8
_IN_CELL = (1 << _CELL_SHIFT) - 1  # the key bits below the cell index
_ONE_BITS = 0x3F800000  # float32 1.0: |x| <= 1 after scaling by the block's absmax
_TABLES: dict[tuple[bool, torch.device], tuple[torch.Tensor, int]] = {}


def _sortable(bits: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the float32 values whose bits they are (the map is its own inverse)."""
    return torch.bitwise_xor(bits, (bits >> 31) & 0x7FFFFFFF)


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 bounds between consecutive codes: a value above bound ``i`` (strictly) takes a code past ``i``."""
    return (code[:-1] + code[1:]) / 2


def lookup_table(code: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(packed int32 table, cell offset) for ``nearest_code`` on ``code``, built once per map and device."""
    key = (bool(code[0] < 0), code.device)
    if key not in _TABLES:
        bounds = midpoints(code)
        lowest = -(_ONE_BITS >> _CELL_SHIFT) - 1
        cells = torch.arange(lowest, (_ONE_BITS >> _CELL_SHIFT) + 1, device=code.device)
        starts = cells << _CELL_SHIFT
        edges = _sortable(starts.to(torch.int32)).view(torch.float32)
        first = torch.bucketize(edges, bounds)  # code of each cell's lowest value
        above = torch.cat([bounds, bounds.new_tensor([float("inf")])])[first]  # the next bound up
        inside = _sortable(above.view(torch.int32)).long() - starts  # where it lies from the cell's start
        threshold = torch.where(inside <= _IN_CELL, inside, _IN_CELL)
        _TABLES[key] = (((first << 16) | threshold).to(torch.int32), -lowest)
    return _TABLES[key]


def codes_from_table(scaled: torch.Tensor, table: torch.Tensor, offset: int) -> torch.Tensor:
    """uint8 nearest codes of ``scaled`` (|scaled| <= 1) from a ``lookup_table``; runs eagerly or compiled."""
    key = _sortable(scaled.view(torch.int32))
    cell = (key >> _CELL_SHIFT).add_(offset).clamp_(0, table.numel() - 1)
    entry = table.index_select(0, cell.reshape(-1)).view(cell.shape)
    return ((entry >> 16) + ((key & _IN_CELL) > (entry & 0xFFFF)).to(torch.int32)).to(torch.uint8)


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest entry of ``code`` for each value of ``scaled`` (|scaled| <= 1)."""
    return codes_from_table(scaled, *lookup_table(code))


def block_codes(blocks: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, offset: int) -> torch.Tensor:
    """Codes of ``blocks`` (n_blocks, blocksize) scaled by their ``absmax``; runs eagerly or compiled."""
    scale = 1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    return codes_from_table((blocks * scale[:, None]).clamp(-1.0, 1.0), table, offset)


#: Elements (de)quantized at a time: the per-element temporaries (int32 keys, gathers, padding) stay this size
#: however large the tensor (a multiple of every block size used).
CHUNK = 1 << 19


def blocks_of(start: int, end: int, blocksize: int) -> slice:
    """The blocks that elements ``start:end`` fall in (``start`` on a block boundary; the last may be partial)."""
    return slice(start // blocksize, -(-end // blocksize))


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to (uint8 codes shaped like ``x``, fp32 absmax per block of ``blocksize``), ``CHUNK``
    elements at a time."""
    flat = x.detach().reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-flat.numel() // blocksize), dtype=torch.float32, device=x.device)
    table = lookup_table(code)
    for start in range(0, flat.numel(), CHUNK):
        end = min(start + CHUNK, flat.numel())
        blocks = _blocks(flat[start:end].float(), blocksize)
        chunk_absmax = blocks.abs().amax(dim=1)
        absmax[blocks_of(start, end, blocksize)] = chunk_absmax
        codes[start:end] = block_codes(blocks, chunk_absmax, *table).reshape(-1)[: end - start]
    return codes.view(x.shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: fp32 tensor shaped like ``codes``, ``CHUNK`` elements at a time."""
    flat = codes.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.float32, device=codes.device)
    for start in range(0, flat.numel(), CHUNK):
        end = min(start + CHUNK, flat.numel())
        scales = absmax[blocks_of(start, end, blocksize)].float()[:, None]
        values = _blocks(code.index_select(0, flat[start:end].int()), blocksize) * scales
        out[start:end] = values.reshape(-1)[: end - start]
    return out.view(codes.shape)
