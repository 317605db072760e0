"""int8 weights (``weight_dtype="int8"``, Q-GaLore / Q-APOLLO style): the projected linear layers keep their weights
as int8 codes with one fp32 scale per block of 256 (``kernels.int8_weights``), 1.016 bytes per weight instead of 2.

* ``Int8Linear``: a linear layer over such a weight. Forward and backward dequantize the matrix they need (a Triton
  kernel on CUDA, its torch twin elsewhere) and drop it again, so one matrix at a time exists in float. Its
  ``weight`` is a stand-in parameter of the float shape and dtype over a single element (stride 0): autograd gives it
  the ordinary float gradient, so gradient accumulation, clipping, hooks and the layer-wise updates work unchanged,
  and the optimizer's projectors see an m x n weight. ``state_dict`` holds ``weight_codes`` and ``weight_scales``
  (never the stand-in); loading a float ``weight`` into it quantizes that.
* The optimizer (``LowMemOptimizer.update_param``) runs its ordinary update on the fp32 weight and stores it back
  with **stochastic rounding** onto the int8 grid, unbiased (``E[stored] = updated``), so updates far below one code
  step survive on average; the rounding bits come from a generator keyed by the parameter's place and step
  (``fused.round_seed``), so a resumed run rounds the same way. The update is recorded on a ``RecordedUpdate`` and
  replayed a piece of the weight at a time (``Int8Linear.update_``): the fp32 weight never exists whole.
* ``quantize_linears(model, targets)`` converts the target linears in place (what ``create_optimizer(...,
  weight_dtype="int8")`` and lowmem's Trainer do); ``dequantize_linears(model, dtype)`` turns them back into
  ``nn.Linear`` for use, e.g. before ``save_pretrained``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import int8_weights as codes_int8
from .targets import split_parameters


class _Int8LinearFunction(torch.autograd.Function):
    """``F.linear(x, dequantize(codes, scales), bias)``, saving the codes (not a float weight) for backward; the
    gradient of ``weight`` (the stand-in) is the float weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, codes, scales, bias, block):
        ctx.save_for_backward(x, codes, scales)
        ctx.block, ctx.weight_dtype = block, weight.dtype
        return F.linear(x, codes_int8.dequantize(codes, scales, x.dtype, block), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, scales = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ codes_int8.dequantize(codes, scales, grad_out.dtype, ctx.block)
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = (rows.t() @ x.reshape(-1, x.shape[-1]).to(rows.dtype)).to(ctx.weight_dtype)
        if ctx.needs_input_grad[4]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, None, None, grad_bias, None


def _stand_in(like: torch.Tensor, shape) -> nn.Parameter:
    """A parameter of ``shape`` over one element of ``like``'s dtype and device (stride 0: no storage to speak of)."""
    return nn.Parameter(torch.zeros(1, dtype=like.dtype, device=like.device).expand(*shape))


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 codes and block scales; see the module docstring."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bias: nn.Parameter | None, dtype: torch.dtype,
                 block: int = codes_int8.BLOCK):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.block = block
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scales", scales)
        self.weight = _stand_in(torch.empty(0, dtype=dtype, device=codes.device), codes.shape)
        self.bias = bias
        self.weight.int8_linear = self  # how the optimizer finds the codes behind the stand-in

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = codes_int8.BLOCK) -> Int8Linear:
        codes, scales = codes_int8.quantize(linear.weight, block)
        layer = cls(codes, scales, linear.bias, linear.weight.dtype, block)
        layer.weight.requires_grad_(linear.weight.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Int8LinearFunction.apply(x, self.weight, self.weight_codes, self.weight_scales, self.bias, self.block)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a float tensor (``dtype``: the stand-in's by default)."""
        return codes_int8.dequantize(self.weight_codes, self.weight_scales, dtype or self.weight.dtype, self.block)

    def store_(self, values: torch.Tensor, seed: int) -> None:
        """Store updated fp32 ``values`` with stochastic rounding, the bits from generator seed ``seed``."""
        generator = torch.Generator(device=self.weight_codes.device).manual_seed(seed)
        codes_int8.requantize_(self.weight_codes, self.weight_scales, values, generator, self.block)

    def update_(self, apply, seed: int) -> None:
        """``store_`` of the fp32 weight changed in place by the elementwise ``apply(values, start, end)``, a piece
        of flat elements ``[start, end)`` at a time (the same bits as whole)."""
        generator = torch.Generator(device=self.weight_codes.device).manual_seed(seed)
        codes_int8.update_(self.weight_codes, self.weight_scales, apply, generator, self.block)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` with the dequantized weight (and this layer's bias)."""
        dtype = dtype or self.weight.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantized(dtype), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"int8 codes, blocks of {self.block}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)  # the stand-in is not a weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        stand_in = self._parameters.pop("weight")
        float_weight = state_dict.get(prefix + "weight")
        try:
            if float_weight is not None and prefix + "weight_codes" not in state_dict:  # a float checkpoint
                state_dict = dict(state_dict)
                codes, scales = codes_int8.quantize(state_dict.pop(prefix + "weight"), self.block)
                state_dict[prefix + "weight_codes"], state_dict[prefix + "weight_scales"] = codes, scales
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._parameters["weight"] = stand_in

    def _apply(self, fn, recurse=True):
        """``module.to(...)``: codes and scales move (the scales stay fp32), the stand-in stays one element."""
        stand_in, scales = self._parameters.pop("weight"), self._buffers.pop("weight_scales")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = stand_in
            self._buffers["weight_scales"] = scales
        moved = fn(stand_in.detach().as_strided((1,), (1,)))
        stand_in.data = moved.expand(stand_in.shape)
        if stand_in.grad is not None:
            stand_in.grad = fn(stand_in.grad)
        self._buffers["weight_scales"] = scales.to(device=self.weight_codes.device)
        return self


class RecordedUpdate:
    """Stands in for an int8 weight's fp32 values while the optimizer computes its update: the in-place elementwise
    ops the update applies to the weight (``mul_``, ``add_``, ``addcmul_``, what the rules and lifts use) are
    recorded, then ``replay`` applies them to a piece of the weight (``Int8Linear.update_``). The fp32 weight, and
    the fp32 copy a CPU makes of a bf16 update it adds, then never exist whole. A rule that reads the weight's values
    (``Rule.reads_weight``) needs the whole weight instead."""

    dtype = torch.float32

    def __init__(self, like: torch.Tensor):
        self.shape, self.device = like.shape, like.device
        self.ops: list[tuple[str, tuple, dict]] = []

    def mul_(self, other):
        self.ops.append(("mul_", (other,), {}))
        return self

    def add_(self, other, *, alpha=1):
        self.ops.append(("add_", (other,), {"alpha": alpha}))
        return self

    def addcmul_(self, tensor1, tensor2, *, value=1):
        self.ops.append(("addcmul_", (tensor1, tensor2), {"value": value}))
        return self

    def replay(self, values: torch.Tensor, start: int, end: int) -> None:
        """Apply the recorded ops to ``values``, the weight's flat elements ``[start, end)``, in place."""
        for name, operands, kwargs in self.ops:
            pieces = [values if t is self else self._piece(t, start, end) for t in operands]
            getattr(values, name)(*pieces, **kwargs)

    def _piece(self, operand, start: int, end: int):
        """The flat elements ``[start, end)`` of ``operand`` broadcast to the weight's shape: a view of a contiguous
        full-size operand, else a copy of only the rows the range touches."""
        if not torch.is_tensor(operand) or operand.dim() == 0:
            return operand
        row = self.shape[-1]
        first, last = start // row, -(-end // row)
        rows = operand.broadcast_to(self.shape)[first:last].reshape(-1)
        return rows[start - first * row:end - first * row]


def int8_linear_of(p: torch.Tensor) -> Int8Linear | None:
    """The ``Int8Linear`` whose stand-in ``p`` is, else None."""
    return getattr(p, "int8_linear", None)


def quantize_linears(model: nn.Module, target_modules=None, block: int = codes_int8.BLOCK) -> int:
    """Replace ``model``'s projection targets (``targets.split_parameters``: attention and MLP linears by default)
    by ``Int8Linear`` in place; the number converted (targets already int8 are left as they are)."""
    names = {name.rsplit(".", 1)[0] for name, p in split_parameters(model, target_modules).targets
             if int8_linear_of(p) is None}
    converted = 0
    for name in sorted(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if linear.weight.is_meta or linear.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"weight_dtype='int8' converts float linear weights; '{name}' holds "
                             f"{linear.weight.dtype} {'on the meta device' if linear.weight.is_meta else ''}")
        setattr(parent, child, Int8Linear.from_linear(linear, block))
        converted += 1
    return converted


def dequantize_linears(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every ``Int8Linear`` in ``model`` by an ``nn.Linear`` with its dequantized weight (in ``dtype``,
    default the layer's float dtype); the number converted. The model is then an ordinary float model."""
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, Int8Linear)]
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.to_linear(dtype))
    return len(layers)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters as stored: an int8 layer's codes and scales instead of its stand-in."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    stand_ins = {id(m.weight) for m in layers}
    tensors = [p for p in model.parameters() if id(p) not in stand_ins]
    tensors += [t for m in layers for t in (m.weight_codes, m.weight_scales)]
    return sum(t.numel() * t.element_size() for t in tensors)
