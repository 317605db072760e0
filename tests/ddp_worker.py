"""Run by ``test_distributed.py`` under ``torchrun --nproc_per_node=2``: trains each named optimizer with the lowmem
Trainer (gloo on CPU, 2 sequences per rank per step) and saves every rank's final parameters and logged gradient
norms. ``NAME@accumulate`` takes each step as 2 micro-batches of 1 sequence; ``NAME@resume`` saves a checkpoint at
step 2 and resumes a new Trainer from it."""

import os
import sys
from pathlib import Path

import torch
from trainer_helpers import StdlibText, args, small_options

from lowmem.example import tiny_llama
from lowmem.trainers import Trainer

STEPS = 4
DISTRIBUTED = {"ddp_backend": "gloo"} if "RANK" in os.environ else {}  # under torchrun


def train(out: Path, name: str, per_device: int, accumulate: int = 1, resume: bool = False) -> dict:
    """Final parameters and the logged grad_norm of a short run (resumed from its step-2 checkpoint if asked)."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2)
    saving = {"save_strategy": "steps", "save_steps": 2} if resume else {}
    a = args(out / name, optim=name, optim_args=small_options(name), per_device_train_batch_size=per_device,
             gradient_accumulation_steps=accumulate, max_steps=STEPS, learning_rate=1e-3, logging_steps=1,
             **saving, **DISTRIBUTED)
    trainer = Trainer(model=model, args=a, train_dataset=StdlibText(32))
    trainer.train()
    if resume:
        torch.manual_seed(1)  # other initial weights: all that is reused comes from the checkpoint
        model = tiny_llama(hidden=64, layers=2)
        trainer = Trainer(model=model, args=a, train_dataset=StdlibText(32))
        trainer.train(resume_from_checkpoint=str(out / name / "checkpoint-2"))
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "grad_norms": norms}


def run(out: Path, label: str, per_device: int) -> dict:
    """``label`` is NAME, NAME@accumulate or NAME@resume (see the module doc)."""
    name, _, mode = label.partition("@")
    if mode == "accumulate":
        return train(out / label, name, per_device // 2, accumulate=2)
    return train(out / label, name, per_device, resume=mode == "resume")


def unreduced_error() -> str:
    """What a layer-wise optimizer says when its model is not wrapped in DDP in a multi-process run."""
    import lowmem

    model = tiny_llama(hidden=64, layers=2)
    lowmem.create_optimizer("galore_adamw_layerwise", model, rank=8)
    batch = StdlibText(1)[0]["input_ids"][None]
    try:
        model(input_ids=batch, labels=batch).loss.backward()
    except ValueError as err:
        return str(err)
    return "no error"


def main(out: Path, labels: list[str]) -> None:
    rank = int(os.environ["RANK"])
    for label in labels:
        torch.save(run(out, label, per_device=2), out / f"{label}-rank{rank}.pt")
    (out / f"unreduced-rank{rank}.txt").write_text(unreduced_error())


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
