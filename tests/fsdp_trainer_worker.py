"""Run by ``test_fsdp_trainer.py`` under ``torchrun``: the lowmem Trainer with ``fsdp=True`` (FSDP2, a sharded
checkpoint every 3 steps) trains the tiny LLaMA of ``fsdp_worker`` for 6 steps with each named optimizer (``train``),
or resumes that run from its step-3 checkpoint (``resume``). Rank 0 writes ``OUT/<phase>-w<world>.json``: per name
the logged losses and gradient norms, each rank's optimizer state bytes, and a float64 sum of every full parameter at
the end.
``NAME@accumulate`` takes each step as 2 micro-batches. Usage: ``fsdp_trainer_worker.py OUT PHASE NAME...``."""

import json
import os
import sys
import warnings
from pathlib import Path

import torch.distributed as dist
from fsdp_worker import small_llama
from trainer_helpers import StdlibText, args, losses, small_options
from transformers.trainer_utils import set_seed

from lowmem.trainers import Trainer

STEPS, SAVE_EVERY, GLOBAL_BATCH = 6, 3, 4
WORLD = int(os.environ.get("WORLD_SIZE", "1"))


def trainer_args(directory: Path, name: str, accumulate: int):
    # one subspace for the whole run: a refresh's SVD of gradients summed in another order may turn a singular vector
    # of this tiny model's nearly equal singular values (test_fsdp compares refreshes on equal gradients)
    options = {**small_options(name), **{key: 100 for key in small_options(name) if key.endswith("gap")}}
    if name.startswith("frugal_svd"):
        options["density"] = 1 / 16  # as in fsdp_worker: the default subspace holds this model's rounding noise
    options = ", ".join(f"{key}={value}" for key, value in options.items())
    sharded = {"fsdp": True, "fsdp_config": {"state_dict_type": "SHARDED_STATE_DICT"}} if WORLD > 1 else {}
    return args(directory, per_device_train_batch_size=GLOBAL_BATCH // WORLD // accumulate,
                gradient_accumulation_steps=accumulate, max_steps=STEPS, learning_rate=1e-3,
                logging_steps=1, save_strategy="steps", save_steps=SAVE_EVERY, optim=name, optim_args=options or None,
                **sharded)


def run(out: Path, phase: str, label: str) -> dict:
    set_seed(0)
    model = small_llama()
    name, _, mode = label.partition("@")
    directory = out / f"{label}-w{WORLD}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = StdlibText(GLOBAL_BATCH * STEPS)
        arguments = trainer_args(directory, name, 2 if mode == "accumulate" else 1)
        trainer = Trainer(model=model, args=arguments, train_dataset=data)
        resume = str(directory / f"checkpoint-{SAVE_EVERY}") if phase == "resume" else None
        trainer.train(resume_from_checkpoint=resume)
    optimizer = trainer._unwrapped_optimizer()
    sums = [float(getattr(p, "full_tensor", lambda p=p: p)().double().sum()) for p in trainer.model.parameters()]
    state_bytes = [optimizer.state_bytes()] * WORLD
    if WORLD > 1:
        dist.all_gather_object(state_bytes, optimizer.state_bytes())
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    return {"losses": losses(trainer), "grad_norms": norms, "state_bytes": state_bytes, "sums": sums}


def main(out: Path, phase: str, names: list[str]) -> None:
    results = {}
    for name in names:
        try:
            results[name] = run(out, phase, name)
        except Exception as err:  # recorded, so one name's failure names itself in the test
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / f"{phase}-w{WORLD}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
