"""The ``lowmem`` command: ``lowmem train RECIPE [key=value ...]``, ``lowmem plan MODEL``, ``lowmem bench`` and
``lowmem list``.

A mistake in the user's input prints one line (``lowmem: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

#: The model ``lowmem list`` prices every optimizer on: the GaLore paper's LLaMA-60M.
LIST_MODEL = dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, vocab_size=32000)


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
    plan.add_argument("--linear-ce", action=argparse.BooleanOptionalAction, default=None,
                      help="price the loss without logits (recipe key linear_cross_entropy); default: on for LLaMA, "
                           "Qwen2 and Mistral, the architectures it supports")
    commands.add_parser("list", help="every optimizer name with its state bytes per parameter and a summary")
    bench = commands.add_parser("bench", help="quick benchmark against the reference packages: state bytes per "
                                              "parameter and step-time ratios on LLaMA-130M-shaped weights")
    bench.add_argument("--layers", type=int, default=1, help="LLaMA-130M layers (default 1; the full model has 12)")
    bench.add_argument("--vocab", type=int, default=8000, help="vocabulary (default 8000; LLaMA-130M's is 32000)")
    bench.add_argument("--rank", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=3, help="timed blocks per pair (default 3)")
    bench.add_argument("--no-references", action="store_true", help="lowmem's state bytes only (no packages)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args.recipe, args.overrides)
        if args.command == "plan":
            return _plan(args)
        if args.command == "bench":
            return _bench(args)
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
    state = report["optimizer_state_bytes"]
    print(f"parameters: {report['parameters']:,} ({report['trainable_parameters']:,} trained); optimizer state: "
          f"{state:,} bytes ({state / mib:.1f} MiB); peak RSS {report['peak_rss_bytes'] / mib:.0f} MiB"
          + (f"; peak CUDA {report['cuda_max_allocated_bytes'] / mib:.0f} MiB" if "cuda_max_allocated_bytes" in report
             else ""))
    print(f"saved to {recipe.train.output_dir} (model, memory.json"
          + (", loss.png)" if recipe.method.plot_loss else ")"))
    return 0


def _plan(args) -> int:
    from .kernels.model_patch import LINEAR_CE_MODEL_TYPES
    from .memory import format_plan, load_config, plan, recipe_command, recommend

    config = load_config(args.model)  # read once (a hub id is a download)
    linear_ce = args.linear_ce if args.linear_ce is not None else config.model_type in LINEAR_CE_MODEL_TYPES
    rows = plan(config, args.seq, args.batch, args.card_gib, "bf16" if args.bf16 else "fp32", linear_ce=linear_ce)
    best = recommend(rows)
    command = recipe_command(best, args.model, args.seq, args.batch, args.bf16, linear_ce) if best else ""
    if linear_ce:
        print("(the loss without logits: linear_cross_entropy; --no-linear-ce prices the plain loss)")
    print(format_plan(rows, args.card_gib, command))
    return 0


def _bench(args) -> int:
    """State bytes of every name and the step-time ratios against the references (about 1-2 minutes on 2 cores)."""
    from .bench import report, suite

    result = suite(layers=args.layers, vocab=args.vocab, rank=args.rank, repeats=args.repeats, min_block_s=0.1,
                   references=not args.no_references, progress=lambda line: print(line, file=sys.stderr))
    print(report(result))
    print("\nThe full run (12 layers, more repeats, quality and a 1.1B step): see benchmarks/RESULTS.md.")
    return 0


def _list() -> int:
    """Every name, its optimizer-state bytes per parameter on LLaMA-60M (exact, from the planner) and a summary."""
    from .memory import load_config, meta_model, optimizer_state_bytes
    from .optim.registry import REGISTRY, ZEROTH_ORDER

    model = meta_model(load_config(LIST_MODEL))
    params = sum(p.numel() for p in model.parameters())
    width = max(len(name) for name in REGISTRY)
    print(f"{'name':<{width}}  B/param  (optimizer state on LLaMA-60M, fp32)")
    for name in sorted(REGISTRY):
        per_param = sum(optimizer_state_bytes(name, model).values()) / params
        print(f"{name:<{width}}  {per_param:7.2f}  {REGISTRY[name].summary}")
    for name in sorted(ZEROTH_ORDER):  # no gradients and no state; optim_args offload=ram|disk streams the blocks
        print(f"{name:<{width}}  {0.0:7.2f}  {ZEROTH_ORDER[name].summary}")
    print("\nAlso: any '<method>+<rule>[+<precision>]' (lowmem.composition_parts()) and any name + '_layerwise'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
