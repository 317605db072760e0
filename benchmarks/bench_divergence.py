"""Still for telling an implementation difference from a chaotic run (benchmarks/RESULTS.md, "Quality").

How far two runs of one optimizer drift apart on the quality model: lowmem against its reference, or lowmem
against itself from weights nudged by 1e-7 (relative). If the nudge drifts as far as the reference does, the gap
between the two implementations' final losses is the run's own sensitivity, not a difference in the algorithm.

Prints, every 5 steps, the largest relative difference ``||a - b|| / ||b||`` over the weight tensors, and which.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_divergence.py apollo_mini [--nudge]`` (about a minute).
"""

from __future__ import annotations

import argparse
import copy

import torch

import lowmem
from lowmem.bench.quality import stdlib_corpus, tiny_llama
from lowmem.bench.references import reference
from lowmem.memory import checked_step
from lowmem.optim.registry import get_spec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a lowmem name with a reference (lowmem.bench.references)")
    ap.add_argument("--nudge", action="store_true", help="compare with lowmem itself from nudged weights")
    ap.add_argument("--lr", type=float, default=8e-3)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    corpus = stdlib_corpus(128)
    options = {"update_proj_gap": 40}
    if get_spec(args.name).group.get("rank", 0) > 1:
        options["rank"] = 64
    a = tiny_llama(0, corpus.vocab_size)
    b = copy.deepcopy(a)
    ours = lowmem.create_optimizer(args.name, a, lr=args.lr, **options)
    if args.nudge:
        with torch.no_grad():
            for p in b.parameters():
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        other = lowmem.create_optimizer(args.name, b, lr=args.lr, **options)
    else:
        other = reference(args.name, b, lr=args.lr, **options)
    order = torch.randperm(len(corpus.train), generator=torch.Generator().manual_seed(0))
    for step in range(args.steps):
        tokens = corpus.train[order[step * 16:(step + 1) * 16]]
        for model, optimizer in ((a, ours), (b, other)):
            checked_step(model, optimizer, tokens, f"step {step}")
        if step % 5 == 4:
            with torch.no_grad():
                diff, name = max((float((p - q).norm() / q.norm()), n)
                                 for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True))
            print(f"step {step + 1:3d}: {diff:.2e} ({name})", flush=True)


if __name__ == "__main__":
    main()
