"""Same recipe, same seed: the same model, bit for bit, on CPU."""

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


def test_cpu_tiny_twice_with_one_seed_gives_identical_weights(tmp_path):
    first = train_cpu_tiny(tmp_path / "a")
    torch.rand(7)  # the global generator's state left by the first run must not matter
    second = train_cpu_tiny(tmp_path / "b")
    assert first.keys() == second.keys()
    differ = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differ, f"{len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}"
