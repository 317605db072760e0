"""Quality with int8 weights: the stdlib quality run (``lowmem.bench.quality``: the same tiny LLaMA, corpus, batches,
schedule and steps as ``bench_quality.py``) with the weights in bf16 against the projected linears' weights in int8
(``weight_dtype="int8"``, stochastic rounding), for each projected optimizer; the held-out loss of each and its
ratio to bf16 (issue 18's goal: int8 within 3% of bf16). ``--configs`` adds other option sets beside them, e.g. the
smallest 1.1B configuration: ``--configs bf16= int8=weight_dtype=int8
int8-mini=weight_dtype=int8,dense_rule=adam_mini,dense_state_dtype=8bit`` (``label=optim_args``).

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
from lowmem.trainers.arguments import parse_optim_args

NAMES = ["galore_adamw", "apollo_adamw", "apollo_mini", "frugal"]
CONFIGS = ["bf16=", "int8=weight_dtype=int8"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(ap)
    ap.add_argument("--names", nargs="*", default=NAMES)
    ap.add_argument("--configs", nargs="+", default=CONFIGS,
                    help="label=optim_args per column, the first the baseline of the ratios (default: %(default)s)")
    ap.add_argument("--json", default="int8_quality.json", help="the results' file name under --out")
    args = ap.parse_args(argv)
    configs = {label: parse_optim_args(extra) for label, _, extra in (c.partition("=") for c in args.configs)}
    baseline = next(iter(configs))
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_corpus(args.seq)
    header = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}. "
              f"Model {MODEL} in bf16; {args.steps} steps x {args.batch} x {args.seq} tokens")
    print(header, flush=True)
    rows = []
    for name in args.names:
        losses = {}
        for label, extra in configs.items():
            opts = {**options(name, args.steps), **extra}

            def make(model, lr, name=name, opts=opts):
                return lowmem.create_optimizer(name, model.to(torch.bfloat16), lr=lr, **opts)

            run = train(f"{name} {label}", make, corpus, steps=args.steps, batch=args.batch,
                        lr=learning_rate(name, args), eval_blocks=args.eval_blocks, optimizer_name=name)
            losses[label] = run.final_eval
            print(f"{name} {label}: held-out {run.final_eval:.4f} in {run.seconds:.0f} s", flush=True)
        rows.append({"name": name, **losses, **{f"{label} / {baseline}": losses[label] / losses[baseline]
                                                for label in configs if label != baseline}})
        (args.out / args.json).write_text(json.dumps({"header": header, "configs": configs, "rows": rows},
                                                               indent=1))
    others = [label for label in configs if label != baseline]
    lines = [header, "", "| optimizer | " + " | ".join(f"held-out loss, {label}" for label in configs) + " | "
             + " | ".join(f"{label} / {baseline}" for label in others) + " |",
             "|---|" + "---:|" * (len(configs) + len(others))]
    lines += [f"| `{r['name']}` | " + " | ".join(f"{r[label]:.4f}" for label in configs) + " | "
              + " | ".join(f"{r[f'{label} / {baseline}']:.4f}" for label in others) + " |" for r in rows]
    print("\n".join(lines))

if __name__ == "__main__":
    main()
