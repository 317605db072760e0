"""The Triton kernels on a GPU: speed and memory against the libraries users would otherwise run.

1. Fused 8-bit AdamW: one optimizer step on one weight (default 8192 x 8192, fp32 and bf16), lowmem's ``adamw_8bit``
   (the fused kernel) against bitsandbytes' ``AdamW8bit`` and torchao's ``AdamW8bit`` (all blockwise 8-bit moments,
   block 256), and the kernel alone. Effective bandwidth = the bytes one fused pass must move (read and write the
   weight and both moments' codes and block maxima, read the gradient) / its time, as a fraction of this device's
   copy bandwidth (``dst.copy_(src)`` on 1 GiB, measured in the same run).
2. Linear + cross-entropy: forward + backward at vocab 128256, 4096 tokens, hidden 4096, bf16: lowmem's
   ``linear_cross_entropy`` (Triton path), Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` and the unfused
   ``F.cross_entropy(F.linear(...))``: time and ``torch.cuda.max_memory_allocated`` above the inputs.
3. Seeded ZO perturbation: ``perturbed`` / ``update_`` on one 8192 x 8192 bf16 weight against torch's
   ``randn`` + add.

Times are medians of repeats (CUDA events). Without a CUDA device it writes that the figures are pending and exits;
``--smoke`` instead runs every measurement once on small CPU tensors in Triton's interpreter (no figures: it checks
that the script and the libraries' calls work before a GPU is spent on it). Run:
``PYTHONPATH=. python benchmarks/bench_kernels_gpu.py --out benchmarks/results`` (needs ``pip install -e
'.[bench]'``: bitsandbytes, torchao, liger-kernel).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEVICE = "cuda"
#: Repeats of each timing (``--smoke``: 1).
REPEATS = 20


def cuda_time(fn, repeats: int | None = None, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (wall time of one call on CPU, ``--smoke``)."""
    repeats = min(repeats or REPEATS, REPEATS)
    if DEVICE != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 28 if DEVICE == "cuda" else 1 << 20, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms / 1e3)


def _weight(shape, dtype):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0], bias=False, device=DEVICE, dtype=dtype)
    layer.weight.grad = torch.randn_like(layer.weight) * 1e-3
    return layer


def bench_adamw_8bit(shape, dtype, bandwidth: float) -> dict:
    import bitsandbytes as bnb
    import torchao.optim

    from lowmem.kernels import blockwise_8bit
    from lowmem.optim import create_optimizer

    n = shape[0] * shape[1]
    rows = {}
    makers = {
        "lowmem adamw_8bit (fused kernel)": lambda m: create_optimizer("adamw_8bit", m, lr=1e-3, min_8bit_size=0),
        "bitsandbytes AdamW8bit": lambda m: bnb.optim.AdamW8bit(m.parameters(), lr=1e-3, min_8bit_size=0),
        "torchao AdamW8bit": lambda m: torchao.optim.AdamW8bit(m.parameters(), lr=1e-3, block_size=256),
    }
    for name, make in makers.items():
        layer = _weight(shape, dtype)
        opt = make(layer)
        rows[name] = cuda_time(opt.step)
        if name.startswith("lowmem"):
            state = opt.state[layer.weight]
            kernel_ms = cuda_time(lambda s=state, w=layer.weight: blockwise_8bit.adamw_8bit_update_(
                w, w.grad, s, beta1=0.9, beta2=0.999, eps=1e-8, step_size=1e-3, decay=0.0))
        del opt, layer
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    element = torch.empty((), dtype=dtype).element_size()
    moved = n * (2 * element + element + 2 * 2) + 2 * 2 * 4 * (n // 256)  # weight r+w, grad r, codes r+w, absmax
    achieved = moved / (kernel_ms / 1e3)
    ours = rows["lowmem adamw_8bit (fused kernel)"]
    return {"shape": list(shape), "dtype": str(dtype), "step_ms": rows, "kernel_ms": kernel_ms,
            "kernel_bandwidth_GBps": achieved / 1e9, "fraction_of_copy_bandwidth": achieved / bandwidth,
            "ratios_vs_lowmem": {k: v / ours for k, v in rows.items()}}


def bench_linear_ce(vocab: int, tokens: int, hidden: int) -> dict:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    from lowmem.kernels import linear_cross_entropy

    torch.manual_seed(0)
    weight = (torch.randn(vocab, hidden, device=DEVICE) * 0.02).to(torch.bfloat16).requires_grad_()
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(vocab, (tokens,), device=DEVICE)
    liger = LigerFusedLinearCrossEntropyLoss()
    variants = {
        "lowmem linear_cross_entropy": lambda: linear_cross_entropy(x, weight, labels),
        "Liger FusedLinearCrossEntropy": lambda: liger(weight, x, labels),
        "unfused F.cross_entropy(F.linear)": lambda: F.cross_entropy(F.linear(x, weight).float(), labels),
    }
    rows = {}
    for name, loss_fn in variants.items():
        def step(loss_fn=loss_fn):
            loss_fn().backward()
            x.grad = weight.grad = None
        try:
            ms = cuda_time(step, repeats=10, warmup=2)
        except Exception as err:  # e.g. Liger's kernels in the CPU interpreter (--smoke): say so, go on
            rows[name] = {"unavailable": f"{type(err).__name__}: {str(err)[:200]}"}
            continue
        rows[name] = {"ms": ms}
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            rows[name]["peak_above_inputs_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    ours = rows["lowmem linear_cross_entropy"]["ms"]
    for row in rows.values():
        if "ms" in row:
            row["time_vs_lowmem"] = row["ms"] / ours
    return {"vocab": vocab, "tokens": tokens, "hidden": hidden, "dtype": "bfloat16", "rows": rows}


def bench_zo(shape) -> dict:
    from lowmem.kernels import zo_noise

    w = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)
    gen = torch.Generator(device=DEVICE)

    def torch_perturbed():
        z = torch.randn(w.shape, generator=gen.manual_seed(1), device=DEVICE)
        return (w.float() + 1e-3 * z).to(w.dtype)

    return {"shape": list(shape), "dtype": "bfloat16", "ms": {
        "lowmem perturbed (kernel)": cuda_time(lambda: zo_noise.perturbed(w, 1, 0, (1e-3,))),
        "torch randn + add": cuda_time(torch_perturbed),
        "lowmem update_ (kernel, stochastic rounding)": cuda_time(
            lambda: zo_noise.update_(w, [1], [0.5], 1e-7, 0.0, 2, 0)),
    }}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--smoke", action="store_true", help="run everything once, tiny, on CPU in the interpreter")
    args = ap.parse_args(argv)
    report = {"date": datetime.date.today().isoformat()}
    if args.smoke:
        smoke()
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        report["pending"] = "no CUDA device on this machine: the GPU figures are pending"
        print(report["pending"])
    else:
        report.update(measure((args.rows, args.rows), (128256, 4096, 4096)))
        print(json.dumps(report, indent=2))
    (args.out / "kernels_gpu.json").write_text(json.dumps(report, indent=2) + "\n")


def measure(shape, linear_ce_shape) -> dict:
    """Every figure, on ``DEVICE``."""
    report = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE}
    bandwidth = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bandwidth / 1e9
    report["adamw_8bit"] = [bench_adamw_8bit(shape, dtype, bandwidth) for dtype in (torch.float32, torch.bfloat16)]
    report["linear_cross_entropy"] = bench_linear_ce(*linear_ce_shape)
    report["zo"] = bench_zo(shape)
    return report


def smoke() -> None:
    """Every measurement once on small CPU tensors, the kernels in Triton's interpreter."""
    global DEVICE, REPEATS
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--smoke needs TRITON_INTERPRET=1 before Triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"
    from lowmem.kernels import dispatch

    DEVICE, REPEATS = "cpu", 1
    with dispatch.backend("triton"):
        print(json.dumps(measure((256, 512), (1000, 64, 32)), indent=2))


if __name__ == "__main__":
    main()
