"""CPU benchmark: 8-bit AdamW step time, lowmem vs bitsandbytes (CPU backend) vs fp32 torch AdamW.

LLaMA-130M-shaped fp32 weights (``--layers`` of its 12 decoder layers), fixed random gradients, the
three optimizers timed in one process, interleaved, median of ``--reps`` blocks of ``--steps`` steps.
torchao's 8-bit AdamW is not measured: it is not installed by the test extra (and on CPU it relies on
torch.compile). Run: ``PYTHONPATH=. python benchmarks/bench_8bit_step.py``.
"""

import argparse
import statistics
import time

import bitsandbytes as bnb
import torch

from lowmem.optim import AdamW8bit

SHAPES = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]


def timed(opt, params, grads, steps):
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES * args.layers
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    builders = {
        "lowmem AdamW8bit": AdamW8bit,
        "bitsandbytes AdamW8bit": bnb.optim.AdamW8bit,
        "torch AdamW (fp32)": lambda ps, **kw: torch.optim.AdamW(ps, foreach=True, **kw),
    }
    runs = {}
    for name, build in builders.items():
        params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in shapes]
        opt = build(params, lr=1e-3, weight_decay=0.01)
        timed(opt, params, grads, 1)  # create the states
        runs[name] = (opt, params)
    samples = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, (opt, params) in runs.items():
            samples[name].append(timed(opt, params, grads, args.steps))
    base = statistics.median(samples["torch AdamW (fp32)"])
    n = sum(a * b for a, b in shapes)
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {len(shapes)} matrices, {n:,} params, "
          f"median of {args.reps} x {args.steps} steps\n")
    print("| optimizer | ms/step | vs fp32 torch AdamW | state bytes/param |")
    print("|---|---:|---:|---:|")
    for name, (opt, _) in runs.items():
        ms = statistics.median(samples[name])
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                    if torch.is_tensor(v) and k not in ("qmap1", "qmap2", "step"))
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {state / n:.3f} |")


if __name__ == "__main__":
    main()
