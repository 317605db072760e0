"""The Trainer's FSDP2 path for lowmem optimizers: sharding on CPU processes, and sharded optimizer checkpoints.

* accelerate builds FSDP only for GPU-type devices: with ``fsdp=True`` on CPU processes (gloo) it runs DDP instead,
  and every process holds the whole model and optimizer state. ``shard_cpu_processes`` turns its FSDP2 path on there
  (the engine stays accelerate's ``fsdp2_prepare_model`` and torch's ``fully_shard``; only the device check is
  passed), so a CPU run, and CI, trains the way a multi-GPU one does.
* A sharded checkpoint (``fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"}``) is loaded into a state made from
  the checkpoint's own entries (``lowmem.optim.sharded_checkpoint``), so FRUGAL's blocks resume and a checkpoint of
  another optimizer is refused by name.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def shard_cpu_processes(trainer) -> None:
    """Run accelerate's FSDP2 preparation on CPU processes, where it would quietly run DDP; FSDP1 on CPU is left to
    accelerate, with a warning."""
    state = trainer.accelerator.state
    plugin_args = trainer.args.fsdp_plugin_args
    if plugin_args.get("fsdp_version") != 2 or state.distributed_type not in (DistributedType.MULTI_CPU,
                                                                               DistributedType.NO):
        warnings.warn(f"fsdp={trainer.args.fsdp!r} was asked for, but accelerate runs {state.distributed_type.value} "
                      "here (it shards on GPU-type devices only, or FSDP2 on CPU): every process holds the whole model "
                      "and optimizer state.", UserWarning, stacklevel=3)
        return
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def sharded_optimizer_dir(trainer, checkpoint: str | None) -> Path | None:
    """The DCP directory of the optimizer state in ``checkpoint`` when the Trainer will load one, else None."""
    if checkpoint is None or not trainer.is_fsdp_enabled:
        return None
    directory = Path(checkpoint) / "optimizer_0"
    return directory if (directory / ".metadata").is_file() else None
