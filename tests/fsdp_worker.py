"""Run by ``test_fsdp.py`` under ``torchrun --nproc_per_node=N`` (gloo, CPU): every named optimizer on a tiny LLaMA
sharded with FSDP2 (``fully_shard`` per decoder layer, then the root), next to the same optimizer on an unsharded
copy in the same process. Both get the same gradients each step (the copy's, scattered to the shards), so what is
compared is the optimizer's math on sharded parameters, not the reduction order of the gradients. Rank 0 writes
``{name: {"worst": max relative difference per step, "state_bytes": [per rank], "reference_bytes": int}}``.

A name written ``swap:NAME`` builds the optimizer on the unsharded model and then swaps its parameters for the
sharded ones, as accelerate's FSDP2 preparation does (``fsdp2_switch_optimizer_parameters``); ``chunk:NAME`` lowers
the size over which 8-bit moments update a chunk at a time, so this small model's tensors take that path."""

import copy
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from trainer_helpers import StdlibText, small_options
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem
from lowmem.memory import checked_step, measure_sharded_peak
from lowmem.optim import rules

STEPS = 5


def small_llama():
    """A LLaMA whose rows hold whole 8-bit blocks of 256 (hidden 256, MLP 512), so 8-bit states shard by rows."""
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def batches():
    data = StdlibText(16)
    return torch.stack([data[i]["input_ids"] for i in range(2 * STEPS)]).view(STEPS, 2, -1)


def run_options(name: str) -> dict:
    options = {**small_options(name), "lr": 1e-2}
    if name.startswith("frugal_svd"):
        # this small model's gradients have about as much rank as FRUGAL's default subspace (a quarter of 256): the
        # trailing directions are rounding noise, whose Adam first step after each reset and whose residual's signs
        # the last bits of any sum decide. A 16-dimensional subspace compares the math.
        options["density"] = 1 / 16
    return options


def shard(model, mesh) -> None:
    """``fully_shard`` each decoder layer, then the root."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def compare_layerwise(name: str, mesh) -> dict:
    """``name`` and ``name + "_layerwise"`` on two sharded copies trained on the same batches (each rank its half):
    the layer-wise one must update inside backward (FSDP2 runs a shard's hooks after its reduce-scatter), leaving no
    gradient, and end where the one updating in ``step()`` ends."""
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    stepped = small_llama()
    inside = copy.deepcopy(stepped)
    shard(stepped, mesh)
    shard(inside, mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stepped_opt = lowmem.create_optimizer(name, stepped, **run_options(name))
        inside_opt = lowmem.create_optimizer(f"{name}_layerwise", inside, **run_options(name))
    left = []
    for step, batch in enumerate(batches()):
        local = batch.chunk(world)[rank]
        for model, opt in ((stepped, stepped_opt), (inside, inside_opt)):
            torch.manual_seed(1000 + step)  # the same draws for random choices (FRUGAL's blocks)
            model(input_ids=local, labels=local).loss.backward()
            if model is inside:
                left.append(sum(p.grad is not None for p in model.parameters()))
            opt.step()
            opt.zero_grad()
    worst = max(((p.full_tensor() - q.full_tensor()).abs().max() / q.full_tensor().abs().max()).item()
                for p, q in zip(inside.parameters(), stepped.parameters(), strict=True))
    return {"worst": worst, "gradients_left": left, "grad_norm": inside_opt.layerwise.last_grad_norm}


def sharded_peak(name: str, mesh) -> dict:
    """This rank's peak live bytes (FSDPMemTracker) over a training step of 1 x 128 tokens, after one untracked."""
    torch.manual_seed(0)
    model = small_llama()
    shard(model, mesh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = lowmem.create_optimizer(name, model, **run_options(name))
    tokens = [torch.randint(256, (1, 128), generator=torch.Generator().manual_seed(step)) for step in range(3)]
    checked_step(model, optimizer, tokens[0], name)
    return {"peak": measure_sharded_peak(model, optimizer, tokens[1:])}


def compare(name: str, mesh) -> dict:
    if name.startswith("peak:"):
        return sharded_peak(name.removeprefix("peak:"), mesh)
    if name.startswith("chunk:"):
        saved, rules.CHUNK_8BIT = rules.CHUNK_8BIT, 4096
        try:
            return compare(name.removeprefix("chunk:"), mesh)
        finally:
            rules.CHUNK_8BIT = saved
    if name.startswith("layerwise:"):
        return compare_layerwise(name.removeprefix("layerwise:"), mesh)
    swap = name.startswith("swap:")
    name = name.removeprefix("swap:")
    torch.manual_seed(0)
    reference = small_llama()
    model = copy.deepcopy(reference)
    options = run_options(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if swap:
            sharded_opt = lowmem.create_optimizer(name, model, **options)
            before = {id(p): n for n, p in model.named_parameters()}
        shard(model, mesh)
        if swap:
            after = dict(model.named_parameters())
            for group in sharded_opt.param_groups:
                group["params"] = [after[before[id(p)]] for p in group["params"]]
        else:
            sharded_opt = lowmem.create_optimizer(name, model, **options)
        # the reference updates in step() (a layer-wise one would free the gradients the shards are given)
        reference_opt = lowmem.create_optimizer(name.removesuffix("_layerwise"), reference, **options)
    worst = []
    for step, batch in enumerate(batches()):
        reference(input_ids=batch, labels=batch).loss.backward()
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            p.grad = distribute_tensor(q.grad, p.device_mesh, p.placements)
        for opt in (sharded_opt, reference_opt):  # the same draws for random choices (FRUGAL's blocks)
            torch.manual_seed(1000 + step)
            opt.step()
            opt.zero_grad()
        worst.append(max(((p.full_tensor() - q).abs().max() / q.abs().max()).item()
                         for p, q in zip(model.parameters(), reference.parameters(), strict=True)))
    off = sum(int(((p.full_tensor() - q).abs() > 1e-5 * q.abs().max()).sum())
              for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    total = sum(q.numel() for q in reference.parameters())
    state_bytes = [None] * dist.get_world_size()
    dist.all_gather_object(state_bytes, sharded_opt.state_bytes())
    pending = sorted({key for state in sharded_opt.state.values() for key, value in state.items()
                      if isinstance(value, DTensor) and any(p.is_partial() for p in value.placements)})
    return {"worst": worst, "off": off / total, "state_bytes": state_bytes,
            "reference_bytes": reference_opt.state_bytes(), "pending": pending}


def main(out: Path, names: list[str]) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}
    for name in names:
        try:
            results[name] = compare(name, mesh)
        except Exception as err:  # recorded, so one name's failure names itself in the test
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    if dist.get_rank() == 0:
        (out / f"fsdp-{dist.get_world_size()}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
