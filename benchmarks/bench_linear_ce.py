"""Linear + cross-entropy memory: ``lowmem.kernels.linear_cross_entropy`` (the pure-torch twin) against the unfused
``F.cross_entropy(F.linear(hidden, weight), labels)``, loss and backward, at Llama-3's vocabulary (128256) and 4096
tokens.

Peak live tensor bytes with MemTracker over the whole forward and backward, in total and beyond the tensors both
need anyway (hidden states, weight, and their gradients), and the time of each (fp32: this CPU's bf16 products are
too slow; the logits' bytes scale with the dtype alike). A crash or a non-finite loss stops it with an error.

Then a whole training step of a LLaMA with Llama 3's vocabulary (hidden 256, 2 layers, 2 x 512 tokens, fp32, AdamW),
plain and patched (``TrainingArguments.linear_cross_entropy``: ``kernels.model_patch``): MemTracker's peak
(``memory.measure_peak``) beside the planner's (``memory.peak_bytes``).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_linear_ce.py --out benchmarks/results`` (about 3 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowmem import memory
from lowmem.kernels.linear_ce import linear_cross_entropy
from lowmem.memory import forward_peak_bytes

#: The model of the training-step table: Llama 3's vocabulary on a small decoder, so the loss dominates.
STEP_CONFIG = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128256, tie_word_embeddings=False,
                   max_position_embeddings=1024)


def unfused(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight), labels)


def measure(fn, args) -> tuple[int, float, float]:
    """Peak live bytes (MemTracker), seconds and loss of one forward + backward of ``fn``."""
    gen = torch.Generator().manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False)
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=gen)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen, requires_grad=True)
    labels = torch.randint(args.vocab, (args.tokens,), generator=gen)
    result = {}

    def run(fresh):
        start = time.perf_counter()
        loss = fn(hidden, head.weight, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{fn.__name__}: the loss is {loss.item()}")
        loss.backward()
        result.update(seconds=time.perf_counter() - start, loss=loss.item())
        hidden.grad = head.weight.grad = None
    peak = forward_peak_bytes(head, run, steps=1)
    return peak, result["seconds"], result["loss"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    both = 2 * 4 * (args.vocab * args.hidden + args.tokens * args.hidden)  # weight, hidden and their gradients
    header = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; fp32, vocab {args.vocab}, {args.tokens} tokens, hidden "
              f"{args.hidden}; weight + hidden + their gradients: {both / 2**20:.0f} MiB")
    rows = {name: measure(fn, args) for name, fn in (("unfused", unfused), ("lowmem", linear_cross_entropy))}
    lines = [header, "", "| loss | peak live | beyond weight, hidden and gradients | s | loss value |",
             "|---|---:|---:|---:|---:|"]
    for name, (peak, seconds, loss) in rows.items():
        lines.append(f"| {name} | {peak / 2**20:.0f} MiB | {(peak - both) / 2**20:.0f} MiB | {seconds:.1f} | "
                     f"{loss:.6f} |")
    extra = {name: peak - both for name, (peak, _, _) in rows.items()}
    lines.append(f"\nPeak {rows['unfused'][0] / rows['lowmem'][0]:.2f}x lower in total, "
                 f"{extra['unfused'] / extra['lowmem']:.1f}x lower beyond the tensors both need.")
    steps = training_steps()
    lines += ["", "Training step (LLaMA, hidden 256, 2 layers, vocab 128256, 2 x 512 tokens, fp32, AdamW):", "",
              "| loss | measured peak | planned peak | planned / measured |", "|---|---:|---:|---:|"]
    for name, (measured, planned) in steps.items():
        lines.append(f"| {name} | {measured / 2**20:.1f} MiB | {planned / 2**20:.1f} MiB | {planned / measured:.4f} |")
    lines.append(f"\nThe patched step peaks {steps['plain'][0] / steps['linear_cross_entropy'][0]:.2f}x lower.")
    text = "\n".join(lines)
    print(text)
    (args.out / "linear_ce.md").write_text(text + "\n")
    (args.out / "linear_ce.json").write_text(json.dumps({"header": header, "rows": rows, "shared_bytes": both,
                                                         "training_steps": steps}))


def training_steps() -> dict[str, tuple[int, int]]:
    """(measured, planned) peak bytes of a training step, plain and with the loss without logits."""
    config = memory.load_config(STEP_CONFIG)
    out = {}
    for name, patched in (("plain", False), ("linear_cross_entropy", True)):
        measured = memory.measure_peak(config, "adamw", 2, 512, linear_ce=patched)["Total"]
        planned = memory.peak_bytes(memory.meta_model(config), "adamw", 2, 512, linear_ce=patched).total
        out[name] = (measured, planned)
    return out


if __name__ == "__main__":
    main()
