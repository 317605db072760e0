"""Still for the CPU 8-bit AdamW's compiled kernel against its eager twin and fp32 AdamW (``bench_suite.py`` gives the
ratios against bitsandbytes and torchao; benchmarks/RESULTS.md, "8-bit AdamW step on the CPU").

CPU benchmark: 8-bit AdamW step time, lowmem (compiled and eager) vs bitsandbytes vs torchao vs fp32 AdamW.

LLaMA-130M-shaped fp32 weights (``--layers`` of its 12 decoder layers), fixed random gradients, every
optimizer timed in one process, interleaved, median of ``--reps`` blocks of ``--steps`` steps. lowmem runs
twice: with its compiled fused kernel (``lowmem.kernels.adam_8bit``, the default on CPU) and with the eager
twin. torchao's AdamW8bit compiles its own step with torch.compile (install ``torchao``; skipped with a note
when it is missing). Run: ``PYTHONPATH=. python benchmarks/bench_8bit_step.py``.
"""

import argparse
import contextlib
import statistics
import time
import warnings

import bitsandbytes as bnb
import torch

from lowmem.kernels import adam_8bit
from lowmem.optim import AdamW8bit

SHAPES = [(768, 768)] * 4 + [(2048, 768)] * 2 + [(768, 2048)]


@contextlib.contextmanager
def compiled(enabled: bool):
    adam_8bit.set_enabled(enabled)
    try:
        yield
    finally:
        adam_8bit.set_enabled(True)


class Run:
    """One optimizer over its own copy of the weights, stepped with the shared gradients."""

    def __init__(self, build, shapes, grads, gen, fused=True):
        self.params = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in shapes]
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.fused = fused
        with compiled(fused):
            self.opt = build(self.params, lr=1e-3, weight_decay=0.01)
            t0 = time.perf_counter()
            self.opt.step()  # create the states (and compile, where the optimizer compiles)
            self.first_step_s = time.perf_counter() - t0

    def time(self, steps: int) -> float:
        with compiled(self.fused):
            t0 = time.perf_counter()
            for _ in range(steps):
                self.opt.step()
            return (time.perf_counter() - t0) / steps * 1e3

    def state_bytes(self) -> int:
        return sum(tensor_bytes(v) for s in self.opt.state.values() for k, v in s.items()
                   if torch.is_tensor(v) and v.dim() > 0 and k not in ("qmap1", "qmap2"))


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a state tensor holds; a tensor subclass (torchao's 8-bit states) counts its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in inner)
    return t.numel() * t.element_size()


def builders():
    found = {
        "lowmem AdamW8bit (compiled)": (AdamW8bit, True),
        "lowmem AdamW8bit (eager twin)": (AdamW8bit, False),
        "bitsandbytes AdamW8bit": (bnb.optim.AdamW8bit, True),
    }
    try:
        from torchao.optim import AdamW8bit as TorchaoAdamW8bit
        found["torchao AdamW8bit"] = (TorchaoAdamW8bit, True)
    except ImportError:
        print("torchao is not installed: its row is missing (pip install torchao)")
    found["torch AdamW (fp32)"] = (lambda ps, **kw: torch.optim.AdamW(ps, foreach=True, **kw), True)
    return found


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shapes = SHAPES * args.layers
    grads = [torch.randn(*s, generator=gen) for s in shapes]
    runs = {name: Run(build, shapes, grads, gen, fused) for name, (build, fused) in builders().items()}
    samples = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            samples[name].append(run.time(args.steps))
    base = statistics.median(samples["torch AdamW (fp32)"])
    n = sum(a * b for a, b in shapes)
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {len(shapes)} matrices, {n:,} params, "
          f"{args.threads} threads, median of {args.reps} x {args.steps} steps\n")
    print("| optimizer | ms/step | vs fp32 torch AdamW | first step s | state bytes/param |")
    print("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        ms = statistics.median(samples[name])
        print(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {run.first_step_s:.1f} | {run.state_bytes() / n:.3f} |")


if __name__ == "__main__":
    main()
