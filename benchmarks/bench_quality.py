"""Quality: every lowmem optimizer and its reference implementation pretraining the same tiny LLaMA on the Python
standard library's source (``lowmem.bench.quality``), for the same token budget; final held-out loss table and the
loss curves.

Runs, in one process, one after another: every registered name (``lowmem.available_optimizers()``), the reference
of each name that has one (``lowmem.bench.references``; built from lowmem's resolved param groups, so the settings
are the same), AdamW at GaLore's learning rates (to tell GaLore's projection from its mix of rates), and AdamW,
GaLore and APOLLO-Mini again with other seeds (other initial weights and batch order) to show the run-to-run
noise. Results are written after every run to ``OUT/quality.json``; at the end ``OUT/quality.md`` (the
table) and ``OUT/quality_loss.png`` (the curves). A crash or a non-finite loss stops the script with an error.

Learning rates follow the papers' convention: dense rules at ``--lr``, and the projected families (GaLore, Fira,
APOLLO) at ``--lowrank-lr`` with their own scale factor (GaLore's 0.25, APOLLO-Mini's 128, ...).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_quality.py --out benchmarks/results`` (40 runs, about 65
minutes on 2 idle cores with the defaults; ``--steps 5 --eval-blocks 8`` checks that every run works in a few minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

import lowmem
from lowmem.bench.quality import MODEL, stdlib_corpus, train
from lowmem.bench.references import REFERENCES, reference, references_of
from lowmem.optim.registry import get_spec

LOW_RANK = ("galore", "fira", "apollo")


def options(name: str, steps: int) -> dict:
    """Rank a quarter of the 256 width (the GaLore paper's 128 of 512 for LLaMA-60M), projections refreshed three
    times per run; APOLLO-Mini keeps rank 1."""
    known = get_spec(name).options()
    out = {}
    if "rank" in known and known["rank"] != 1:
        out["rank"] = MODEL["hidden_size"] // 4
    for gap in ("update_proj_gap", "update_gap"):
        if gap in known:
            out[gap] = max(1, steps // 3)
    return out


def learning_rate(name: str, args) -> float:
    """CAME divides its momentum by the root of a residual average with beta3 = 0.9999 and no bias correction, so
    its first updates are about 11x an Adam step's size ((1 - b1) / (b1 sqrt(1 - b3))) and stay above 1x through a
    short run: it runs at a tenth of its family's rate."""
    lr = args.lowrank_lr if name.startswith(LOW_RANK) else args.lr
    return lr * args.came_lr_factor if "came" in name else lr


GALORE_RATES = "adamw at GaLore's rates"


def adamw_at_galore_rates(model, lr: float):
    """AdamW (the ``adamw`` name's numeric core) with GaLore's learning rates: the weights GaLore projects at
    ``lr`` x GaLore's scale, the rest (embeddings, head, norms) at ``lr``. Tells GaLore's projection apart from its
    mix of rates."""
    from lowmem.optim import LowMemOptimizer, split_parameters

    split = split_parameters(model, None)
    scale = get_spec("galore_adamw").group["scale"]
    groups = [{"params": [p for _, p in split.targets], "lr": lr * scale},
              {"params": [p for _, p in split.decay + split.no_decay]}]
    return LowMemOptimizer(groups, lr=lr, **get_spec("adamw").ctor)


def runs(args) -> list[tuple[str, str, int, bool]]:
    """(label, lowmem name, seed, reference key or None) for every run, in order."""
    names = lowmem.available_optimizers() if args.names is None else args.names
    out = [(name, name, 0, None) for name in names]
    if args.galore_rates:
        out.append((GALORE_RATES, "galore_adamw", 0, GALORE_RATES))
    if not args.no_references:
        out += [(f"{name} [ref {REFERENCES[key].label}]", name, 0, key) for name in names
                for key in references_of(name)]
    for seed in range(1, args.noise_seeds + 1):
        out += [(f"{name} (seed {seed})", name, seed, None) for name in args.noise_names]
    return out


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    families = {}
    for r in records:
        families.setdefault(re.split("[_ ]", r["optimizer"])[0], []).append(r)
    cols = 3
    rows = -(-len(families) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (family, members) in zip(axes.flat, sorted(families.items()), strict=False):
        for r in members:
            steps, losses = zip(*r["eval_loss"], strict=True)
            ax.plot(steps, losses, marker=".", linestyle="--" if "[ref" in r["label"] else "-", label=r["label"])
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(records: list[dict], header: str) -> str:
    by_label = {r["label"]: r for r in records}
    adamw = by_label.get("adamw")
    noise = {name: [r["eval_loss"][-1][1] for r in records if r["optimizer"] == name and "[ref" not in r["label"]]
             for name in sorted({r["optimizer"] for r in records if r["seed"]})}
    lines = [header, "", "| run | lr | held-out loss | vs AdamW | vs reference | state bytes | s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        final = r["eval_loss"][-1][1]
        ref = next((x for x in records if x["label"].startswith(f"{r['optimizer']} [ref")), None)  # the first
        vs_ref = f"{final - ref['eval_loss'][-1][1]:+.4f}" if ref and "[ref" not in r["label"] and r["seed"] == 0 \
            else ""
        vs_adamw = f"{final / adamw['eval_loss'][-1][1] - 1:+.2%}" if adamw else ""
        state = f"{r['state_bytes']:,}" if "[ref" not in r["label"] else "-"
        lines.append(f"| {r['label']} | {r['lr']:g} | {final:.4f} | {vs_adamw} | {vs_ref} | {state} | "
                     f"{r['seconds']:.0f} |")
    lines.append("\nState bytes: the tensors in lowmem's optimizer state. A reference's state is not counted here (its "
                 "projector objects and tensor subclasses need lowmem.bench.state.optimizer_bytes): see suite.md.")
    for name, finals in noise.items():
        if len(finals) > 1:
            lines.append(f"\nRun-to-run noise, {name} over {len(finals)} seeds: {min(finals):.4f} - {max(finals):.4f} "
                         f"(spread {max(finals) - min(finals):.4f})")
    return "\n".join(lines)


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The run's settings every quality script shares: steps, batch, length, learning rates, evaluation, output."""
    ap.add_argument("--steps", type=int, default=120, help="sized so that the whole table takes about an hour")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="dense rules (AdamW, Adam-mini, CAME, FRUGAL blocks...)")
    ap.add_argument("--lowrank-lr", type=float, default=8e-3, help="GaLore, Fira, APOLLO")
    ap.add_argument("--came-lr-factor", type=float, default=0.1, help="CAME's rate relative to its family's")
    ap.add_argument("--eval-blocks", type=int, default=128, help="held-out blocks for the intermediate evaluations")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(ap)
    ap.add_argument("--names", nargs="*", help="lowmem names (default: all; none with a bare --names)")
    ap.add_argument("--galore-rates", action=argparse.BooleanOptionalAction, default=True,
                    help="also AdamW at GaLore's learning rates (projected weights at lr x scale)")
    ap.add_argument("--no-references", action="store_true")
    ap.add_argument("--noise-seeds", type=int, default=2, help="extra seeds (other weights and batch order)")
    ap.add_argument("--noise-names", nargs="*", default=["adamw", "galore_adamw", "apollo_mini"],
                    help="the names run with the extra seeds (APOLLO-Mini: a 1e-7 nudge of its weights moves it as "
                         "far as its reference does)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = stdlib_corpus(args.seq)
    header = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads. Model {MODEL}; corpus: "
              f"{corpus.files[0]} stdlib files train ({corpus.train.numel():,} tokens), {corpus.files[1]} held out "
              f"({corpus.eval.numel():,} tokens); {args.steps} steps x {args.batch} x {args.seq} tokens "
              f"= {args.steps * args.batch * args.seq:,} tokens per run")
    print(header, flush=True)
    records, start = [], time.time()
    for label, name, seed, ref in runs(args):
        opts = options(name, args.steps)

        def make(model, lr, name=name, opts=opts, ref=ref):
            if ref == GALORE_RATES:
                return adamw_at_galore_rates(model, lr)
            return reference(ref, model, lr=lr, **opts) if ref else lowmem.create_optimizer(name, model, lr=lr, **opts)
        try:
            run = train(label, make, corpus, steps=args.steps, batch=args.batch, lr=learning_rate(name, args),
                        seed=seed, eval_blocks=args.eval_blocks,
                        optimizer_name=GALORE_RATES if ref == GALORE_RATES else name)
        except (AssertionError, RuntimeError) as err:
            if not ref or ref == GALORE_RATES:
                raise
            print(f"{label}: the reference does not run here ({type(err).__name__}: {str(err)[:100]})", flush=True)
            continue
        record = {**asdict(run), "options": opts}
        records.append(record)
        print(f"{label}: held-out {run.final_eval:.4f} in {run.seconds:.0f} s", flush=True)
        (args.out / "quality.json").write_text(json.dumps({"header": header, "runs": records}, indent=1))
    (args.out / "quality.md").write_text(table(records, header) + f"\n\nwall time {time.time() - start:.0f} s\n")
    plot(records, args.out / "quality_loss.png")
    print(table(records, header))


if __name__ == "__main__":
    main()
