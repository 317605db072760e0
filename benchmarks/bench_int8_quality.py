"""Quality with int8 weights: the stdlib quality run (``lowmem.bench.quality``: the same tiny LLaMA, corpus, batches,
schedule and steps as ``bench_quality.py``) with the weights in bf16 against the projected linears' weights in int8
(``weight_dtype="int8"``, stochastic rounding), for each projected optimizer; the held-out loss of both and their
ratio (issue 18's goal: int8 within 3% of bf16).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_int8_quality.py --out benchmarks/results`` (8 runs, about 15
minutes on 2 idle cores; ``--steps 5 --eval-blocks 8`` checks that it works).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

import lowmem
from benchmarks.bench_quality import add_run_arguments, learning_rate, options
from lowmem.bench.quality import MODEL, stdlib_corpus, train

NAMES = ["galore_adamw", "apollo_adamw", "apollo_mini", "frugal"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(ap)
    ap.add_argument("--names", nargs="*", default=NAMES)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_corpus(args.seq)
    header = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}. "
              f"Model {MODEL} in bf16; {args.steps} steps x {args.batch} x {args.seq} tokens")
    print(header, flush=True)
    rows = []
    for name in args.names:
        losses = {}
        for weights in ("bf16", "int8"):
            opts = {**options(name, args.steps), **({"weight_dtype": "int8"} if weights == "int8" else {})}

            def make(model, lr, name=name, opts=opts):
                return lowmem.create_optimizer(name, model.to(torch.bfloat16), lr=lr, **opts)

            run = train(f"{name} {weights}", make, corpus, steps=args.steps, batch=args.batch,
                        lr=learning_rate(name, args), eval_blocks=args.eval_blocks, optimizer_name=name)
            losses[weights] = run.final_eval
            print(f"{name} {weights} weights: held-out {run.final_eval:.4f} in {run.seconds:.0f} s", flush=True)
        rows.append({"name": name, "bf16": losses["bf16"], "int8": losses["int8"],
                     "ratio": losses["int8"] / losses["bf16"]})
        (args.out / "int8_quality.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    lines = [header, "", "| optimizer | held-out loss, bf16 weights | int8 weights | int8 / bf16 |",
             "|---|---:|---:|---:|"]
    lines += [f"| `{r['name']}` | {r['bf16']:.4f} | {r['int8']:.4f} | {r['ratio']:.4f} |" for r in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
