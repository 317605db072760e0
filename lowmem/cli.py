"""The ``lowmem`` command: ``lowmem train RECIPE [key=value ...]``, ``lowmem plan MODEL`` and ``lowmem list``.

A mistake in the user's input prints one line (``lowmem: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowmem", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a recipe (a YAML path or a bundled name such as cpu-tiny)")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe keys")
    plan = commands.add_parser("plan", help="what fits on a card: bytes of weights, gradients, optimizer state, "
                                            "activations and logits for every optimizer and mode")
    plan.add_argument("model", help="a config JSON, a model directory or a Hub id (only the config is read)")
    plan.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    plan.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    plan.add_argument("--card-gib", type=float, default=24.0, help="the card's memory in GiB (default 24)")
    plan.add_argument("--bf16", action="store_true", help="weights in bf16 (pure_bf16) instead of fp32")
    commands.add_parser("list", help="every optimizer name with a one-line summary")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args.recipe, args.overrides)
        if args.command == "plan":
            return _plan(args)
        return _list()
    except (ValueError, FileNotFoundError) as err:
        print(f"lowmem: error: {err}", file=sys.stderr)
        return 2


def _train(name: str, overrides: list[str]) -> int:
    from .recipe import parse_recipe, read_values, recipe_path
    from .train import run

    recipe = parse_recipe(read_values(recipe_path(name), overrides))
    report = run(recipe)
    mib = 2**20
    print(f"parameters: {report['parameters']:,}; optimizer state: {report['optimizer_state_bytes']:,} bytes "
          f"({report['optimizer_state_bytes'] / mib:.1f} MiB); peak RSS {report['peak_rss_bytes'] / mib:.0f} MiB"
          + (f"; peak CUDA {report['cuda_max_allocated_bytes'] / mib:.0f} MiB" if "cuda_max_allocated_bytes" in report
             else ""))
    print(f"saved to {recipe.train.output_dir} (model, memory.json"
          + (", loss.png)" if recipe.method.plot_loss else ")"))
    return 0


def _plan(args) -> int:
    from .memory import format_plan, plan

    rows = plan(args.model, args.seq, args.batch, args.card_gib, "bf16" if args.bf16 else "fp32")
    print(format_plan(rows, args.card_gib))
    return 0


def _list() -> int:
    from .optim.registry import REGISTRY

    width = max(len(name) for name in REGISTRY)
    for name in sorted(REGISTRY):
        print(f"{name:<{width}}  {REGISTRY[name].summary}")
    print("\nAlso: any '<method>+<rule>[+<precision>]' (lowmem.composition_parts()) and any name + '_layerwise'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
