"""Loading a lowmem optimizer's sharded state with torch.distributed.checkpoint (DCP), whatever state it saved.

DCP loads *into* a state dict: ``get_optimizer_state_dict`` asks the optimizer for one (on a fresh optimizer torch
first runs a step with zero gradients and lr 0 to create it), and every key of that template must be in the
checkpoint. A lowmem optimizer's keys depend on its history: FRUGAL's block projector keeps moments only for the
tensors active when it saved, and a fresh optimizer's first step picks other tensors. So before a load the template
is made from the checkpoint: every state the optimizer can hold is created (torch's zero-gradient step, then
``LowMemOptimizer.init_inactive_moments``), then what the checkpoint lacks is dropped. An entry the optimizer cannot
hold, or holds with another shape (a checkpoint of another optimizer or rank), is refused by name, never skipped.

``prepare_to_load(model, optimizer, checkpoint_dir)`` before ``dcp.load`` (or accelerate's ``load_fsdp_optimizer``,
which the lowmem Trainer calls this way) is all a caller does.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict


def saved_entries(checkpoint_dir) -> dict:
    """A DCP checkpoint directory's entries by flattened key (``optimizer.state.<param name>.<key>``, ...): each
    tensor's metadata has its global ``size``."""
    return FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata


def prepare_to_load(model: torch.nn.Module, optimizer, checkpoint_dir, prefix: str = "optimizer") -> None:
    """Give ``optimizer`` exactly the state entries that ``checkpoint_dir`` holds under ``prefix`` (the key the
    optimizer's state dict was saved under: accelerate and the lowmem Trainer use ``optimizer``), so that DCP's
    strict load fills every one of them. ``ValueError`` naming the entry if the checkpoint holds state this optimizer
    never creates, or holds with another shape."""
    saved = saved_entries(checkpoint_dir)
    label = getattr(optimizer, "name", None) or type(optimizer).__name__
    names = get_optimizer_state_dict(model, optimizer)["param_groups"]  # each parameter's name, as DCP keys it
    optimizer.init_inactive_moments()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    fqns = [fqn for group in names for fqn in group["params"]]
    for fqn, p in zip(fqns, params, strict=True):
        root = f"{prefix}.state.{fqn}."
        held = {key.removeprefix(root).split(".")[0] for key in saved if key.startswith(root)}
        state = optimizer.state[p]
        unknown = held - set(state)
        if unknown:
            raise ValueError(f"the checkpoint {checkpoint_dir} holds optimizer state {sorted(unknown)} for '{fqn}', "
                             f"which {label} does not create: it was saved by another optimizer "
                             "(or other options); resume with the optimizer and options that saved it.")
        for key in set(state) - held:
            del state[key]
        for key, value in state.items():
            size = getattr(saved.get(root + key), "size", None)
            if torch.is_tensor(value) and size is not None and tuple(size) != tuple(value.shape):
                raise ValueError(f"the checkpoint {checkpoint_dir} holds optimizer state '{key}' of '{fqn}' with shape "
                                 f"{tuple(size)}, this optimizer {tuple(value.shape)}: it was saved with other options "
                                 "(a rank, a precision); resume with the options that saved it.")
