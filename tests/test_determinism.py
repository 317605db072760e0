"""Same recipe, same seed: the same model, bit for bit, on CPU."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lowmem import cli

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

#: cpu-tiny shortened to a few seconds: 20 steps on the first 200 kB of the standard library.
SHORT = ["max_steps=20", "max_bytes=200000", "logging_steps=10", "save_strategy=no", "plot_loss=false"]


def train_cpu_tiny(out) -> dict[str, torch.Tensor]:
    """The weights ``lowmem train cpu-tiny`` (shortened) leaves in ``out``."""
    assert cli.main(["train", "cpu-tiny", *SHORT, f"output_dir={out}"]) == 0
    return load_file(out / "model.safetensors")


def train_cpu_tiny_in_another_process(out) -> dict[str, torch.Tensor]:
    """The same in a fresh interpreter with another hash seed (per-process sources: torch's own random seed, string
    hashing), at the suite's one intra-op thread."""
    code = ("import sys, torch; torch.set_num_threads(1); from lowmem import cli; "
            f"sys.exit(cli.main(['train', 'cpu-tiny', *{SHORT!r}, 'output_dir={out}']))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return load_file(out / "model.safetensors")


def test_cpu_tiny_twice_with_one_seed_gives_identical_weights(tmp_path):
    first = train_cpu_tiny(tmp_path / "a")
    torch.rand(7)  # the global generator's state left by the first run must not matter
    second = train_cpu_tiny(tmp_path / "b")
    third = train_cpu_tiny_in_another_process(tmp_path / "c")
    assert first.keys() == third.keys()
    assert all(torch.equal(first[name], third[name]) for name in first), "another process trained other weights"
    assert first.keys() == second.keys()
    differ = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differ, f"{len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}"
