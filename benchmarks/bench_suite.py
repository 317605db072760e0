"""State memory and step time of every optimizer against its reference, on the full LLaMA-130M weights.

``lowmem.bench.suite`` with the issue's settings: LLaMA-130M (12 layers, vocab 32000, fp32), rank 128, every
registered name's state bytes per parameter after one step (measured from the tensors, next to the formula and
each reference's), and ours / reference step-time ratios for every pair (7 interleaved blocks of >= 0.5 s). Runs on
the GPU when there is one (the header records the device). Writes ``OUT/suite.md`` and ``OUT/state_bytes.png``.

Run on an idle machine (two torch processes on 2 cores slow each other down many times over):
``PYTHONPATH=. .venv/bin/python benchmarks/bench_suite.py --out benchmarks/results`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lowmem.bench import report, suite


def plot_state(rows, path: Path) -> None:
    """Bytes per parameter, ours and the first reference, one bar pair per optimizer."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [r.name for r in rows]
    ours = [r.ours / r.params for r in rows]
    refs = [next((v / r.params for _, v, _ in r.references if v is not None), 0) for r in rows]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="lowmem")
    ax.bar([i + 0.2 for i in x], refs, width=0.4, label="reference (where one exists)")
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("optimizer state, bytes per parameter")
    ax.set_title("LLaMA-130M, fp32 weights, rank 128")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-block-s", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 16))
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    result = suite(layers=args.layers, vocab=args.vocab, rank=args.rank, repeats=args.repeats,
                   min_block_s=args.min_block_s, progress=lambda line: print(line, file=sys.stderr, flush=True))
    text = report(result) + f"\n\nwall time {time.time() - start:.0f} s\n"
    (args.out / "suite.md").write_text(text)
    plot_state(result.states, args.out / "state_bytes.png")
    print(text)


if __name__ == "__main__":
    main()
