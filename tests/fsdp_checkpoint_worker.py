"""Run by ``test_fsdp.py`` under ``torchrun``: an FSDP2 run that saves its sharded model and optimizer state with
torch.distributed.checkpoint after 3 steps (``save``), or resumes from the checkpoint saved at world size SAVED
(``resume``), then takes 2 more steps; rank 0 writes the optimizer state just saved or loaded, gathered whole, and the
final full parameters to ``OUT/<phase>-<name>-w<world>[-from<SAVED>].pt``. Each step seeds the global RNG with its
number (FRUGAL's random block choice draws from it). Phase ``mismatch`` with a name ``A@B`` builds optimizer A,
prepares to load B's checkpoint and writes the error to ``OUT/mismatch-A@B.txt``.
Usage: ``fsdp_checkpoint_worker.py OUT PHASE SAVED NAME...``."""

import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsdp_worker import batches, small_llama
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from trainer_helpers import small_options

import lowmem
from lowmem.optim.sharded_checkpoint import prepare_to_load


def run(out: Path, phase: str, saved: int, name: str, mesh) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    name, _, other = name.partition("@")
    torch.manual_seed(0)
    model = small_llama()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = lowmem.create_optimizer(name, model, **{**small_options(name), "lr": 1e-2})

    def step(number, batch):
        torch.manual_seed(number)
        local = batch.chunk(world)[rank]  # the same global batch at any world size
        model(input_ids=local, labels=local).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    steps = batches()
    checkpoint = out / f"ckpt-{other or name}-w{saved}"
    if phase == "mismatch":
        try:
            prepare_to_load(model, optimizer, checkpoint)
        except ValueError as err:
            (out / f"mismatch-{name}@{other}.txt").write_text(f"ValueError: {err}")
        return
    if phase == "save":
        for number, batch in enumerate(steps[:3]):
            step(number, batch)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=checkpoint)
    else:
        prepare_to_load(model, optimizer, checkpoint)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=checkpoint)
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    _, state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    state = copy.deepcopy(state)  # at one rank the gathered tensors are the live ones, which the next steps update
    for number, batch in enumerate(steps[3:], start=3):
        step(number, batch)
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        source = "" if phase == "save" else f"-from{saved}"
        torch.save({"state": state["state"], "params": params}, out / f"{phase}-{name}-w{world}{source}.pt")


if __name__ == "__main__":
    out, phase, saved = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for name in sys.argv[4:]:
        run(out, phase, saved, name, mesh)
    dist.destroy_process_group()
