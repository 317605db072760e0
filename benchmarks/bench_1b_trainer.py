"""A billion-parameter model trained through the lowmem Trainer on a CPU, measured as a user would see it: the
process's peak RSS against the bf16 weight bytes.

LLaMA-1.1B (TinyLlama's shape, ``bench_1b_cpu.TINYLLAMA``) built directly in bf16, batch 1 x 256 random tokens,
gradient checkpointing, ``lowmem.Trainer`` with the given optimizer names, a few steps; each name in its own process,
so each peak RSS is its own (it includes Python, torch and transformers themselves: about 0.5 GB). bf16 matrix
products run natively (this needs a CPU with AVX-512 BF16; without it see ``bench_1b_cpu.py``).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_1b_trainer.py [--optim apollo_mini_layerwise ...] [--steps 3]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.bench_1b_cpu import TINYLLAMA


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, rows: int, seq: int, vocab: int):
        self.ids = torch.randint(vocab, (rows, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(optim: str, steps: int, seq: int) -> dict:
    """Train ``steps`` steps in this process; its peak RSS, the bf16 weight bytes and the seconds per step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem.trainers import Trainer, TrainingArguments

    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINYLLAMA)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-4,
                                 gradient_checkpointing=True, optim=optim, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False)
        start = time.time()
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(steps, seq, config.vocab_size))
        trainer.train()
        seconds = time.time() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"optim": optim, "steps": steps, "seq": seq, "weight_bytes": weights, "peak_rss": rss,
            "ratio": rss / weights, "seconds_per_step": seconds / steps, "losses": losses}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optim", nargs="+", default=["apollo_mini_layerwise", "galore_adamw_8bit_layerwise"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run(args.optim[0], args.steps, args.seq)))
        return
    for optim in args.optim:
        child = subprocess.run([sys.executable, __file__, "--child", "--optim", optim, "--steps", str(args.steps),
                                "--seq", str(args.seq)], capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{optim}: peak RSS {result['peak_rss'] / 2**30:.2f} GiB = {result['ratio']:.2f}x the bf16 weights "
              f"({result['weight_bytes'] / 2**30:.2f} GiB), {result['seconds_per_step']:.1f} s/step, "
              f"losses {[round(x, 3) for x in result['losses']]}")


if __name__ == "__main__":
    main()
