"""What the Trainer tests share: a real text dataset, short-run arguments, the logged losses."""

import torch

from lowmem.example import batches, stdlib_bytes
from lowmem.optim.registry import get_spec
from lowmem.trainers import TrainingArguments


class StdlibText(torch.utils.data.Dataset):
    """Byte-level 128-token windows of the standard library's source (the corpus of ``lowmem.example``)."""

    def __init__(self, n: int = 96):
        gen = torch.Generator().manual_seed(0)
        chunks = next(batches(stdlib_bytes(), batch=n, seq=128, generator=gen))
        self.rows = [{"input_ids": row, "labels": row} for row in chunks]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=20, learning_rate=3e-3,
                logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def small_options(name: str) -> dict:
    """Ranks that fit a 64-wide model, and subspaces that move within a short run."""
    options = get_spec(name).options()
    small = {}
    if options.get("rank", 0) > 1:
        small["rank"] = 8
    for gap in ("update_proj_gap", "update_gap"):
        if gap in options:
            small[gap] = 2
    return small
