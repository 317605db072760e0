"""What 8-bit Adam's chunk size costs in time: GaLore 8-bit steps on three LLaMA-1.1B MLP-sized bf16 weights
(5632 x 2048 and 2048 x 5632, rank 128: moments of 720,896 elements each) with ``rules.CHUNK_8BIT``
at the quantizer's chunk (512K elements, before 2026-12-07) and at a quarter of it (128K, the default since), timed
interleaved in one process, median of ``--reps`` blocks of ``--steps`` steps. The update is bit-identical either way
(``tests/test_adam_8bit_kernel.py``); the smaller chunk bounds its temporaries (about 42 B per element) at 5 MiB.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_8bit_chunk.py [--steps 10] [--reps 5]``.
"""

import argparse
import statistics
import time

import torch

from lowmem.optim import LowMemOptimizer, rules

SHAPES = [(5632, 2048), (5632, 2048), (2048, 5632)]  # gate, up (right side), down (left side)


def optimizer(weights: list[torch.nn.Parameter]) -> LowMemOptimizer:
    return LowMemOptimizer([{"params": weights, "projector": "svd", "rank": 128, "update_proj_gap": 10**6,
                             "proj_type": "std", "state_dtype": "8bit"}], lr=1e-4)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    chunks = {"512K (before)": rules.CHUNK, "128K (default)": rules.CHUNK // 4}
    runs = {}
    for label in chunks:
        weights = [torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16)) for shape in SHAPES]
        for w in weights:
            w.grad = torch.randn(w.shape, dtype=torch.bfloat16)
        runs[label] = optimizer(weights)
        rules.CHUNK_8BIT = chunks[label]
        runs[label].step()  # the SVD refresh and the state, outside the timing
    default = rules.CHUNK_8BIT
    times = {label: [] for label in chunks}
    try:
        for _ in range(args.reps):
            for label, opt in runs.items():
                rules.CHUNK_8BIT = chunks[label]
                start = time.perf_counter()
                for _ in range(args.steps):
                    opt.step()
                times[label].append((time.perf_counter() - start) / args.steps)
    finally:
        rules.CHUNK_8BIT = default
    base = statistics.median(times["512K (before)"])
    for label, values in times.items():
        median = statistics.median(values)
        print(f"CHUNK_8BIT {label}: {median * 1e3:.1f} ms per step of the 3 matrices ({median / base:.3f}x)")


if __name__ == "__main__":
    main()
