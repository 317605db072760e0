"""lowmem optimizers under DDP (``torchrun --nproc_per_node=2``, gloo, CPU): both ranks end with the same
parameters, equal to one process with the same global batch. Layer-wise ones update inside backward as each DDP
bucket's all-reduce completes: also with gradient accumulation, logging the real grad_norm, and resuming bit-exactly."""


import pytest
import torch
from ddp_worker import run
from torchrun import torchrun

LAYERWISE = ["galore_adamw_layerwise", "adamw_layerwise", "frugal_layerwise", "apollo_mini_layerwise",
             "galore_adamw_layerwise@accumulate", "galore_adamw_layerwise@resume"]
NAMES = ["galore_adamw", "adam_mini", "adamw_8bit", "frugal", *LAYERWISE]
#: Where a last-bit difference in the reduced gradient can flip a discrete choice: an 8-bit code, or the sign in
#: FRUGAL's sign-SGD. Those elements may move by up to one step's size (the learning rate 1e-3, twice).
DISCRETE = {"adamw_8bit", "frugal", "frugal_layerwise"}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun("ddp_worker.py", 2, out, *NAMES, timeout=600)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_ranks_agree_and_equal_one_process(ddp_run, tmp_path, name):
    rank0 = torch.load(ddp_run / f"{name}-rank0.pt", weights_only=True)["params"]
    rank1 = torch.load(ddp_run / f"{name}-rank1.pt", weights_only=True)["params"]
    single = run(tmp_path, name, per_device=4)["params"]
    off, total = 0, 0
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
        difference = (value - single[key]).abs()
        off += int((difference > 2e-6).sum())
        total += difference.numel()
        assert difference.max() <= (2e-3 if name in DISCRETE else 2e-6), key
    assert off <= (1e-3 * total if name in DISCRETE else 0)


@pytest.mark.parametrize("name", [name for name in LAYERWISE if "@" not in name])
def test_layerwise_under_ddp_logs_the_real_gradient_norm(ddp_run, tmp_path, name):
    """The norm of the all-reduced gradients each step, as one process with the whole batch logs it. (With
    accumulation one process counts a GaLore weight's projected sum between refreshes; DDP reduces the full sum.)"""
    logged = torch.load(ddp_run / f"{name}-rank0.pt", weights_only=True)["grad_norms"]
    single = run(tmp_path, name, per_device=4)["grad_norms"]
    assert len(logged) == len(single) > 0 and all(n > 0 for n in logged)
    assert logged == pytest.approx(single, rel=1e-5)


def test_layerwise_under_ddp_resumes_bit_exactly(ddp_run):
    """Stopped at step 2 and resumed from the checkpoint, the run ends where the one that never stopped ends."""
    resumed = torch.load(ddp_run / "galore_adamw_layerwise@resume-rank0.pt", weights_only=True)["params"]
    straight = torch.load(ddp_run / "galore_adamw_layerwise-rank0.pt", weights_only=True)["params"]
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_layerwise_in_several_processes_without_ddp_is_refused(ddp_run):
    message = (ddp_run / "unreduced-rank0.txt").read_text()
    assert message.startswith("layer-wise updates in 2 processes need the gradients reduced first"), message
    assert "optimizer.layerwise.attach(ddp_model)" in message
