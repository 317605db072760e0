"""Compile every Triton kernel of lowmem for real NVIDIA targets (sm_80 and sm_90) without a GPU.

The interpreter runs a kernel's numpy semantics; it does not type-check the kernel for the compiler, lower it or
run ptxas. This does (Triton's bundled LLVM and ptxas), so a kernel that passes the interpreter tests but would not
compile on a GPU fails here. Run by ``tests/test_kernel_compile.py`` in a process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels this compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowmem.kernels import _probe_triton as probe  # noqa: E402
from lowmem.kernels import blockwise_8bit_triton as b8  # noqa: E402
from lowmem.kernels import int8_weights_triton as i8  # noqa: E402
from lowmem.kernels import linear_ce_triton as ce  # noqa: E402
from lowmem.kernels import zo_noise_triton as zo  # noqa: E402

ARCHES = (80, 90)
FLOATS = ("fp32", "bf16", "fp16")


def _adamw_signature(dtype: str) -> dict:
    pointers = dict(p_ptr=f"*{dtype}", g_ptr=f"*{dtype}", out_ptr="*fp32", m_ptr="*u8", m_absmax_ptr="*fp32",
                    v_ptr="*u8", v_absmax_ptr="*fp32", signed_code_ptr="*fp32", unsigned_code_ptr="*fp32",
                    signed_bounds_ptr="*fp32", unsigned_bounds_ptr="*fp32")
    scalars = dict.fromkeys(("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "bias_div", "step_size",
                             "decay"), "fp32")
    return {**pointers, "n": "i32", "n_blocks": "i32", **scalars, "round_seed": "i64"}


def checks():
    """(name, kernel, signature, constexprs) for every kernel and each variant its callers launch."""
    yield ("dispatch probe", probe._add_one, dict(x_ptr="*fp32"), {})
    group = dict(GROUP=4, QBLOCK=b8.QBLOCK, TINY=b8.TINY)
    for dtype in FLOATS:
        yield (f"quantize {dtype}", b8.quantize_kernel,
               dict(x_ptr=f"*{dtype}", codes_ptr="*u8", absmax_ptr="*fp32", bounds_ptr="*fp32", n="i32",
                    n_blocks="i32"), group)
    yield ("dequantize", b8.dequantize_kernel,
           dict(codes_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32", out_ptr="*fp32", n="i32", n_blocks="i32"),
           dict(GROUP=4, QBLOCK=b8.QBLOCK))
    for dtype in FLOATS:
        for update, after, rounding in ((True, True, False), (True, False, False), (False, True, False)):
            yield (f"adamw_8bit {dtype} update={update} decay_after={after}", b8.adamw_8bit_kernel,
                   _adamw_signature(dtype), dict(UPDATE_PARAM=update, DECAY_AFTER=after, ROUND_BF16=rounding, **group))
    yield ("adamw_8bit bf16 stochastic rounding", b8.adamw_8bit_kernel, _adamw_signature("bf16"),
           dict(UPDATE_PARAM=True, DECAY_AFTER=True, ROUND_BF16=True, **group))
    for dtype in FLOATS:
        for two in (False, True):
            yield (f"zo perturbed {dtype} two={two}", zo._perturbed_kernel,
                   dict(w_ptr=f"*{dtype}", out_a_ptr=f"*{dtype}", out_b_ptr=f"*{dtype}", n="i64", seed="i64",
                        offset="i64", scale_a="fp32", scale_b="fp32"), dict(TWO=two, BLOCK=1024))
        rounding = {"fp32": zo.ROUND_NONE, "bf16": zo.ROUND_BF16, "fp16": zo.ROUND_FP16}[dtype]
        yield (f"zo update {dtype}", zo._update_kernel,
               dict(w_ptr=f"*{dtype}", seed0="i64", coef0="fp32", seeds_ptr="*i64", coefs_ptr="*fp32", n_more="i32",
                    decay="fp32", n="i64", round_seed="i64", offset="i64"), dict(ROUND=rounding, BLOCK=1024))
    rows = dict(logits_ptr="*fp32", stride="i32", tokens="i32", width="i32", start="i32", labels_ptr="*i64",
                ignore_index="i32", lse_ptr="*fp32")
    for tiling in ((1, 4096), (8, 512), (32, 128)):  # a wide block; ragged last blocks get narrower tiles
        constexprs = dict(ROWS=tiling[0], BLOCK=tiling[1])
        yield (f"linear_ce merge_lse {tiling}", ce._merge_lse_kernel, {**rows, "target_ptr": "*fp32"}, constexprs)
        yield (f"linear_ce softmax_grad {tiling}", ce._softmax_grad_kernel, {**rows, "share_ptr": "*fp32"},
               constexprs)
    for dtype in FLOATS:
        yield (f"int8 weights dequantize to {dtype}", i8.dequantize_kernel,
               dict(codes_ptr="*i8", scales_ptr="*fp32", out_ptr=f"*{dtype}", n="i64"), dict(QBLOCK=256, BLOCK=1024))


def main() -> int:
    failures = []
    count = 0
    for name, kernel, signature, constexprs in checks():
        full = {**signature, **dict.fromkeys(constexprs, "constexpr")}
        for arch in ARCHES:
            count += 1
            try:
                triton.compile(ASTSource(fn=kernel, signature=full, constexprs=constexprs),
                               target=GPUTarget("cuda", arch, 32))
            except Exception as err:  # report every failure, not only the first
                failures.append(f"{name} sm_{arch}: {type(err).__name__}: {str(err)[:2000]}")
    for failure in failures:
        print(failure)
    print(f"{count - len(failures)} of {count} kernel variants compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
