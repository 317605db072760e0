"""Muon's step time on this machine: lowmem's ``muon`` against ``torch.optim.Muon`` (+ AdamW on the same split,
``lowmem.bench.references``), interleaved in the same process; and what the Newton-Schulz iteration adds to a training
step, as a fraction of one forward + backward of the same model.

LLaMA-130M's shapes (GaLore's llama_130m.json: hidden 768, intermediate 2048, vocabulary 32000), ``--layers`` layers,
fp32, batch ``--batch`` x ``--seq`` tokens for the forward + backward.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_muon.py [--layers 4] [--batch 4] [--seq 256]``
"""

from __future__ import annotations

import argparse
import time

import torch

from lowmem.bench.state import LLAMA_130M, random_grads
from lowmem.bench.timing import time_pair
from lowmem.kernels import newton_schulz
from lowmem.memory import load_config


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(load_config({**LLAMA_130M, "num_hidden_layers": args.layers}))
    random_grads(model)
    timing = time_pair("muon", "muon", model, {"lr": 1e-3}, repeats=args.repeats)
    print(f"muon step: ours {timing.ours_ms:.1f} ms, torch.optim.Muon + AdamW {timing.ref_ms:.1f} ms, "
          f"ours / torch {timing.ratio:.2f} (range {timing.low:.2f} - {timing.high:.2f})")

    matrices = [p for n, p in model.named_parameters() if "self_attn" in n or "mlp" in n]
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up
    forward_backward, iteration = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        forward_backward.append(time.perf_counter() - start)
        start = time.perf_counter()
        for p in matrices:
            newton_schulz.orthogonalize(p.grad)
        iteration.append(time.perf_counter() - start)
    fb, ns = sorted(forward_backward)[len(forward_backward) // 2], sorted(iteration)[len(iteration) // 2]
    print(f"Newton-Schulz over the {len(matrices)} matrices: {ns * 1e3:.0f} ms; forward + backward of "
          f"{args.batch} x {args.seq} tokens: {fb * 1e3:.0f} ms; the iteration adds {ns / fb:.1%} of it")


if __name__ == "__main__":
    main()
