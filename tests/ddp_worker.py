"""Run by ``test_distributed.py`` under ``torchrun --nproc_per_node=2``: trains each named optimizer with the lowmem
Trainer (gloo on CPU, 2 sequences per rank), saves every rank's final parameters, and records the error a
layer-wise name gets under DDP."""

import os
import sys
from pathlib import Path

import torch
from trainer_helpers import StdlibText, args, small_options

from lowmem.example import tiny_llama
from lowmem.trainers import Trainer

STEPS = 4
DISTRIBUTED = {"ddp_backend": "gloo"} if "RANK" in os.environ else {}  # under torchrun


def train(out: Path, name: str, per_device: int) -> dict:
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2)
    a = args(out / name, optim=name, optim_args=small_options(name), per_device_train_batch_size=per_device,
             max_steps=STEPS, learning_rate=1e-3, **DISTRIBUTED)
    Trainer(model=model, args=a, train_dataset=StdlibText(32)).train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(out: Path, names: list[str]) -> None:
    rank = int(os.environ["RANK"])
    for name in names:
        torch.save(train(out, name, per_device=2), out / f"{name}-rank{rank}.pt")
    try:
        args(out / "layerwise", optim="galore_adamw_layerwise", optim_args="rank=8", ddp_backend="gloo")
    except ValueError as err:
        (out / f"layerwise-error-rank{rank}.txt").write_text(str(err))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
