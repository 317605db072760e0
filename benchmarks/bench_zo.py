"""Zeroth-order memory and speed: MeZO's peak against inference of the same batch, and offloaded MeZO's resident
weights and throughput against plain MeZO.

For one LLaMA (random weights, random tokens), each measured with ``MemTracker`` (live tensor bytes, the peak of the
last of ``--steps`` steps):

* inference: the loss of the batch under ``torch.no_grad`` in eval mode;
* MeZO: a whole step (two perturbed forwards and the update);
* offloaded MeZO, blocks in RAM and on disk (safetensors): a whole step with the dual forward; plus the streamer's
  own count of block bytes on the device at once, against (blocks in flight) x block bytes;
* throughput: tokens per second of each MeZO form, repeats interleaved.

On this CPU the compute device is the CPU itself, so "resident" means materialized: a RAM store's blocks are in RAM
anyway; a disk store's blocks are read from their files when their turn comes, so the process really holds only the
blocks in flight (that is the figure a GPU run would show on the device).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_zo.py --out benchmarks/results`` (a few minutes). A crash or
a non-finite loss stops it with an error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from lowmem.memory import forward_peak_bytes
from lowmem.optim.zo import MeZO, pair_loss

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq, use_cache=False)
    return transformers.AutoModelForCausalLM.from_config(config).to(DTYPES[args.dtype])


def _untracked(fn):
    """``fresh`` for the timed runs, outside MemTracker: the closure as it is."""
    return fn


def checked(loss) -> float:
    value = float(loss if not isinstance(loss, tuple) else sum(loss) / 2)
    if not abs(value) < float("inf"):
        raise FloatingPointError(f"non-finite loss {value}")
    return value


def forms(args, tmp: Path):
    """name -> (model, optimizer or None, the call that runs one step)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": tokens, "labels": tokens}
    out = {}
    model = build(args)

    def inference(fresh=_untracked, model=model):
        model.eval()
        with torch.no_grad():
            checked(fresh(lambda: model(**batch).loss)())
    out["inference"] = (model, None, inference)
    model = build(args)
    opt = MeZO(model, lr=1e-6, zo_eps=1e-3)
    out["mezo"] = (model, opt, lambda fresh=_untracked, model=model, opt=opt:
                   checked(opt.step(fresh(lambda: model(**batch).loss))))
    for store in ("ram", "disk"):
        model = build(args)
        where = str(tmp / store) if store == "disk" else None
        opt = MeZO(model, lr=1e-6, zo_eps=1e-3, offload=store, offload_dir=where)
        out[f"mezo offload={store}"] = (model, opt, lambda fresh=_untracked, model=model, opt=opt:
                                        checked(opt.step(fresh(lambda: pair_loss(model, batch)))))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--steps", type=int, default=2, help="steps per memory measurement (the last is reported)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per form, interleaved")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = forms(args, Path(tmp))
        weights = sum(p.numel() * p.element_size() for p in runs["inference"][0].parameters())
        header = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads. LLaMA hidden {args.hidden}, {args.layers} layers, vocab "
                  f"{args.vocab} ({weights / 2**20:.1f} MiB of {args.dtype} weights); batch {args.batch} x {args.seq}")
        print(header, flush=True)
        peaks = {name: forward_peak_bytes(model, run, args.steps) for name, (model, _, run) in runs.items()}
        times = {name: [] for name in runs if name != "inference"}
        for _ in range(args.repeats):
            for name in times:
                start = time.perf_counter()
                runs[name][2]()
                times[name].append(time.perf_counter() - start)
        streamers = {name: opt.streamer for name, (_, opt, _) in runs.items() if opt is not None and opt.streamer}
    tokens = args.batch * args.seq
    lines = [header, "", "| run | peak live | x inference | s/step (median) | tokens/s | vs plain MeZO |",
             "|---|---:|---:|---:|---:|---:|"]
    plain = statistics.median(times["mezo"])
    for name, peak in peaks.items():
        t = statistics.median(times[name]) if name in times else None
        lines.append(f"| {name} | {peak / 2**20:.1f} MiB | {peak / peaks['inference']:.3f} | "
                     + (f"{t:.2f} | {tokens / t:.0f} | {plain / t:.2f}x |" if t else "| | |"))
    lines += ["", "| offloaded | block bytes | blocks on the device at most | peak block bytes | bound: 3 blocks | "
              "weights kept on the device (embeddings, head, norms) |", "|---|---:|---:|---:|---:|---:|"]
    for name, streamer in streamers.items():
        block = max(streamer.block_bytes)
        lines.append(f"| {name} | {block / 2**20:.2f} MiB | {streamer.peak_resident_bytes / block:.0f} | "
                     f"{streamer.peak_resident_bytes / 2**20:.2f} MiB | {3 * block / 2**20:.2f} MiB | "
                     f"{streamer.resident_bytes() / 2**20:.2f} MiB |")
    text = "\n".join(lines)
    print(text)
    (args.out / "zo.md").write_text(text + "\n")
    (args.out / "zo.json").write_text(json.dumps({
        "header": header, "peak_live_bytes": peaks, "seconds": times, "weights_bytes": weights,
        "streamers": {name: {"block_bytes": s.block_bytes, "peak_resident_bytes": s.peak_resident_bytes,
                             "resident_bytes": s.resident_bytes()} for name, s in streamers.items()}}, indent=1))


if __name__ == "__main__":
    main()
