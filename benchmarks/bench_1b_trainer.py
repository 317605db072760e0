"""A billion-parameter model trained through the lowmem Trainer on a CPU, measured as a user would see it: the
process's peak RSS against the bf16 weight bytes.

LLaMA-1.1B (TinyLlama's shape, ``bench_1b_cpu.TINYLLAMA``) built directly in bf16, batch 1 x 256 random tokens,
gradient checkpointing, ``lowmem.Trainer`` with the given optimizer names and its defaults (the loss without logits
included: ``--logits`` computes them, as before that default), a few steps; each name in its own process,
so each peak RSS is its own (it includes Python, torch and transformers themselves: about 0.5 GB). bf16 matrix
products run natively (this needs a CPU with AVX-512 BF16; without it see ``bench_1b_cpu.py``).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_1b_trainer.py [--optim apollo_mini_layerwise ...] [--steps 3]
[--optim-args weight_dtype=int8] [--logits] [--out results.jsonl]`` (``LOWMEM_MALLOC=default`` keeps glibc's own
malloc policy, see ``lowmem.allocator``).
"""

from __future__ import annotations

import argparse
import json
import os
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


def _high_water_mark() -> int:
    """This process's peak RSS in bytes since it started or since ``_reset_high_water_mark``."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as refs:  # Linux: "5" resets VmHWM to the current RSS
        refs.write("5")


def run(optim: str, steps: int, seq: int, optim_args: str | None = None, logits: bool = False) -> dict:
    """Train ``steps`` steps in this process; its peak RSS over the whole run and over the training steps alone
    (from the first step on: after the model was built and, with int8 weights, converted), the bf16 weight bytes
    and the seconds per step."""
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    from lowmem.optim.int8_weights import weight_bytes
    from lowmem.trainers import Trainer, TrainingArguments

    before_steps = []

    class StepPeak(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            before_steps.append(_high_water_mark())  # the peak so far: the model's build (and int8 conversion)
            _reset_high_water_mark()  # resets getrusage's ru_maxrss too

    torch.manual_seed(0)
    config = AutoConfig.for_model(**TINYLLAMA)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-4,
                                 gradient_checkpointing=True, optim=optim, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False,
                                 optim_args=optim_args, linear_cross_entropy=False if logits else None)
        start = time.time()
        trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(steps, seq, config.vocab_size),
                          callbacks=[StepPeak()])
        trainer.train()
        seconds = time.time() - start
    step_rss = _high_water_mark()
    rss = max([step_rss, *before_steps])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"optim": optim, "optim_args": optim_args, "steps": steps, "seq": seq, "weight_bytes": weights,
            "stored_weight_bytes": weight_bytes(model), "peak_rss": rss, "ratio": rss / weights,
            "step_peak_rss": step_rss, "step_ratio": step_rss / weights,
            "state_bytes": trainer._unwrapped_optimizer().state_bytes(), "seconds_per_step": seconds / steps,
            "losses": losses, "logits": logits,
            "malloc": os.environ.get("LOWMEM_MALLOC", "lowmem")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optim", nargs="+", default=["apollo_mini_layerwise", "galore_adamw_8bit_layerwise"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--optim-args", default=None, help="optim_args for every name, e.g. weight_dtype=int8")
    parser.add_argument("--logits", action="store_true", help="linear_cross_entropy=False: the model's own loss")
    parser.add_argument("--out", default=None, help="append each result as a JSON line to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run(args.optim[0], args.steps, args.seq, args.optim_args, args.logits)))
        return
    for optim in args.optim:
        extra = (["--optim-args", args.optim_args] if args.optim_args else []) + (["--logits"] if args.logits else [])
        child = subprocess.run([sys.executable, __file__, "--child", "--optim", optim, "--steps", str(args.steps),
                                "--seq", str(args.seq), *extra], capture_output=True, text=True, check=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{optim} {args.optim_args or ''}: peak RSS {result['peak_rss'] / 2**30:.2f} GiB = "
              f"{result['ratio']:.2f}x the bf16 weights ({result['weight_bytes'] / 2**30:.2f} GiB); during the steps "
              f"{result['step_peak_rss'] / 2**30:.2f} GiB = {result['step_ratio']:.2f}x; state "
              f"{result['state_bytes'] / 2**30:.3f} GiB, {result['seconds_per_step']:.1f} s/step, "
              f"losses {[round(x, 3) for x in result['losses']]}")
        if args.out:
            with open(args.out, "a") as file:
                file.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
