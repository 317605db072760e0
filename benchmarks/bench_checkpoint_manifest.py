"""What a trusted checkpoint costs: SHA-256 throughput on this machine, and the manifest's share of a real save and of
a resume's check (``lowmem.trainers.checkpoints``).

    .venv/bin/python benchmarks/bench_checkpoint_manifest.py [--mib 1024]

1. Hashes a ``--mib`` file of random bytes (``checkpoints.sha256``): GiB/s.
2. Saves a checkpoint of a small LLaMA (hidden 512, 8 layers, galore_adamw) through the lowmem Trainer, then times
   ``write_manifest`` and ``verify_files`` on it against the checkpoint's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lowmem.example import tiny_llama
from lowmem.trainers import Trainer, TrainingArguments
from lowmem.trainers.checkpoints import MANIFEST, read_manifest, sha256, verify_files, write_manifest


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        row = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": row, "labels": row}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        blob = Path(tmp) / "blob.bin"
        with open(blob, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        hashed = seconds(lambda: sha256(blob))
        blob.unlink()
        torch.manual_seed(0)
        model = tiny_llama(hidden=512, layers=8)
        training = TrainingArguments(output_dir=tmp, optim="galore_adamw", optim_args={"rank": 64}, max_steps=1,
                                     save_strategy="steps", save_steps=1, report_to=[], use_cpu=True,
                                     disable_tqdm=True, per_device_train_batch_size=2)
        Trainer(model=model, args=training, train_dataset=Tokens()).train()
        checkpoint = Path(tmp) / "checkpoint-1"
        size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST)
        record = json.loads((checkpoint / MANIFEST).read_text())["optimizer"]
        written = seconds(lambda: write_manifest(checkpoint, record))
        checked = seconds(lambda: verify_files(checkpoint, read_manifest(checkpoint)))
    gib = args.mib / 1024
    print(f"sha256: {gib:.2f} GiB in {hashed:.2f} s = {gib / hashed:.2f} GiB/s")
    print(f"checkpoint of a {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter LLaMA with galore_adamw "
          f"state: {size:,} bytes; manifest written in {written:.3f} s, checked on resume in {checked:.3f} s "
          f"({size / 2**30 / checked:.2f} GiB/s)")


if __name__ == "__main__":
    main()
