"""Non-layer-wise lowmem optimizers under ``torchrun --nproc_per_node=2`` (gloo, CPU): both ranks end with the same
parameters, equal to one process with the same global batch; a layer-wise name is refused with a clear error."""


import pytest
import torch
from ddp_worker import train
from torchrun import torchrun

NAMES = ["galore_adamw", "adam_mini", "adamw_8bit", "frugal"]
#: Where a last-bit difference in the reduced gradient can flip a discrete choice: an 8-bit code, or the sign in
#: FRUGAL's sign-SGD. Those elements may move by up to one step's size (the learning rate 1e-3, twice).
DISCRETE = {"adamw_8bit", "frugal"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("ddp_worker.py", 2, out, *NAMES, timeout=600)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_ranks_agree_and_equal_one_process(ddp_run, tmp_path, name):
    rank0 = torch.load(ddp_run / f"{name}-rank0.pt", weights_only=True)
    rank1 = torch.load(ddp_run / f"{name}-rank1.pt", weights_only=True)
    single = train(tmp_path, name, per_device=4)
    off, total = 0, 0
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
        difference = (value - single[key]).abs()
        off += int((difference > 2e-6).sum())
        total += difference.numel()
        assert difference.max() <= (2e-3 if name in DISCRETE else 2e-6), key
    assert off <= (1e-3 * total if name in DISCRETE else 0)


def test_layerwise_is_refused_under_ddp(ddp_run):
    message = (ddp_run / "layerwise-error-rank0.txt").read_text()
    assert "cannot run under DDP with 2 processes" in message and "Drop '_layerwise'" in message
