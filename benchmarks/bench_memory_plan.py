"""Validate the memory planner: ``lowmem.memory.peak_bytes`` (formulas on a meta model) against the peak that
``MemTracker`` measures during a real training step (``lowmem.memory.measure_peak``), on CPU.

LLaMAs from the GaLore repo's configs (random weights, fp32, untied, batch 1 x 256 random tokens); the 8-bit
optimizers run their eager path (the one a GPU runs; the planner models it). Prints a markdown table.

LoRA rows put peft LoRA (r 16) on every linear layer; QLoRA rows load the base through bitsandbytes in 4 bits
(nf4, double quantization) first.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_memory_plan.py [--models 60m 100m] [--seq 256]
[--adapters-only]``.
"""

import argparse
import time

import torch
from transformers import LlamaConfig

from lowmem import memory
from lowmem.kernels import adam_8bit

CONFIGS = {  # GaLore's llama_60m.json and llama_100m.json (vocab and pad fixed as the recipes do)
    "60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, vocab_size=32000),
    "100m": dict(hidden_size=640, intermediate_size=1708, num_hidden_layers=12, num_attention_heads=10,
                 vocab_size=32100),
}
MODES = [("adamw", False, None), ("adamw", True, None), ("galore_adamw", False, None),
         ("galore_adamw_layerwise", False, None), ("apollo_mini_layerwise", True, None), ("adam_mini", False, None),
         ("adamw_8bit", False, None), ("came_8bit", False, None),
         ("adamw", False, "lora"), ("adamw", True, "lora"), ("adamw", False, "qlora"), ("adamw", True, "qlora")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--adapters-only", action="store_true", help="only the LoRA / QLoRA rows")
    args = ap.parse_args()
    torch.set_num_threads(2)
    adam_8bit.set_enabled(False)
    print(f"torch {torch.__version__}, batch {args.batch} x {args.seq}, fp32, MemTracker peak of step 2\n")
    print("| model | params | optimizer | checkpointing | measured B | predicted B | error | predicted phase |")
    print("|---|---:|---|---|---:|---:|---:|---|")
    start = time.time()
    for size in args.models:
        config = LlamaConfig(**CONFIGS[size], tie_word_embeddings=False)
        params = sum(p.numel() for p in memory.meta_model(config).parameters())
        for name, ckpt, adapters in MODES:
            if args.adapters_only and adapters is None:
                continue
            lora, quantized = memory.LORA if adapters else None, adapters == "qlora"
            measured = memory.measure_peak(config, name, args.batch, args.seq, ckpt, lora=lora,
                                           quantized=quantized)["Total"]
            est = memory.peak_bytes(memory.meta_model(config, lora=lora), name, args.batch, args.seq, ckpt,
                                    quantized=quantized)
            label = name + memory.ADAPTER_LABELS[adapters]
            print(f"| {size} | {params:,} | {label} | {'yes' if ckpt else 'no'} | {measured:,} | {est.total:,} | "
                  f"{est.total / measured - 1:+.1%} | {est.phase} |", flush=True)
    print(f"\nwall time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
