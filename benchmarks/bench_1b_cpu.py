"""A billion-parameter training step on a CPU: LLaMA-1.1B (TinyLlama's shape) in bf16, batch 1 x 256, gradient
checkpointing, a few full steps with four optimizers; peak live tensor bytes by category and the process's peak RSS.

Modes (each in its own process, so each peak RSS is its own):

* ``adamw_fp32``: AdamW with fp32 moments (``state_dtype="float32"``) on the bf16 weights;
* ``adamw_8bit``: AdamW with blockwise 8-bit moments;
* ``galore_8bit_layerwise``: GaLore (rank 128) with 8-bit moments, updated layer by layer inside backward; its
  projections use the randomized SVD (``svd_method="randomized"``: the exact SVD of 154 matrices takes ~7 minutes
  on 2 cores; the memory is the same);
* ``apollo_mini_layerwise``: APOLLO-Mini, layer-wise.

Peak live bytes come from ``lowmem.memory.measure_peak`` (MemTracker, the last step), next to the planner's
prediction for the same run (``lowmem.memory.peak_bytes``). The goal: APOLLO-Mini layer-wise at most 1.3x the bf16
weight bytes. A crash or a non-finite loss fails the script.

Matrix products in fp32 arithmetic: on a CPU without AVX-512 (this machine: AVX2 only) torch's bf16 GEMM falls back
to a path that runs at 0.3 GFLOP/s against 76 for fp32 (measured), so one 1.1B step would take over half an hour.
``bf16_gemm_in_fp32`` therefore computes each bf16 linear layer and each bf16 matrix product in fp32 and rounds the
result to bf16, as a GPU's bf16 GEMM accumulates in fp32; every stored tensor (weights, gradients, saved
activations, optimizer states) keeps its bf16 dtype, and a linear layer saves the same bf16 input and weight for
backward as torch's own. The fp32 copies are per-operation temporaries, converted 2048 weight rows at a time
(16 MiB), plus the fp32 input (2 MiB at 256 x 2048).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_1b_cpu.py [--modes ...] [--steps 3] [--out DIR]`` on an idle
machine (about 3-6 minutes per mode on 2 cores, 24 GiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

TINYLLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                 tie_word_embeddings=False)
MODES = {
    "adamw_fp32": ("adamw", dict(state_dtype="float32")),
    "adamw_8bit": ("adamw_8bit", {}),
    "galore_8bit_layerwise": ("galore_adamw_8bit_layerwise", dict(rank=128, svd_method="randomized")),
    "apollo_mini_layerwise": ("apollo_mini_layerwise", {}),
}
CATEGORIES = ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Buffer", "Other")
GIB = 2**30


#: Rows of a weight converted to fp32 at a time (16 MiB at width 2048): the emulation's only extra memory.
ROWS = 2048


class _Bf16Linear(torch.autograd.Function):
    """``linear`` of bf16 tensors with fp32 arithmetic, ``ROWS`` weight rows at a time; saves the bf16 input and
    weight, as torch's linear does."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x32 = x.float()
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for start in range(0, weight.shape[0], ROWS):  # written in place: no list of parts beside the result
            out[..., start:start + ROWS] = torch.nn.functional.linear(x32, weight[start:start + ROWS].float())
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.flatten(0, -2)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sum(gc.float() @ w.float() for gc, w in zip(g.split(ROWS, 1), weight.split(ROWS), strict=True))
            grad_x = grad_x.bfloat16().view(*x.shape)
        if ctx.needs_input_grad[1]:
            x32 = x.flatten(0, -2).float()
            grad_w = weight.new_empty(weight.shape)
            for start in range(0, weight.shape[0], ROWS):
                grad_w[start:start + ROWS] = g[:, start:start + ROWS].float().T @ x32
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.float().sum(0).bfloat16()
        return grad_x, grad_w, grad_b


@contextlib.contextmanager
def bf16_gemm_in_fp32():
    """While active: bf16 CPU ``F.linear`` through ``_Bf16Linear``, and gradient-free bf16 CPU matrix products
    (``@``, ``torch.matmul``: the optimizers' projections) in fp32 with a bf16 result. Patched at the functions
    themselves, not with a mode, so that checkpointing's recomputation and layer-wise updates inside backward take
    the same path as the forward."""
    linear, matmul, dunder = torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__

    def bf16_cpu(*tensors) -> bool:
        return all(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 and t.device.type == "cpu"
                   for t in tensors)

    def patched_linear(x, weight, bias=None):
        return _Bf16Linear.apply(x, weight, bias) if bf16_cpu(x, weight) else linear(x, weight, bias)

    def product(original):
        def patched(a, b, **kwargs):
            if bf16_cpu(a, b) and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
                return original(a.float(), b.float(), **kwargs).bfloat16()
            return original(a, b, **kwargs)
        return patched

    torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__ = patched_linear, product(matmul), \
        product(dunder)
    try:
        yield
    finally:
        torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__ = linear, matmul, dunder


def run_mode(mode: str, steps: int, seq: int, layers: int) -> dict:
    """One mode in this process: measured peak by category, the planner's prediction, RSS and time."""
    from lowmem import memory

    name, options = MODES[mode]
    config = {**TINYLLAMA, "num_hidden_layers": layers}
    start = time.time()
    with bf16_gemm_in_fp32():
        measured = memory.measure_peak(config, name, 1, seq, checkpointing=True, dtype=torch.bfloat16,
                                       steps=steps, **options)
    seconds = time.time() - start
    meta = memory.meta_model(memory.load_config(config), torch.bfloat16)
    planned = memory.peak_bytes(meta, name, 1, seq, checkpointing=True, **options)
    weights = sum(p.numel() for p in meta.parameters()) * 2
    return {"mode": mode, "optimizer": name, "options": options, "steps": steps, "seq": seq,
            "measured": measured, "planned": planned.total, "planned_phase": planned.phase,
            "weight_bytes": weights, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": seconds}


def table(results: list[dict]) -> str:
    head = "| mode | " + " | ".join(CATEGORIES) + " | peak live | x bf16 weights | planned | peak RSS | time |"
    lines = [head, "|---|" + "---:|" * (len(CATEGORIES) + 6)]
    for r in results:
        m = r["measured"]
        cells = [f"{m.get(c, 0) / GIB:.2f}" for c in CATEGORIES]
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + f" | {m['Total'] / GIB:.2f} GiB | "
                     f"**{m['Total'] / r['weight_bytes']:.2f}** | {r['planned'] / GIB:.2f} GiB "
                     f"({r['planned'] / m['Total'] - 1:+.1%}) | {r['peak_rss'] / GIB:.2f} GiB | {r['seconds']:.0f} s |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Stacked bars: peak live bytes by category per mode, with the 1.3x-weights goal line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0.0] * len(results)
    for category in CATEGORIES:
        heights = [r["measured"].get(category, 0) / GIB for r in results]
        ax.bar([r["mode"] for r in results], heights, bottom=bottom, label=category)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.axhline(1.3 * results[0]["weight_bytes"] / GIB, color="k", linestyle="--", label="1.3 x bf16 weights")
    ax.set_ylabel("peak live tensors, GiB")
    ax.set_title("LLaMA-1.1B, bf16, batch 1 x 256, checkpointing: one training step on a CPU")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=22, help="TinyLlama's 22 (fewer for a quick check)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.child:  # one mode; the result as JSON on stdout's last line
        print(json.dumps(run_mode(args.modes[0], args.steps, args.seq, args.layers)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes:
        print(f"{mode} ...", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, __file__, "--child", "--modes", mode, "--steps", str(args.steps),
                                "--seq", str(args.seq), "--layers", str(args.layers)], capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"{mode} failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
        (args.out / "cpu_1b.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (args.out / "cpu_1b.md").write_text(text + "\n")
    plot(results, args.out / "cpu_1b_memory.png")
    print(text)


if __name__ == "__main__":
    main()
