"""The ``lowmem`` command: ``lowmem train RECIPE [key=value ...]``, ``lowmem plan MODEL``, ``lowmem bench`` and
``lowmem list``.

A mistake in the user's input prints one line (``lowmem: error: ...``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: The model ``lowmem list`` prices every optimizer on: the GaLore paper's LLaMA-60M.
LIST_MODEL = dict(model_type="llama", hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, vocab_size=32000)
DESCRIPTION = ("Low-memory training with the Hugging Face Trainer: train a recipe, plan what fits on a card, list "
               "the optimizers, benchmark them against their reference packages.")
TRAIN_HELP = "train a recipe (a YAML path or a bundled name such as cpu-tiny)"
PLAN_HELP = ("what fits on a card: the GiB of weights, gradients, optimizer state, activations and logits for every "
             "optimizer and mode, and the command to run")
LIST_HELP = "every optimizer name with its optimizer-state bytes per parameter and a summary"
BENCH_HELP = ("quick benchmark against the reference packages: state bytes per parameter and step-time ratios on "
              "LLaMA-130M-shaped weights")


def main(argv: list[str] | None = None) -> int:
    from .quiet import quiet

    quiet()  # bitsandbytes only when used; no peft deprecation warning
    parser = argparse.ArgumentParser(prog="lowmem", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help=TRAIN_HELP, description=TRAIN_HELP + ".")
    train.add_argument("recipe", help="a recipe YAML, or the name of a bundled one such as cpu-tiny (a wrong name "
                                      "lists them all)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override recipe keys, e.g. max_steps=50 optim=apollo_mini output_dir=out/mine")
    plan = commands.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP + ".")
    plan.add_argument("model", help="a config JSON, a model directory or a Hub id (only the config is read)")
    plan.add_argument("--seq", type=int, default=1024, help="tokens per sequence (default 1024)")
    plan.add_argument("--batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    plan.add_argument("--card-gib", type=float, default=24.0, help="the card's memory in GiB (default 24)")
    plan.add_argument("--bf16", action="store_true", help="weights in bf16 (pure_bf16) instead of fp32")
    plan.add_argument("--gpus", type=int, default=1, help="GPUs FSDP2 shards the model over (default 1): the peak "
                      "per GPU, each taking --batch sequences")
    plan.add_argument("--linear-ce", action=argparse.BooleanOptionalAction, default=None,
                      help="price the loss without logits (recipe key linear_cross_entropy); default: on for LLaMA, "
                           "Qwen2 and Mistral, the architectures it supports")
    plan.add_argument("--offload-states", action="store_true",
                      help="optimizer states in CPU memory, streamed through the GPU a parameter at a time "
                           "(optim_args offload_states=true)")
    plan.add_argument("--dense-rule", choices=["adam_mini"], default=None,
                      help="the rule of the tensors a low-rank name does not project (optim_args dense_rule=adam_mini: "
                           "one second moment per token of the embedding and head)")
    plan.add_argument("--int8-weights", action="store_true",
                      help="the projected linears' weights in int8 (optim_args weight_dtype=int8; low-rank names only)")
    listing = commands.add_parser("list", help=LIST_HELP, description=LIST_HELP + ".")
    listing.add_argument("names", nargs="*", metavar="name",
                         help="price these names only (any name, e.g. galore+came+8bit or apollo_mini_layerwise)")
    bench = commands.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP + ".")
    bench.add_argument("--layers", type=int, default=1, help="LLaMA-130M layers (default 1; the full model has 12)")
    bench.add_argument("--vocab", type=int, default=8000, help="vocabulary (default 8000; LLaMA-130M's is 32000)")
    bench.add_argument("--rank", type=int, default=128, help="the low-rank methods' rank (default 128)")
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
        return _list(args.names)
    except (ValueError, FileNotFoundError) as err:
        print(f"lowmem: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whoever wrote it
        return 2


def _train(name: str, overrides: list[str]) -> int:
    from .recipe import adapt_overrides, parse_recipe, read_values, recipe_path
    from .train import run

    path = recipe_path(name)
    values = read_values(path, overrides)
    notes = adapt_overrides(read_values(path), values)
    recipe = parse_recipe(values)
    for note in notes + recipe.notes:
        print(f"lowmem: {note}", file=sys.stderr)
    report = run(recipe)
    if int(os.environ.get("RANK", "0")):
        return 0  # launched by torchrun: the first process reports
    mib = 2**20
    state = report["optimizer_state_bytes"]
    print(f"parameters: {report['parameters']:,} ({report['trainable_parameters']:,} trained); optimizer state: "
          f"{state:,} bytes ({state / mib:.1f} MiB); peak RSS {report['peak_rss_bytes'] / mib:.0f} MiB"
          + (f"; peak CUDA {report['cuda_max_allocated_bytes'] / mib:.0f} MiB" if "cuda_max_allocated_bytes" in report
             else ""))
    out = recipe.train.output_dir
    plotted = ", loss.png" if (Path(out) / "loss.png").is_file() and recipe.method.plot_loss else ""
    unplotted = "" if plotted or not recipe.method.plot_loss else \
        f"; no loss.png: no loss was logged (logging_steps={recipe.train.logging_steps})"
    print(f"saved to {out} (model, memory.json{plotted}){unplotted}")
    if "optimizer_state_bytes_per_process" in report:
        print("per process: optimizer state " + ", ".join(f"{b:,}" for b in report["optimizer_state_bytes_per_process"])
              + " bytes; parameters " + ", ".join(f"{b:,}" for b in report["parameter_bytes_per_process"]) + " bytes")
    return 0


def _plan(args) -> int:
    from .checks import POSITIVE, POSITIVE_INT, Bound
    from .kernels.model_patch import LINEAR_CE_MODEL_TYPES
    from .memory import format_plan, load_config, plan, recipe_command, recommend

    for flag, value, bound in (("--gpus", args.gpus, POSITIVE_INT), ("--batch", args.batch, POSITIVE_INT),
                               ("--seq", args.seq, Bound(int, 2)), ("--card-gib", args.card_gib, POSITIVE)):
        bound.check(flag, value)
    config = load_config(args.model)  # read once (a hub id is a download)
    linear_ce = args.linear_ce if args.linear_ce is not None else config.model_type in LINEAR_CE_MODEL_TYPES
    int8 = {"weight_dtype": "int8"} if args.int8_weights else {}
    offload = {"offload_states": True} if args.offload_states else {}
    dense = {"dense_rule": args.dense_rule} if args.dense_rule else {}
    rows = plan(config, args.seq, args.batch, args.card_gib, "bf16" if args.bf16 else "fp32", linear_ce=linear_ce,
                gpus=args.gpus, **int8, **offload, **dense)
    best = recommend(rows)
    command = recipe_command(best, args.model, args.seq, args.batch, args.bf16, linear_ce, config,
                             optim_options={**int8, **offload, **dense}) if best else ""
    if command and args.gpus > 1:
        command, _, note = command.partition("   (")
        command = command.replace("lowmem train", f"torchrun --nproc_per_node={args.gpus} -m lowmem.cli train", 1)
        command += " fsdp=true" + (f"   ({note}" if note else "")
        print(f"(per GPU over {args.gpus} GPUs, FSDP2: full-parameter rows without checkpointing)")
    if linear_ce:
        print("(the loss without logits: linear_cross_entropy; --no-linear-ce prices the plain loss)")
    if int8:
        print("(int8 weights: the projected linears' weights in int8, weight_dtype=int8; low-rank names only)")
    if offload:
        print("(offloaded states: one parameter's optimizer states on the GPU at a time, the rest in CPU memory)")
    if dense:
        print("(dense_rule=adam_mini: the embedding, head and norms under Adam-mini, one second moment per row)")
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


def _list(names: list[str] | None = None) -> int:
    """Every name (or ``names``: any, composed ones too), its optimizer-state bytes per parameter on LLaMA-60M
    (exact, from the planner) over the whole model and over its attention and MLP weights, and a summary."""
    from .memory import load_config, meta_model, optimizer_state_bytes
    from .optim.registry import REGISTRY, ZEROTH_ORDER, get_spec
    from .optim.targets import split_parameters

    model = meta_model(load_config(LIST_MODEL))
    params = sum(p.numel() for p in model.parameters())
    linear = {name: p.numel() for name, p in split_parameters(model).targets}
    names = names or sorted(REGISTRY) + sorted(ZEROTH_ORDER)
    specs = {name: get_spec(name) for name in names}  # an unknown name fails before anything is printed
    width = max(len(name) for name in names)
    print(f"Optimizer-state bytes per parameter of LLaMA-60M (fp32): 'model' over all {params / 1e6:.1f}M "
          f"parameters, 'linear' over the {sum(linear.values()) / 1e6:.1f}M of its attention and MLP weights, the "
          "ones low-rank methods project (the embeddings, head and norms take an unprojected update).")
    print(f"\n{'name':<{width}}   model  linear  summary")
    for name, spec in specs.items():
        state = {} if spec.zeroth_order else optimizer_state_bytes(name, model)  # MeZO: no state
        per_linear = sum(state.get(n, 0) for n in linear) / sum(linear.values())
        print(f"{name:<{width}}  {sum(state.values()) / params:6.2f}  {per_linear:6.2f}  {spec.summary}")
    print("\nAlso: any '<method>+<rule>[+<precision>]' (lowmem.composition_parts(); lowmem list galore+came+8bit "
          "prices one) and any name + '_layerwise'.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
