"""Every registered name on FSDP2-sharded parameters (``fully_shard``, DTensors sharded on dim 0) under
``torchrun --nproc_per_node=2`` with gloo on CPU: the same math as one process holding the whole tensors, state held
about half per rank, and what does not run sharded refused with one clear line."""

import json

import pytest
import torch
from fsdp_worker import run_options, small_llama
from torchrun import torchrun

import lowmem
from lowmem.memory import optimizer_state_bytes, sharded_peak_bytes
from lowmem.optim.registry import get_spec
from lowmem.trainers import TrainingArguments

#: BAdam runs in one process (refused on several: test_parity_badam).
NAMES = [name for name in lowmem.available_optimizers() if not get_spec(name).single_process]
#: Where a last-bit difference (an all-reduced sum in a sharded reduction) can flip a discrete choice: an 8-bit
#: code, the sign of a sign-SGD residual, or Adam's sign-like first step after FRUGAL resets its statistics. Such an
#: element moves by one step; at most this share of the elements may.
DISCRETE = {name for name in NAMES if "8bit" in name or name.startswith("frugal_svd")}
FLIPPED_SHARE = 5e-3
#: Elementwise states are split exactly in two; the rest keep some tensors whole on every rank (a projector's r x n
#: factor, a low-rank side's r x n moments, a factored moment's column statistics).
HALVED = {"adamw", "adamw_8bit", "adam_mini", "adam_mini_8bit", "frugal", "frugal_8bit"}
FACTORED = {"adafactor", "galore_adafactor", "galore_adafactor_8bit"}
#: Built on the unsharded model, then given the sharded parameters, as accelerate's FSDP2 preparation does.
SWAPPED = ["swap:apollo_mini", "swap:galore_adamw", "swap:adamw_8bit"]
#: Names whose per-GPU peak the planner is checked on (a plain, a low-rank, an 8-bit, a factored and a layer-wise one).
PEAKS = ["adamw", "galore_adamw", "adamw_8bit", "came", "apollo_mini_layerwise"]
#: 8-bit AdamW moments over a chunk size update a chunk at a time in one process; sharded ones update whole.
CHUNKED = ["chunk:adamw_8bit", "chunk:galore_adamw_8bit"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun("fsdp_worker.py", 2, out, *NAMES, *SWAPPED, "swap:galore_adamw_layerwise", *CHUNKED,
             *(f"layerwise:{name}" for name in NAMES), *(f"peak:{name}" for name in PEAKS))
    return json.loads((out / "fsdp-2.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_sharded_steps_equal_one_process(fsdp_run, name):
    result = fsdp_run[name]
    assert "error" not in result, result.get("error")
    worst = max(result["worst"])
    assert not result["pending"], f"state kept with an unreduced (Partial) placement: {result['pending']}"
    if name in DISCRETE:
        assert result["off"] <= FLIPPED_SHARE, result
    else:
        assert worst <= 1e-5 and result["off"] == 0, result


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_about_half_the_state(fsdp_run, name):
    result = fsdp_run[name]
    rank0, rank1 = result["state_bytes"]
    ratio = rank0 / result["reference_bytes"]
    assert rank0 == rank1
    if name in HALVED:
        assert 0.499 <= ratio <= 0.501, ratio
    elif name not in FACTORED:
        assert ratio <= 0.66, ratio
    else:
        assert ratio < 1.0, ratio


@pytest.mark.parametrize("name", PEAKS)
def test_the_planned_peak_per_gpu_is_within_ten_percent_of_the_measured_one(fsdp_run, name):
    """``lowmem plan --gpus 2``'s figure (``sharded_peak_bytes``) against torch's FSDPMemTracker on one of 2 ranks."""
    measured = fsdp_run[f"peak:{name}"]["peak"]["Total"]
    with torch.device("meta"):
        model = small_llama()
    planned = sharded_peak_bytes(model, name, 1, 128, 2, **run_options(name)).total
    assert abs(planned / measured - 1) <= 0.10, (planned, measured)


#: FRUGAL's random block order: the plan prices the largest tensors as active (an upper bound).
RANDOM_BLOCKS = {"frugal", "frugal_8bit"}


@pytest.mark.parametrize("name", NAMES)
def test_the_planner_prices_each_ranks_state_exactly(fsdp_run, name):
    """``lowmem.memory.optimizer_state_bytes(..., world=2)`` from the config alone equals what a rank holds (and
    ``world=1`` what one process holds): which state tensors split with the rows and which stay whole."""
    result = fsdp_run[name]
    with torch.device("meta"):
        model = small_llama()
    planned = [sum(optimizer_state_bytes(name, model, world=world, **run_options(name)).values())
               for world in (1, 2)]
    measured = [result["reference_bytes"], result["state_bytes"][0]]
    if name in RANDOM_BLOCKS:
        assert all(m <= p for m, p in zip(measured, planned, strict=True)), (planned, measured)
    else:
        assert planned == measured


@pytest.mark.parametrize("name", CHUNKED)
def test_large_8bit_moments_of_sharded_weights_update_whole(fsdp_run, name):
    result = fsdp_run[name]
    assert "error" not in result, result.get("error")
    assert result["off"] <= FLIPPED_SHARE, result


@pytest.mark.parametrize("name", SWAPPED)
def test_an_optimizer_given_its_sharded_parameters_after_construction_steps_the_same(fsdp_run, name):
    """APOLLO's seeds follow each parameter's place, not the tensor the optimizer was built on."""
    result = fsdp_run[name]
    assert "error" not in result, result.get("error")
    assert max(result["worst"]) <= 1e-5 or (name.removeprefix("swap:") in DISCRETE and result["off"] <= FLIPPED_SHARE)


@pytest.mark.parametrize("name", NAMES)
def test_layerwise_updates_each_shard_inside_backward_as_step_would(fsdp_run, name):
    """FSDP2 runs a shard's post-accumulate-grad hooks after its reduce-scatter: ``NAME_layerwise`` updates there and
    frees the gradient (none is left when backward returns), ending bit-identical to ``NAME`` updating in ``step()``
    on the same gradients."""
    result = fsdp_run[f"layerwise:{name}"]
    assert "error" not in result, result.get("error")
    assert result["gradients_left"] == [0] * 5
    assert result["worst"] == 0.0 and result["grad_norm"] > 0


def test_swapped_parameters_of_a_layerwise_optimizer_are_refused_until_followed(fsdp_run):
    assert fsdp_run["swap:galore_adamw_layerwise"]["error"].startswith(
        "ValueError: the optimizer's parameters were replaced after its layer-wise hooks were set (by FSDP2 sharding)")
    assert "optimizer.layerwise.follow_params()" in fsdp_run["swap:galore_adamw_layerwise"]["error"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    for processes, phase, saved in ((2, "save", 2), (1, "save", 1), (2, "resume", 2), (1, "resume", 2),
                                    (2, "resume", 1)):
        torchrun("fsdp_checkpoint_worker.py", processes, out, phase, saved, *NAMES)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_a_sharded_checkpoint_resumes_bit_exactly_and_loads_at_another_world_size(checkpoints, name):
    """Saved after 3 steps at 2 ranks and at 1: loaded at 2 -> 2, 2 -> 1 and 1 -> 2 ranks the optimizer state is the
    saved one, element for element (8-bit codes and block maxima, FRUGAL's active blocks included), and 2 -> 2 the
    last 2 steps are bit-identical to the run that never stopped."""
    for saved, resumed_at in ((2, 2), (2, 1), (1, 2)):
        ran = torch.load(checkpoints / f"save-{name}-w{saved}.pt", weights_only=True)["state"]
        resumed = torch.load(checkpoints / f"resume-{name}-w{resumed_at}-from{saved}.pt", weights_only=True)["state"]
        assert resumed.keys() == ran.keys()
        for key, state in ran.items():
            assert state.keys() == resumed[key].keys(), (saved, resumed_at, key)
            for field, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed[key][field])), (key, field)
    ran = torch.load(checkpoints / f"save-{name}-w2.pt", weights_only=True)["params"]
    same = torch.load(checkpoints / f"resume-{name}-w2-from2.pt", weights_only=True)["params"]
    for key, value in ran.items():
        assert torch.equal(value, same[key]), key


@pytest.mark.parametrize(("pair", "says"), [("adamw@galore_adamw", "does not create"),
                                             ("galore_adamw@adamw", "with shape")])
def test_a_checkpoint_of_another_optimizer_is_refused_by_name(checkpoints, pair, says):
    """AdamW does not hold GaLore's projector; GaLore's moments are not AdamW's shape: each names the entry before
    anything is loaded."""
    torchrun("fsdp_checkpoint_worker.py", 1, checkpoints, "mismatch", 1, pair)
    error = (checkpoints / f"mismatch-{pair}.txt").read_text()
    assert error.startswith("ValueError: the checkpoint") and says in error, error


def test_deepspeed_is_refused_naming_fsdp2(tmp_path):
    with pytest.raises(ValueError, match=r"optim='galore_adamw' with DeepSpeed: ZeRO flattens .* FSDP2 instead"):
        TrainingArguments(output_dir=str(tmp_path), optim="galore_adamw", deepspeed={"zero_optimization": {}})
