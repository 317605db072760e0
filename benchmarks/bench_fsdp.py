"""Per-rank optimizer state, peak memory and bytes the optimizer step sends, for every name on FSDP2-sharded weights.

Run under torchrun (gloo on CPU); world size 1 and 2 side by side:

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        benchmarks/bench_fsdp.py benchmarks/results/fsdp-2.json
    (and --nproc_per_node=1 ... fsdp-1.json)

Model: LLaMA hidden 512, MLP 1536, 8 layers, vocabulary 1024 (rows hold whole 8-bit blocks); rank 64, a projector
refresh every 100 steps. Bytes sent are counted on the DTensor collectives the optimizer's own step issues
(all-reduce, all-gather, reduce-scatter inputs; FSDP's forward/backward traffic is not counted), for a refresh step
(the first) and a steady step (the second), per rank. A third step runs under torch's ``FSDPMemTracker``: the
peak live bytes of each category on this rank (sharded and unsharded weights, gradients, optimizer state,
activations and temporaries, FSDP's all-gather and reduce-scatter buffers); it varies between runs by one gathered
layer (at a reduce-scatter FSDP2 sometimes still holds a layer's all-gather buffer). ``planned_state_bytes`` and
``planned_peak`` are ``lowmem.memory.optimizer_state_bytes(name, model, world)`` and ``sharded_peak_bytes`` (what
``lowmem plan --gpus N`` prints) from the config alone, next to the measured ones.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem
from lowmem.memory import measure_sharded_peak, optimizer_state_bytes, sharded_peak_bytes

LAYERS = 8  # enough layers that one gathered layer is a small share of a rank's peak, as in a real model

COLLECTIVES = {torch.ops._c10d_functional.all_reduce.default, torch.ops._c10d_functional.all_gather_into_tensor.default,
               torch.ops._c10d_functional.reduce_scatter_tensor.default}


class SentBytes(TorchDispatchMode):
    """Adds up the input bytes of every functional collective dispatched while active (DTensor's redistributions)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor turn the op into local ops and collectives, which come back here
        if func in COLLECTIVES:
            self.bytes += args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def measure(name: str, mesh) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    options = {"lr": 1e-3}
    allowed = lowmem.optim.registry.get_spec(name).options()
    if allowed.get("rank", 0) > 1:
        options["rank"] = 64
    for gap in ("update_proj_gap", "update_gap"):
        if gap in allowed:
            options[gap] = 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = lowmem.create_optimizer(name, model, **options)
    sent = []
    for step in range(2):
        ids = torch.randint(0, 1024, (1, 64), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        with SentBytes() as counter:
            optimizer.step()
        optimizer.zero_grad()
        sent.append(counter.bytes)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    planned = sum(optimizer_state_bytes(name, meta, world=mesh.size(), **options).values())
    planned_peak = sharded_peak_bytes(meta, name, 1, 64, mesh.size(), **options).total
    return {"state_bytes": optimizer.state_bytes(), "planned_state_bytes": planned, "planned_peak": planned_peak,
            "refresh_step_bytes": sent[0],
            "steady_step_bytes": sent[1], "parameters": sum(p.numel() for p in model.parameters()),
            "peak": measure_sharded_peak(model, optimizer, [torch.randint(0, 1024, (1, 64), generator=torch.Generator()
                                                                          .manual_seed(step)) for step in (2, 3)])}


def main(out: str, names: list[str]) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    names = names or lowmem.available_optimizers()
    measure(names[0], mesh)  # discarded warm-up measurement
    results = {name: measure(name, mesh) for name in names}
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump({"world": dist.get_world_size(), "results": results}, file, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
