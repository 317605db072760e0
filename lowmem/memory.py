"""Memory planner: bytes of weights, gradients, optimizer state, activations and logits of one training step.

``plan(model, seq_len, batch_size, card_gib)`` reads only the model's config, builds the model on the ``meta``
device (shapes, no weights: a 7B config plans in about a second), builds each optimizer on it with
``lowmem.create_optimizer`` (so the param groups, ranks and state precisions are lowmem's own) and prices every
category by formula. ``format_plan(rows)`` prints the table and the recommendation.

Where the numbers come from:

* optimizer state: per parameter, from its group's projector / rule / lift / store (``param_state_bytes``); equal
  to ``optimizer.state_bytes()`` after the first step, byte for byte (tests/test_memory_plan.py, every name);
* activations and logits: coefficients measured with ``MemTracker`` on small LLaMAs (``activation_bytes``);
* peak: the largest of the phases of a step (``peak_bytes``), as seen in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields

import torch
from torch import nn

GIB = 2**30
BLOCK = 256  # blockwise 8-bit: one fp32 absmax per 256 codes (lowmem.kernels.codes_8bit)


# --- config and model
def load_config(model):
    """A ``transformers.PretrainedConfig`` from a config JSON path, a local model dir, an inline dict, a config
    object or a hub id (the hub needs a network connection; only the config is read, never weights)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    if isinstance(model, dict):
        return _config_from_dict(model)
    path = os.fspath(model)
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist: pass a config.json path, a model "
                                    "directory holding one, or a hub id such as 'meta-llama/Llama-3.2-1B'")
        with open(path) as f:
            return _config_from_dict(json.load(f))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model directory {path!r} has no config.json")
        return AutoConfig.from_pretrained(path)
    if os.path.sep in path and not _looks_like_hub_id(path) or path.startswith((".", "~")):
        raise FileNotFoundError(f"no such file or directory: {path!r} (a config.json path, a model directory "
                                "or a hub id 'org/name')")
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as err:  # offline, unknown id, private repo
        raise ValueError(f"could not read the config of {path!r} from the Hugging Face hub ({type(err).__name__}: "
                         f"{str(err)[:200]}). Offline, pass a config.json path, a local model directory or a "
                         "dict of config fields instead.") from err


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not os.path.exists(path.split("/")[0])


def _config_from_dict(fields: dict):
    from transformers import AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **fields)


def meta_model(config, dtype: torch.dtype = torch.float32, lora: dict | None = None) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device (shapes and dtypes only, nothing allocated); with
    ``lora`` (peft ``LoraConfig`` fields, e.g. ``dict(r=16, target_modules=[...])``) wrapped by peft."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora:
        model = _with_lora(model, lora)
    return model


def _with_lora(model: nn.Module, lora: dict) -> nn.Module:
    with torch.device("meta"):
        return _peft(model, lora)


def _peft(model: nn.Module, lora: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from .quiet import lora_without_bitsandbytes

    with lora_without_bitsandbytes(model):  # unless it is quantized (measure_peak's QLoRA)
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))


def nbytes(numel: int, dtype: torch.dtype) -> int:
    return int(numel) * torch.empty((), dtype=dtype).element_size()


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight in bitsandbytes' 4-bit format with double quantization (QLoRA): two codes per byte, a
    uint8 absmax per 64-element block and an fp32 absmax per 256 such blocks."""
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256)


def quantized_linears(model: nn.Module) -> list[nn.Parameter]:
    """The weights ``quantization_bit: 4`` stores in 4 bits: every frozen ``nn.Linear`` weight but the output
    head's (transformers keeps the head unquantized)."""
    head = model.get_output_embeddings()
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear) and m is not head
            and not m.weight.requires_grad]


def weight_bytes(model: nn.Module, quantized: bool = False) -> int:
    """Bytes of ``model``'s parameters; with ``quantized`` its frozen linear weights in 4 bits (``nf4_bytes``)."""
    four_bit = {id(w) for w in quantized_linears(model)} if quantized else set()
    return sum(nf4_bytes(p.numel()) if id(p) in four_bit else p.numel() * p.element_size()
               for p in model.parameters())


# --- optimizer state
def store_bytes(numel: int, like_dtype: torch.dtype, store) -> int:
    """Bytes one moment of ``numel`` elements takes in ``store`` (``lowmem.optim.states``): the store's dtype or
    the tensor's own; blockwise 8-bit: 1 B per element + a 4 B absmax per block, fp32 under ``min_8bit_size``."""
    from .optim.quantized import BlockwiseQuantStore

    if isinstance(store, BlockwiseQuantStore):
        if numel < store.min_8bit_size:
            return 4 * numel
        return numel + 4 * math.ceil(numel / store.blocksize)
    return nbytes(numel, store.dtype or like_dtype)


def _projected(shape: tuple, projector) -> tuple[tuple, int]:
    """(shape of the projected gradient, elements of the projector's stored tensors) for one parameter."""
    from .optim.projectors import CoordinateProjector, GaussianProjector, _MatrixProjector

    if isinstance(projector, GaussianProjector):  # the matrix is regenerated from a seed: nothing stored
        m, n = shape
        r = projector.rank_for(shape)
        return ((m, r) if projector.side(shape) == "right" else (r, n)), 0
    if isinstance(projector, _MatrixProjector):
        m, n = shape
        r, side = projector.rank_for(shape), projector.side(shape)
        low = {"right": (m, r), "left": (r, n), "full": (r, r)}[side]
        stored = {"right": r * n, "left": m * r, "full": m * r + r * n}[side]
        return low, stored
    if isinstance(projector, CoordinateProjector):
        m, n = shape
        if projector.choice == "permutation":
            side = projector.side(shape)
            r = round({"right": n, "left": m, "full": min(m, n)}[side] * projector.density)
            return {"right": (m, r), "left": (r, n), "full": (r, r)}[side], (2 * r if side == "full" else r)
        length = {"columns": n, "rows": m, "randk": m * n}[projector.choice]
        k = int(length * projector.density)
        return {"columns": (m, k), "rows": (k, n), "randk": (k,)}[projector.choice], k
    return tuple(shape), 0


def _moment_shapes(low: tuple, rule, float_dtype: torch.dtype) -> list[tuple[tuple, torch.dtype, bool, bool]]:
    """(shape, dtype the store is handed, whether its rows are ``low``'s rows, whether it is signed: a first moment)
    of each moment a rule keeps for a gradient of shape ``low`` (``lowmem.optim.rules``: Adafactor/CAME work in fp32,
    the others in the gradient's dtype). Row-following moments are split with the parameter's rows under FSDP2; the
    others are kept whole."""
    from .optim.rules import CAME, Adafactor, AdamMini, AdamW, Muon

    def factored(shape):
        return [(shape[:-1], torch.float32, True, False), (shape[:-2] + shape[-1:], torch.float32, False, False)] \
            if len(shape) >= 2 else [(shape, torch.float32, True, False)]

    if isinstance(rule, AdamW):
        return [(low, float_dtype, True, True), (low, float_dtype, True, False)]
    if isinstance(rule, Muon):
        return [(low, float_dtype, True, True)]
    if isinstance(rule, CAME):
        res = factored(low) if len(low) >= 2 else []
        return [(low, torch.float32, True, True)] + factored(low) + res
    if isinstance(rule, Adafactor):
        return factored(low) + ([(low, torch.float32, True, True)] if rule.beta1 is not None else [])
    if isinstance(rule, AdamMini):
        numel = math.prod(low)
        second = {"elementwise": low, "tensor": (), "rows": (low[0], 1),
                  "heads": (numel // (rule.head_numel or 1), 1)}[rule.block]
        return [(low, float_dtype, True, True), (second, float_dtype, rule.block != "tensor", False)]
    return []  # SGD, sign-SGD: no state


def _state_tensors(shape: tuple, dtype: torch.dtype, parts) -> list[tuple[tuple, torch.dtype, bool, bool]]:
    """(shape, dtype, kept in the group's store, split with the parameter's rows) of each tensor one parameter's
    state holds once it has stepped: the projector's stored tensors, the rule's moments on the projected shape, and
    the lift's 0-d limiter norm. What ``lowmem.optim.sharded`` documents per part: a right-side projection keeps its
    m x r moments by rows and its r x n factor whole; a left side its U (m x r) by rows and the r x n moments whole."""
    from .optim.lifts import ApolloLift, FiraLift
    from .optim.projectors import CoordinateProjector

    low, stored = _projected(shape, parts.projector) if len(shape) == 2 else (shape, 0)
    side = parts.projector.side(shape) if len(shape) == 2 else None
    by_rows = side in (None, "right") and not isinstance(parts.projector, CoordinateProjector)
    tensors = []
    if stored:
        index_dtype = torch.int64 if isinstance(parts.projector, CoordinateProjector) else dtype
        if side in ("left", "full"):
            r = parts.projector.rank_for(shape)
            tensors.append(((shape[0], r), index_dtype, False, True))
            stored -= shape[0] * r
        if stored:
            tensors.append(((stored,), index_dtype, False, False))
    unsigned = getattr(parts.store, "unsigned_dtype", None)  # 8-bit first moments, second ones in this dtype
    tensors += [(s, d, True, by_rows and rows) if signed or unsigned is None else (s, unsigned, False, by_rows and rows)
                for s, d, rows, signed in _moment_shapes(low, parts.rule, dtype)]
    if isinstance(parts.lift, FiraLift) or isinstance(parts.lift, ApolloLift) and parts.lift.limiter:
        tensors.append(((), dtype, False, False))
    return tensors


def _rank_bytes(shape: tuple, dtype: torch.dtype, in_store: bool, by_rows: bool, store, world: int) -> int:
    """Bytes of one state tensor on the rank holding the most of it (rank 0: ``ceil(rows / world)`` rows) when
    ``world`` ranks split it by rows (``by_rows``), else whole; blockwise 8-bit as ``BlockwiseQuantStore`` keeps it
    (a moment whose shards would not start on whole blocks stays fp32)."""
    from .optim.quantized import BlockwiseQuantStore, blocks_align

    numel = math.prod(shape)
    split = by_rows and world > 1 and len(shape) >= 1
    local = _shard_numel(shape, world) if split else numel
    if not in_store:
        return nbytes(local, dtype)
    if split and isinstance(store, BlockwiseQuantStore) and numel >= store.min_8bit_size:
        if not blocks_align(shape, world, store.blocksize):
            return 4 * local
        return local + 4 * -(-math.ceil(numel / store.blocksize) // world)  # codes, and a chunk of block maxima
    return store_bytes(local, dtype, store)


def param_state_bytes(shape: tuple, dtype: torch.dtype, parts, active: bool = True, world: int = 1) -> int:
    """Exact bytes of one parameter's optimizer state once it has stepped (``_state_tensors``); with ``world`` > 1,
    on the rank that holds the most of it when FSDP2 shards the parameter's rows over ``world`` ranks."""
    from .optim.projectors import BlockProjector

    if isinstance(parts.projector, BlockProjector) and not active:
        return 0  # an inactive FRUGAL block keeps no statistics
    return sum(_rank_bytes(s, d, in_store, by_rows, parts.store, world)
               for s, d, in_store, by_rows in _state_tensors(tuple(shape), dtype, parts))


def _active_blocks(optimizer, index: int, parts) -> set[int]:
    """Indices of a FRUGAL block group's tensors active in the first window (the largest ones for ``random``)."""
    from .optim.projectors import BlockProjector

    params = optimizer.param_groups[index]["params"]
    if not isinstance(parts.projector, BlockProjector):
        return set(range(len(params)))
    if parts.projector.order == "random":  # unknown in advance: price the largest tensors (an upper bound)
        k = parts.projector.num_active(len(params))
        return set(sorted(range(len(params)), key=lambda i: -params[i].numel())[:k])
    return set(parts.projector.choose(dict(optimizer.param_groups[index]), len(params)))


def _device_states(optimizer, model: nn.Module, per_param: dict[str, int]) -> int:
    """The state bytes on the device with ``offload_states``: the largest one parameter's update brings in, its
    whole states, or one chunk's for a tensor updated a chunk at a time (``offload_states``)."""
    from .optim.compose import build_parts, chunk_ranges, updates_in_chunks

    names = {id(p): n for n, p in model.named_parameters()}
    largest = 0
    for group in optimizer.param_groups:
        parts = build_parts(group)
        for p in group["params"]:
            if names.get(id(p)) in per_param:
                whole = per_param[names[id(p)]]
                if updates_in_chunks(parts, p.shape):
                    whole = -(-whole * chunk_ranges(parts, p.shape)[0][1] // p.numel())
                largest = max(largest, whole)
    return largest


def _streamed(update: tuple[int, int], streams: bool) -> tuple[int, int]:
    """(gradient, temporary) bytes of a tensor's layer-wise update; streamed (``streamed_rows``), no whole gradient
    but a range of it at a time (the range in fp32 and in the weights' dtype, about 6 bytes per element)."""
    from .kernels.codes_8bit import CHUNK

    grad, temp = update
    return (0, temp + 6 * min(CHUNK, grad)) if streams else (grad, temp)


def int8_weight_bytes(numel: int) -> int:
    """Bytes of a weight stored in int8 (``weight_dtype="int8"``): a code per element and an fp32 scale per block."""
    from .kernels.int8_weights import BLOCK, n_blocks

    return numel + 4 * n_blocks(numel, BLOCK)


def int8_update_bytes(numel: int) -> int:
    """The extra temporaries of an int8 weight's update: its fp32 copy (the update's target, stored back with
    stochastic rounding ``CHUNK`` elements at a time: about 16 bytes per element of one chunk)."""
    from .kernels.int8_weights import CHUNK

    return 4 * numel + 16 * min(numel, CHUNK)


def _int8_targets(model: nn.Module, name: str, options: dict) -> dict[int, nn.Parameter]:
    """The weights ``weight_dtype="int8"`` in ``options`` would store in int8 (popped from ``options``: the plan
    prices them on the float meta model), by id; empty without it."""
    from .optim.registry import check_options
    from .optim.targets import split_parameters

    if options.get("weight_dtype") is None:
        options.pop("weight_dtype", None)
        return {}
    check_options(name, options)  # a name that projects nothing, or a weight_dtype lowmem does not have
    options.pop("weight_dtype")
    return {id(p): p for _, p in split_parameters(model, options.get("target_modules")).targets}


def _priced_optimizer(name: str, model: nn.Module, **options) -> tuple:
    """(``lowmem.create_optimizer(name, model, **options)``, whether it updates layer-wise, the ids of the weights
    whose layer-wise updates stream a range of rows at a time (``streamed_rows``)), built without the warning about
    ranks at or above a matrix's smaller dimension (the plan prices those matrices at that dimension, as the optimizer
    runs them) and without its layer-wise hooks (harmless on meta parameters, but the model is left as it was)."""
    from . import create_optimizer
    from .optim.registry import get_spec

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"rank=\S+ is at least min\(m, n\)")
        optimizer = create_optimizer(name, model, **options)
    layerwise = optimizer.layerwise is not None or get_spec(name).layerwise
    streamed = {id(m.weight) for m in optimizer.layerwise.streamed} if optimizer.layerwise else set()
    if optimizer.layerwise is not None:
        optimizer.layerwise.remove()
    return optimizer, layerwise, streamed


def optimizer_state_bytes(name: str, model: nn.Module, world: int = 1, **options) -> dict[str, int]:
    """``{parameter name: state bytes}`` of optimizer ``name`` on ``model`` (a meta model is enough): the
    optimizer is built with ``lowmem.create_optimizer`` and each parameter priced from its param group; with
    ``world`` > 1, the bytes on the rank holding the most when FSDP2 shards every parameter over ``world`` ranks."""
    optimizer, _, _ = _priced_optimizer(name, model, **options)
    return _priced_states(optimizer, model, world)


def _priced_states(optimizer, model: nn.Module, world: int = 1) -> dict[str, int]:
    """``{parameter name: state bytes}`` of a built optimizer, from each parameter's param group (per rank over
    ``world`` FSDP2 ranks)."""
    from .optim.compose import build_parts

    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for index, group in enumerate(optimizer.param_groups):
        parts = build_parts(group)
        active = _active_blocks(optimizer, index, parts)
        master = parts.projector.chooses_ahead  # BAdam: a low-precision weight trains through an fp32 master copy
        for i, p in enumerate(group["params"]):
            if p.requires_grad and master and p.dtype != torch.float32:
                out[names[id(p)]] = 4 * p.numel() + param_state_bytes(tuple(p.shape), torch.float32, parts, True, world)
            elif p.requires_grad:
                out[names[id(p)]] = param_state_bytes(tuple(p.shape), p.dtype, parts, i in active, world)
    return out


# --- activations
@dataclass
class Dims:
    """What the activation formula reads from a decoder config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads,
                   getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size)


def activation_bytes(config, batch: int, seq: int, dtype: torch.dtype = torch.float32,
                     checkpointing: bool = False) -> dict[str, int]:
    """Bytes autograd keeps from the forward of a LLaMA-style decoder (sdpa, no attention matrix) for backward,
    as ``loss = model(ids, labels=ids).loss`` leaves them (the returned logits already dropped).

    Returns ``saved`` (all of it, logits' share included), ``layer`` (one decoder layer's, what gradient
    checkpointing recomputes at a time) and ``logits`` (the fp32 log-softmax the loss keeps, b x s x vocab x 4).

    Per token, measured with MemTracker on LLaMAs of hidden 128/256, intermediate 344/688, 2/4 layers, 4/8 heads,
    2/4 kv heads, vocab 1000/4000, seq 64-256, batch 1-2, fp32 and bf16 (exact to a few bytes per step):

    * each RMSNorm: its input upcast to fp32 (4h), the normalized input and the output in the weights' dtype (2eh),
      the fp32 rsqrt (4); e = bytes per weight element;
    * the rest of a layer: e(2h + 2 kv_dim + 4 intermediate) (q and the attention output, k and v, the MLP's gate,
      silu, up and product) plus sdpa's fp32 log-sum-exp, 4 x heads;
    * outside the layers: the final norm, the int64 shifted labels (8), rope's cos and sin (2 head_dim e), and the
      fp32 log-softmax of the loss (4 vocab; transformers upcasts the logits).

    With checkpointing only each layer's input (e h) is kept and one layer is recomputed at a time in backward.
    """
    d, e, tokens = Dims.of(config), nbytes(1, dtype), batch * seq
    kv_dim = d.kv_heads * d.head_dim
    norm = 4 * d.hidden + 2 * e * d.hidden + 4
    layer = 2 * norm + e * (2 * d.hidden + 2 * kv_dim + 4 * d.intermediate) + 4 * d.heads
    top = norm + 8 + 2 * d.head_dim * e
    logits = 4 * d.vocab
    kept = (e * d.hidden if checkpointing else layer) * d.layers + (8 if checkpointing else 0)  # + int64 positions
    return dict(saved=tokens * (kept + top + logits), layer=tokens * layer, logits=tokens * logits,
                hidden=tokens * d.hidden * e)


# --- one update's temporaries
def update_temp_bytes(shape: tuple, dtype: torch.dtype, parts) -> int:
    """Bytes of the temporaries one parameter's update allocates (while its gradient and state are live).

    From reading ``lowmem.optim`` and checked with MemTracker: AdamW's ``sqrt(v)`` buffer (which then holds the
    direction) in the state dtype, one chunk's worth for a large unprojected tensor (updated a chunk at a time);
    blockwise 8-bit: the dequantized fp32 moments, the direction and the new codes;
    Adam-mini's ``g * g``; Adafactor / CAME's fp32 ``g^2`` buffer; GaLore's projected gradient and direction plus
    one range of rows of the back-projected update (Fira and FRUGAL form it whole); APOLLO (fp32) only
    projected-size tensors, no full-size one.
    """
    from .kernels.codes_8bit import CHUNK as QUANT_CHUNK
    from .optim.compose import chunk_ranges, updates_in_chunks
    from .optim.lifts import Lift
    from .optim.projectors import GaussianProjector, _MatrixProjector, rows_added_at_once
    from .optim.quantized import BlockwiseQuantStore
    from .optim.rules import CAME, CHUNK_8BIT, Adafactor, AdamMini, AdamW, Muon, SinkGD

    shape, e = tuple(shape), nbytes(1, dtype)
    low, _ = _projected(shape, parts.projector) if len(shape) == 2 else (shape, 0)
    n_low, n_full = math.prod(low), math.prod(shape)
    quantized = isinstance(parts.store, BlockwiseQuantStore) and n_low >= parts.store.min_8bit_size
    state_e = 4 if quantized else nbytes(1, getattr(parts.store, "dtype", None) or dtype)
    rule = parts.rule
    if updates_in_chunks(parts, shape):  # the whole update runs a chunk at a time (compose.updates_in_chunks)
        n_low = chunk_ranges(parts, shape)[0][1]
    if isinstance(rule, AdamW) and quantized:
        # eager (GPU) path, measured with MemTracker: ~42 B per element of a chunk (dequantized moments, quantizer
        # temporaries, the chunk's direction), plus the whole fp32 direction when a projected tensor is chunked
        chunk = min(n_low, CHUNK_8BIT)
        direction = 42 * chunk + (4 * n_low if n_low > CHUNK_8BIT else 0) + (n_low * e if e != 4 else 0)
    elif isinstance(rule, AdamW):
        direction = n_low * state_e + (n_low * e if state_e != e else 0)
    elif isinstance(rule, (Adafactor, CAME)):
        direction = n_low * (4 + (4 if e != 4 else 0))
    elif isinstance(rule, AdamMini):
        direction = n_low * e
    elif isinstance(rule, Muon):  # Nesterov's mix; Newton-Schulz's two bf16 iterates and three k x k Gram products
        k = min(low) if len(low) == 2 else 1
        direction = n_low * e + 4 * n_low + 6 * k * k
    elif isinstance(rule, SinkGD):  # the fp32 copy it normalizes in place
        direction = 4 * n_low
    else:
        direction = 0
    if quantized and (isinstance(rule, Muon) or (not isinstance(rule, AdamW) and getattr(rule, "beta1", None))):
        # the first moment, dequantized whole to fp32, plus one (de)quantizer chunk's temporaries (measured)
        direction += 4 * n_low + 38 * min(n_low, QUANT_CHUNK)
    if low == shape:
        return direction
    if isinstance(parts.projector, GaussianProjector) and e == 4:
        lifted = 0
    elif type(parts.lift) is Lift and isinstance(parts.projector, _MatrixProjector):  # added a range of rows at a time
        lifted = min(shape[0], rows_added_at_once(shape)) * shape[1] * e
    else:
        lifted = n_full * e
    return direction + n_low * e + lifted


# --- peak of one step
@dataclass
class Estimate:
    """Bytes by category at the step's peak (they sum to ``total``) and the phase where it occurs."""

    weights: int
    gradients: int
    states: int
    activations: int
    logits: int
    temporaries: int
    phase: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.states + self.activations + self.logits + self.temporaries


def linear_ce_loss_bytes(config, tokens: int, dtype: torch.dtype, head_trained: bool = True) -> dict[str, int]:
    """What the loss's backward holds with ``linear_cross_entropy`` (``kernels.model_patch``) instead of the
    logits' three ``tokens x vocab`` fp32 tensors, from reading ``kernels.linear_ce`` (measured exact in fp32):
    ``logits``: one block of fp32 logits; ``head``: the head weight's gradient, made there; ``temporaries``: the
    fp32 hidden gradient, and below fp32 the hidden states' fp32 copy (for the head's gradient: none when the head is
    frozen) and the larger of the block's product in the weights' dtype (beside its fp32 copy) and the block's fp32
    weight rows or their gradient (beside the block)."""
    from .kernels.linear_ce import block_rows

    d, e = Dims.of(config), nbytes(1, dtype)
    rows = min(d.vocab, block_rows(tokens, d.hidden))
    extra = 0 if e == 4 else tokens * d.hidden * 4 * head_trained + max(tokens * rows * e, rows * d.hidden * 4)
    return dict(logits=tokens * rows * 4, head=d.vocab * d.hidden * e * head_trained,
                temporaries=tokens * d.hidden * 4 + extra)


def peak_bytes(model: nn.Module, name: str, batch: int, seq: int, checkpointing: bool = False,
               quantized: bool = False, linear_ce: bool = False, **options) -> Estimate:
    """The peak live bytes of a steady-state training step (forward, backward, ``optimizer.step()``,
    ``zero_grad(set_to_none=True)``) of ``model`` (a meta model) with optimizer ``name``.

    The peak is the largest of the step's phases, each priced by what is live in it (weights and optimizer
    state always):

    * loss backward: all saved activations plus the fp32 log-softmax and its two b x s x vocab fp32 gradients;
    * checkpointing: the last layer recomputed (layer inputs + one layer's activations) with every gradient but
      that layer's and the embedding's;
    * end of backward / ``optimizer.step()``: every gradient plus the largest update's temporaries;
    * layer-wise: the updates run inside backward and free each gradient, so instead: the first update (output
      head) with the activations still saved, one decoder weight's update beside a recomputed layer
      (checkpointing), and the embedding's update at the end (no activations left);
    * ``quantized`` (QLoRA, a LoRA ``model``): frozen linear weights in 4 bits, and a recomputed layer also holds
      one linear weight dequantized to the compute dtype;
    * ``linear_ce`` (``TrainingArguments.linear_cross_entropy``): no log-softmax is saved, and the loss backward
      holds one block of logits and the head's gradient instead (``linear_ce_loss_bytes``);
    * ``offload_states=True`` (an optimizer option): on the device only the states one update brings in (a
      parameter's, or a chunk's of a tensor updated a chunk at a time), the others in CPU memory
      (``optimizer_state_bytes`` gives what the host holds);
    * ``weight_dtype="int8"`` (an optimizer option): the projected linears' weights as int8 codes and block scales
      (``int8_weight_bytes``); forward and backward dequantize one matrix at a time (in the compute dtype), and its
      update works on an fp32 copy of the weight (``int8_update_bytes``).
    """
    from .optim.compose import build_parts
    from .optim.registry import get_spec

    if get_spec(name).zeroth_order:
        return zeroth_order_peak(model, batch, seq, offload=bool(options.get("offload")))
    config = getattr(model, "config", None)
    dtype = next(model.parameters()).dtype
    int8 = _int8_targets(model, name, options)
    optimizer, layerwise, streamed = _priced_optimizer(name, model, **options)
    per_param = _priced_states(optimizer, model)
    states = _device_states(optimizer, model, per_param) if options.get("offload_states") else sum(per_param.values())
    weights = weight_bytes(model, quantized) - sum(p.numel() * p.element_size() - int8_weight_bytes(p.numel())
                                                   for p in int8.values())
    dequantized = max((w.numel() * w.element_size() for w in quantized_linears(model)), default=0) if quantized else 0
    dequantized = max([dequantized] + [p.numel() * p.element_size() for p in int8.values()])
    trainable = {id(p): p for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
    upd = {}  # id -> (grad bytes, temp bytes)
    for group in optimizer.param_groups:
        parts = build_parts(group)
        for p in group["params"]:
            if id(p) in trainable:
                temp = update_temp_bytes(tuple(p.shape), p.dtype, parts)
                temp += int8_update_bytes(p.numel()) if id(p) in int8 else 0
                upd[id(p)] = (p.numel() * p.element_size(), temp)
    grads = sum(g for g, _ in upd.values())
    act = activation_bytes(config, batch, seq, dtype, checkpointing)
    body = act["saved"] - act["logits"]
    emb = _param_id(model.get_input_embeddings())
    head = _param_id(model.get_output_embeddings())
    layer_ids = [i for i in upd if i not in (emb, head)]
    if linear_ce:
        loss = linear_ce_loss_bytes(config, batch * seq, dtype, head_trained=head in upd)
        # streamed, the head's rows go straight to its update: no whole gradient, a block of logits at a time again
        head_grad, rows = _streamed((loss["head"], 0), head in streamed)
        phases = [Estimate(weights, head_grad, states, body, loss["logits"], max(loss["temporaries"], rows),
                           "loss backward")]
    else:
        phases = [Estimate(weights, 0, states, body, 3 * act["logits"], 0, "loss backward")]
    if not layerwise:
        if checkpointing:
            layer_grads = (grads - upd.get(emb, (0, 0))[0]) * (1 - 1 / config.num_hidden_layers)
            phases.append(Estimate(weights, int(layer_grads), states, body + act["layer"], 0,
                                   2 * act["hidden"] + dequantized, "backward, recomputed layer"))
        phases.append(Estimate(weights, grads, states, 0, 0, act["hidden"], "end of backward"))
        phases.append(Estimate(weights, grads, states, 0, 0, max(t for _, t in upd.values()), "optimizer.step()"))
    else:
        if head in upd and head != emb:
            head_grad, head_temp = _streamed(upd[head], head in streamed)
            phases.append(Estimate(weights, head_grad, states, body, 0, head_temp + act["hidden"],
                                   "backward, output head update"))
        if layer_ids:
            g, t = max((upd[i] for i in layer_ids), key=sum)
            extra = act["layer"] if checkpointing else 0
            temps = t + act["hidden"] + (dequantized if int8 else 0)
            phases.append(Estimate(weights, g, states, body + extra, 0, temps, "backward, layer update"))
        if emb in upd:
            emb_grad, emb_temp = _streamed(upd[emb], emb in streamed)
            phases.append(Estimate(weights, emb_grad, states, 0, 0, emb_temp + act["hidden"],
                                   "backward, embedding update"))
    return max(phases, key=lambda est: est.total)


def sharded_peak_bytes(model: nn.Module, name: str, batch: int, seq: int, world: int, linear_ce: bool = False,
                       **options) -> Estimate:
    """The peak live bytes on one of ``world`` GPUs when FSDP2 shards ``model`` (``fully_shard`` per decoder layer,
    then the root) and each GPU takes ``batch`` sequences: the largest of these phases, each priced on the rank that
    holds the most (``ceil(rows / world)`` rows of every weight):

    * the loss backward (as in ``peak_bytes``, ``linear_ce`` too), beside the root's and the last layer's weights;
    * a decoder layer's reduce-scatter, for each position in backward: the sharded weights, the root's weights
      (embedding, final norm, head: gathered from forward to the end of backward), this layer gathered and the next
      one prefetched (or this one's all-gather buffer, which FSDP2 holds there in some runs and not in others: it is
      counted); the head's gradient (reduced with the root's at the end), this layer's gradients and the
      reduce-scatter's copy of them, and the layers reduced before it at 1/world; the activations still saved;
    * ``optimizer.step()``: sharded weights and gradients, and the largest update's temporaries (an SVD refresh
      gathers the whole gradient);
    * layer-wise names update each shard after its reduce-scatter, so no reduced gradient accumulates.

    The per-rank optimizer state is exact (``optimizer_state_bytes(world=...)``); the rest was measured with torch's
    ``FSDPMemTracker`` on CPU at 2 ranks (``benchmarks/bench_fsdp.py``: within 2.1% for every name on an 8-layer
    model; runs that do not hold the all-gather buffer sit one layer lower). No checkpointing, LoRA or offload here."""
    from .optim.compose import build_parts
    from .optim.registry import get_spec

    if get_spec(name).zeroth_order:
        raise ValueError(f"{name!r} runs in one process: it has no sharded plan")
    optimizer, layerwise, _ = _priced_optimizer(name, model, **options)
    states = sum(_priced_states(optimizer, model, world).values())
    config = model.config
    dtype = next(model.parameters()).dtype
    layers = _decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    local = sum(_local_bytes(p, world) for p in model.parameters())
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_layers)
    layer = max(sum(p.numel() * p.element_size() for p in each.parameters()) for each in layers)
    layer_local = max(sum(_local_bytes(p, world) for p in each.parameters()) for each in layers)
    head = model.get_output_embeddings()
    head_grad = sum(p.numel() * p.element_size() for p in head.parameters() if p.requires_grad) if head else 0
    act = activation_bytes(config, batch, seq, dtype)
    top = act["saved"] - act["logits"] - act["layer"] * len(layers)
    body = act["saved"] - act["logits"]
    if linear_ce:
        loss = linear_ce_loss_bytes(config, batch * seq, dtype, head_trained=head_grad > 0)
        phases = [Estimate(local + root + layer, loss["head"], states, body, loss["logits"], loss["temporaries"],
                           "loss backward")]
    else:
        phases = [Estimate(local + root + layer, 0, states, body, 3 * act["logits"], 0, "loss backward")]
    for k in range(1, len(layers) + 1):  # the k-th layer backward reaches
        reduced = 0 if layerwise else (k - 1) * layer_local
        gathered = 2 * layer  # this layer, and the next one prefetched or this one's all-gather buffer still held
        phases.append(Estimate(local + root + gathered, head_grad + 2 * layer + reduced, states,
                               top + act["layer"] * (len(layers) - k), 0, 0,
                               f"backward, reduce-scatter of layer {len(layers) - k}"))
    if not layerwise:
        temps = max(update_temp_bytes(tuple(p.shape), p.dtype, build_parts(g)) for g in optimizer.param_groups
                    for p in g["params"] if p.requires_grad)
        grads = sum(_local_bytes(p, world) for p in model.parameters() if p.requires_grad)
        phases.append(Estimate(local, grads, states, 0, 0, temps, "optimizer.step()"))
    return max(phases, key=lambda est: est.total)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers FSDP2 wraps one by one: the longest ``nn.ModuleList`` of the model."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("no decoder layers (an nn.ModuleList) to shard one by one")
    return list(max(lists, key=len))


def _local_bytes(p: torch.Tensor, world: int) -> int:
    """Bytes of the largest dim-0 shard of ``p`` over ``world`` ranks."""
    return (_shard_numel(tuple(p.shape), world) if p.dim() else p.numel()) * p.element_size()


def _shard_numel(shape: tuple, world: int) -> int:
    """Elements of the largest dim-0 shard of a tensor of ``shape`` over ``world`` ranks (torch's chunks: rank 0
    holds ``ceil(rows / world)`` rows)."""
    return -(-shape[0] // world) * math.prod(shape[1:])


def zeroth_order_peak(model: nn.Module, batch: int, seq: int, offload: bool = False) -> Estimate:
    """MeZO's peak: the peak of inference on the same batch (measured within 0.1%, ``tests/test_zo.py``), i.e. the
    weights and the largest of: the loss over the logits (the logits, their fp32 copy and the fp32 log-softmax),
    one decoder layer's transient activations, and the head's output beside one block of noise
    (``perturb.Z_BLOCK``) and its perturbed rows.
    ``offload``: weights outside the decoder blocks and three blocks on the device, the batch taken twice (the dual
    forward)."""
    from .offload import find_decoder_layers
    from .optim.perturb import Z_BLOCK

    dtype = next(model.parameters()).dtype
    copies = 2 if offload else 1  # the dual forward takes the batch twice
    e, tokens = nbytes(1, dtype), copies * batch * seq
    weights = weight_bytes(model)
    if offload:
        blocks = [sum(p.numel() * p.element_size() for p in layer.parameters())
                  for layer in find_decoder_layers(model)[1]]
        weights += 3 * max(blocks) - sum(blocks)
    d = Dims.of(model.config)
    logits = tokens * d.vocab * (e + 4 + (4 if e != 4 else 0))
    layer = activation_bytes(model.config, copies * batch, seq, dtype)["layer"]
    scratch = Z_BLOCK * (4 + e)
    phases = [Estimate(weights, 0, 0, 0, logits, 0, "forward, loss"),
              Estimate(weights, 0, 0, layer, 0, scratch, "forward, decoder layer"),
              Estimate(weights, 0, 0, 0, tokens * d.vocab * e, scratch, "forward, perturbed head")]
    return max(phases, key=lambda est: est.total)


def _param_id(module) -> int | None:
    weight = getattr(module, "weight", None)
    return id(weight) if weight is not None and weight.requires_grad else None


# --- measurement
def measure_peak(config, name: str, batch: int, seq: int, checkpointing: bool = False,
                 dtype: torch.dtype = torch.float32, steps: int = 2, lora: dict | None = None,
                 quantized: bool = False, linear_ce: bool = False, **options) -> dict:
    """Run ``steps`` real training steps on CPU (random weights and tokens) under ``MemTracker`` and return the
    last (steady) step's peak live bytes by MemTracker category plus ``Total`` and ``state_bytes`` (the optimizer's
    own count). ``lora``: peft ``LoraConfig`` fields; ``quantized``: the base loaded in 4 bits first (QLoRA; the
    quantization constants, which MemTracker does not see, are ``QuantConstants``, added to ``Total``);
    ``linear_ce``: the model's loss patched to skip the logits (``kernels.model_patch``). For validating
    ``peak_bytes``; use models up to ~100M parameters."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from . import create_optimizer

    warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
    torch.manual_seed(0)
    model = _real_model(load_config(config), dtype, quantized)
    if lora:
        model = _peft(model, lora)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if linear_ce:
        from .kernels.model_patch import patch_linear_cross_entropy

        patch_linear_cross_entropy(model)
    model.config.use_cache = False
    model.train()
    optimizer = create_optimizer(name, model, **options)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        with tracker:
            tracker.reset_mod_stats()
            for p in frozen:  # MemTracker would hook their gradients, which a frozen weight cannot have
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
            tokens = torch.randint(model.config.vocab_size, (batch, seq), generator=gen)
            checked_step(model, optimizer, tokens, f"{name} (a measurement of a broken step)")
    peak = _peak_by_category(tracker)
    peak["QuantConstants"] = _quant_state_bytes(model)
    peak["Total"] += peak["QuantConstants"]
    return {**peak, "state_bytes": optimizer.state_bytes()}


def measure_sharded_peak(model: nn.Module, optimizer, tokens: list[torch.Tensor]) -> dict:
    """This rank's peak live bytes by torch's ``FSDPMemTracker`` category over the last of the training steps on
    ``tokens`` (a list of id batches; use two or more: the tracker's first step counts buffers it first sees), for an
    FSDP2-sharded ``model``. For validating ``sharded_peak_bytes``."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
    tracker = FSDPMemTracker(model, optimizer)
    for ids in tokens:
        with tracker:
            tracker.reset_mod_stats()
            checked_step(model, optimizer, ids, "a sharded step (a measurement of a broken step)")
    return _peak_by_category(tracker)


def _peak_by_category(tracker) -> dict:
    """A MemTracker's (or FSDPMemTracker's) peak bytes by category name, summed over devices."""
    peak = {}
    for snapshot in tracker.get_tracker_snapshot("peak").values():
        for key, value in snapshot.items():
            peak[getattr(key, "value", key)] = peak.get(getattr(key, "value", key), 0) + value
    return peak


def checked_step(model: nn.Module, optimizer, tokens: torch.Tensor, what: str) -> torch.Tensor:
    """One causal-LM training step on ``tokens``; ``FloatingPointError`` naming ``what`` if the loss is not
    finite (a benchmark must fail loudly rather than measure a broken run)."""
    loss = model(input_ids=tokens, labels=tokens).loss
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: the loss is {loss.item()}")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def forward_peak_bytes(model: nn.Module, run, steps: int = 2) -> int:
    """Peak live tensor bytes (``MemTracker``, every category) of the last of ``steps`` calls of ``run(fresh)``.
    ``run`` passes each closure that calls the model through ``fresh``, which clears MemTracker's per-module stats
    first, so one step may run the model several times (MeZO's two perturbed forwards)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
    tracker = MemTracker()
    tracker.track_external(model)

    def fresh(fn):
        def call():
            tracker.reset_mod_stats()
            return fn()
        return call
    for _ in range(steps):
        with tracker:
            tracker.reset_mod_stats()
            run(fresh)
    return sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())


class _NoHook:
    def remove(self) -> None:
        pass


def _real_model(config, dtype: torch.dtype, quantized: bool) -> nn.Module:
    """A randomly initialised causal LM; ``quantized``: reloaded through bitsandbytes' 4-bit loader (nf4, double
    quantization), as a QLoRA recipe loads its base."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from .train import reload_quantized

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if not quantized:
        return model
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return reload_quantized(model, four_bit, dtype)


def _quant_state_bytes(model: nn.Module) -> int:
    """Bytes of the 4-bit weights' quantization constants (absmax, nested absmax, code tables)."""
    tensors = {}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            for value in state.as_dict().values():
                if isinstance(value, torch.Tensor):
                    tensors[value.data_ptr()] = value.nbytes
    return sum(tensors.values())


# --- the plan
#: (optimizer, gradient checkpointing, adapters) rows ``plan`` prices by default; adapters: None (every weight
#: trains), "lora" or "qlora" (LoRA on 4-bit base weights).
DEFAULT_MODES = [(name, ckpt, None) for name in (
    "adamw", "adamw_8bit", "adam_mini", "came_8bit", "galore_adamw", "galore_adamw_8bit",
    "galore_adamw_8bit_layerwise", "apollo_mini", "apollo_mini_layerwise", "muon", "muon_8bit_layerwise",
    "sinkgd_layerwise") for ckpt in (False, True)]
DEFAULT_MODES += [("adamw", ckpt, adapters) for adapters in ("lora", "qlora") for ckpt in (False, True)]
#: Zeroth-order rows (recommended only when nothing with gradients fits): MeZO, and MeZO with the blocks offloaded.
DEFAULT_MODES += [("mezo", False, None), ("mezo", False, "offload")]
#: LoRA rows: peft ``LoraConfig`` fields.
LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])
ADAPTER_LABELS = {None: "", "lora": " + LoRA", "qlora": " + QLoRA", "offload": " + offload (blocks in RAM)"}


@dataclass
class Row:
    """One optimizer / mode of a plan."""

    optimizer: str
    checkpointing: bool
    adapters: str | None
    estimate: Estimate
    fits: bool = False
    notes: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.optimizer + ADAPTER_LABELS[self.adapters] + (" + ckpt" if self.checkpointing else "")


def plan(model, seq_len: int, batch_size: int, card_gib: float, weights_dtype: str = "fp32",
         modes=None, linear_ce: bool = False, gpus: int = 1, **options) -> list[Row]:
    """Price every (optimizer, checkpointing, adapters) mode for ``model`` (hub id, model dir, config JSON or dict)
    at ``batch_size`` x ``seq_len`` tokens; ``fits``: the peak is within ``card_gib`` GiB. Unsupported modes (say,
    Adam-mini without head counts) get a note and are left out. ``linear_ce``: the loss without logits (gradient
    modes; MeZO refuses it). ``gpus`` > 1: the peak per GPU when FSDP2 shards the model over that many, each taking
    ``batch_size`` sequences (``sharded_peak_bytes``: full-parameter modes without checkpointing). ``options`` go to
    every mode's optimizer; with ``weight_dtype="int8"`` or ``dense_rule`` only the low-rank full-parameter modes are
    priced."""
    from .optim.registry import get_spec

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[weights_dtype]
    if options.get("weight_dtype") and gpus > 1:
        raise ValueError("int8 weights are not sharded by FSDP2 yet: plan them on one GPU (drop --gpus)")
    config = load_config(model)
    if gpus > 1:
        return _sharded_plan(config, dtype, seq_len, batch_size, card_gib, gpus, modes, linear_ce, **options)
    rows, metas = [], {}
    for name, ckpt, adapters in modes or DEFAULT_MODES:
        if (options.get("weight_dtype") or options.get("dense_rule")) and (adapters or not get_spec(name).low_rank):
            continue  # int8 weights / the rule of what is not projected: full-parameter, low-rank names only
        if options.get("offload_states") and get_spec(name).zeroth_order:
            continue  # MeZO keeps no states
        lora = adapters in ("lora", "qlora")
        if lora not in metas:  # one meta model per kind: building a 7B one takes about a second
            metas[lora] = meta_model(config, dtype, LORA if lora else None)
        try:
            extra = {"offload": "ram"} if adapters == "offload" else {}
            est = peak_bytes(metas[lora], name, batch_size, seq_len, ckpt, quantized=adapters == "qlora",
                             linear_ce=linear_ce, **options, **extra)
        except ValueError as err:
            rows.append(Row(name, ckpt, adapters, Estimate(0, 0, 0, 0, 0, 0, "-"), notes=[str(err)[:120]]))
            continue
        rows.append(Row(name, ckpt, adapters, est, est.total <= card_gib * GIB))
    return rows


def _sharded_plan(config, dtype, seq_len: int, batch_size: int, card_gib: float, gpus: int, modes,
                  linear_ce: bool, **options) -> list[Row]:
    """``plan`` over ``gpus`` FSDP2 ranks: the full-parameter, gradient-based modes of ``modes``."""
    from .optim.registry import get_spec

    model = meta_model(config, dtype)
    rows = []
    for name, ckpt, adapters in modes or DEFAULT_MODES:
        if ckpt or adapters or get_spec(name).zeroth_order:
            continue
        est = sharded_peak_bytes(model, name, batch_size, seq_len, gpus, linear_ce=linear_ce, **options)
        rows.append(Row(name, False, None, est, est.total <= card_gib * GIB))
    return rows


def recommend(rows: list[Row]) -> Row | None:
    """The row to use: the full-parameter row that fits with the most headroom among the rows nearest to AdamW
    (fewest approximations: no LoRA, no projection if it fits), i.e. the first fitting row in ``DEFAULT_MODES``
    order, preferring no checkpointing (faster); LoRA only when no full-parameter row fits, QLoRA after LoRA."""
    fitting = [r for r in rows if r.fits and not r.notes]
    for adapters, zeroth_order in ((None, False), ("lora", False), ("qlora", False), (None, True), ("offload", True)):
        pool = [r for r in fitting if r.adapters == adapters and (r.optimizer == "mezo") == zeroth_order]
        if pool:
            return min(pool, key=lambda r: (r.checkpointing, rows.index(r)))
    return None


#: A bundled recipe's model size, from its name: ``finetune-llama-3.2-1b-...`` is 1e9 parameters, ``...-60m-...`` 6e7.
_RECIPE_SIZE = re.compile(r"-(\d+(?:\.\d+)?)([mb])(?=-)")
#: Recipes for a model this many times larger or smaller count as the same size.
SAME_SIZE = 2.0
#: The placeholder the command names the weights by when the plan was made from a config JSON.
MODEL_PLACEHOLDER = "MODEL"


def parameter_count(config) -> int:
    """The parameters of ``config``'s causal LM (built on the ``meta`` device)."""
    return sum(p.numel() for p in meta_model(config).parameters())


def recipe_size(stem: str, values: dict) -> float | None:
    """Parameters of a recipe's model: from its name, else from an inline ``model_config`` (cpu-tiny)."""
    match = _RECIPE_SIZE.search(stem)
    if match:
        return float(match.group(1)) * {"m": 1e6, "b": 1e9}[match.group(2)]
    if isinstance(values.get("model_config"), dict):
        return float(parameter_count(load_config(values["model_config"])))
    return None


def recipe_command(row: Row, model, seq_len: int, batch_size: int, bf16: bool, linear_ce: bool = False,
                   config=None, optim_options: dict | None = None) -> str:
    """The ``lowmem train`` command for ``row``: the bundled recipe nearest to it, by its bundled name (it runs from
    any folder), with the keys that differ overridden. Nearest: pretraining for a full-parameter gradient row on a
    config JSON, else fine-tuning; then, given ``config``, a recipe for a model of the same size (its parameters
    within a factor ``SAME_SIZE`` of the size in the recipe's name); then the same optimizer and adapters; then no
    options of another optimizer to clear; then the same model family; then the closest size.

    A recipe for another optimizer runs with ``optim=`` and ``optim_args=`` (its options were written for its own
    optimizer; the plan priced the new one's defaults). ``linear_ce``: the row was planned with the loss without
    logits, so a recipe without it gets it (MeZO does not take it). ``optim_options``: the optimizer options the
    row was planned with (``weight_dtype``, ``offload_states``), added to the recipe's ``optim_args``. An adapter or
    MeZO row planned from a config JSON names the weights ``MODEL``, a placeholder the command explains (the config
    says nothing of them)."""
    import shlex

    from .recipe import RECIPES_DIR, MethodArguments, read_values

    if isinstance(model, dict):
        return ""  # an inline config has no name a recipe could take
    # a full-parameter gradient row on a config JSON: pretraining; MeZO fine-tunes (it does not train from scratch)
    from_config = row.adapters is None and row.optimizer != "mezo" and str(model).endswith(".json")
    source = str(model) if not str(model).endswith(".json") else MODEL_PLACEHOLDER
    params = parameter_count(config) if config is not None else None
    family = re.sub(r"\d+$", "", config.model_type) if config is not None else None  # qwen2 -> qwen
    wanted = {"optim": row.optimizer, "finetuning_type": "lora" if row.adapters in ("lora", "qlora") else "full",
              "quantization_bit": 4 if row.adapters == "qlora" else None}
    candidates = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        values = read_values(path)
        if ("model_config" in values) != from_config:
            continue
        values.setdefault("finetuning_type", "full")
        size = recipe_size(path.stem, values) if params else None
        distance = abs(math.log(size / params)) if size else (math.inf if params else 0.0)
        same_size = distance <= math.log(SAME_SIZE)
        offloads = "offload" in str(values.get("optim_args"))
        score = (not same_size,
                 sum(values.get(k) != v for k, v in wanted.items()) + (offloads != (row.adapters == "offload")),
                 values.get("optim") != row.optimizer and bool(values.get("optim_args")),
                 values.get("model_name_or_path") != source,
                 bool(family) and family not in path.stem,
                 distance,
                 path.stem == "cpu-tiny")  # the CPU demo only when nothing else is as near
        candidates.append((score, path, values))
    if not candidates:
        return ""
    _, path, values = min(candidates, key=lambda c: c[0])
    overrides = {**wanted, **({"optim_args": None} if values.get("optim") != row.optimizer else {}),
                 ("model_config" if from_config else "model_name_or_path"): str(model) if from_config
                 else source, "cutoff_len": seq_len, "per_device_train_batch_size": batch_size,
                 "gradient_checkpointing": row.checkpointing, "pure_bf16": bf16}
    if optim_options:  # the recipe's own options for this optimizer, and those the plan priced (int8 weights, ...)
        own = values.get("optim_args") if values.get("optim") == row.optimizer else None
        overrides["optim_args"] = {**own, **optim_options} if isinstance(own, dict) else \
            ", ".join(filter(None, [own, *(f"{k}={_yaml_value(v)}" for k, v in optim_options.items())]))
    if row.adapters in ("lora", "qlora"):  # the adapters the plan priced
        overrides.update(lora_rank=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_target="all")
    if linear_ce and row.optimizer != "mezo":  # planned without the logits: run so (planned with them: either fits)
        overrides["linear_cross_entropy"] = True
    elif row.optimizer == "mezo" and values.get("linear_cross_entropy"):  # MeZO refuses it
        overrides["linear_cross_entropy"] = False
    defaults = {f.name: f.default for f in dataclass_fields(MethodArguments)}
    changed = [shlex.quote(f"{k}={_yaml_value(v)}") for k, v in overrides.items()
               if values.get(k, defaults.get(k, False if isinstance(v, bool) else None)) != v]
    command = " ".join(["lowmem train", path.stem, *changed])
    if f"={MODEL_PLACEHOLDER}" in command:
        command += f"   ({MODEL_PLACEHOLDER}: the hub id or directory of the weights)"
    return command


def _yaml_value(value) -> str:
    """``value`` as a ``key=value`` override writes it (nothing for None: ``optim_args=`` clears the options)."""
    import yaml

    return "" if value is None else yaml.safe_dump(value).splitlines()[0]


def format_plan(rows: list[Row], card_gib: float | None = None, command: str = "") -> str:
    """The plan as a text table (GiB) plus the recommended optimizer string and ``command`` (the recipe to run)."""
    head = f"{'optimizer / mode':42} {'weights':>8} {'grads':>8} {'states':>8} {'activ.':>8} {'logits':>8} " \
           f"{'temps':>8} {'peak':>8}  fits  peak during"
    units = f"{'':42}" + f" {'GiB':>8}" * 7
    lines = [head, units, "-" * len(head)]
    for r in rows:
        e = r.estimate
        cells = [e.weights, e.gradients, e.states, e.activations, e.logits, e.temporaries, e.total]
        if r.notes:
            lines.append(f"{r.label:42} n/a: {r.notes[0]}")
            continue
        lines.append(f"{r.label:42} " + " ".join(f"{c / GIB:8.2f}" for c in cells)
                     + f"  {'yes ' if r.fits else 'no  '}  {e.phase}")
    best = recommend(rows)
    card = f" on a {card_gib:g} GiB card" if card_gib else ""
    if best is None:
        lines.append(f"\nNothing fits{card}: lower the batch size or sequence length.")
    else:
        flags = (" with gradient checkpointing" if best.checkpointing else "") + \
                {None: "", "lora": " on LoRA", "qlora": " on QLoRA (4-bit base)"}[best.adapters]
        peak = best.estimate.total / GIB
        lines.append(f"\nRecommended{card}: optimizer {best.optimizer!r}{flags} (peak {peak:.2f} GiB).")
        if command:
            lines.append(f"Run it: {command}")
    return "\n".join(lines)
