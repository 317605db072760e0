"""Optimizer states kept in CPU memory (``offload_states=True``; the param-group key ``state_device="cpu"``).

The states of a parameter on a GPU live in pinned CPU memory between its updates. Its update streams them through
the device: the state tensors are copied in, the ordinary update runs on the device (any projector, rule and
precision: the same code, so the same result), and the new values are copied back. A large tensor updated a chunk
of elements at a time (an embedding's or head's AdamW, ``updates_in_chunks``) streams a chunk's states at a time,
so the device never holds its whole states (those copies back are synchronous: the host stores them next). The
other copies are queued on the current CUDA stream, so the host never waits for them and the device keeps one
parameter's states at a time (in layer-wise mode, one parameter's while backward goes on). A parameter's first
update allocates its pinned buffers.

What the device then holds is the weights, the gradients (all of them, or one at a time in layer-wise mode), the
activations and one parameter's states, not all states; what it costs is each state's bytes over the bus twice per
step. Unlike torchao's ``CPUOffloadOptimizer``, the gradients stay on the device, so gradient clipping and gradient
accumulation work as without offloading. Parameters on the CPU are updated in place as usual (their states are in
CPU memory already). Reading the states on the host (``state_dict()``, a checkpoint) first waits for the device.
"""

from __future__ import annotations

import torch

#: The value of the param-group key ``state_device`` that offloads.
HOST = "cpu"


def offloads(group: dict, p: torch.Tensor) -> bool:
    """Whether ``p``'s states live in CPU memory away from ``p`` (a GPU parameter in an offloading group)."""
    return group.get("state_device") == HOST and p.device.type != "cpu"


def to_device(state: dict, device: torch.device) -> dict:
    """A working copy of a parameter's state on ``device`` (tensors copied in, numbers as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in state.items()}


def back_to_host(state: dict, working: dict, wait: bool = False) -> None:
    """Store the updated working copy into the host state: into the existing buffers where the shapes allow, in new
    pinned ones otherwise (a first update, a projector that changed a state's shape); keys the update dropped go.
    ``wait``: copy synchronously (the host reads the values right after)."""
    for key, value in working.items():
        if not torch.is_tensor(value):
            state[key] = value
            continue
        host = state.get(key)
        if torch.is_tensor(host) and host.shape == value.shape and host.dtype == value.dtype:
            host.copy_(value, non_blocking=not wait)
        else:
            state[key] = host_copy(value, wait)
    for key in [k for k in state if k not in working]:
        del state[key]


def host_copy(value: torch.Tensor, wait: bool = False) -> torch.Tensor:
    """``value`` copied into CPU memory with its strides (elementwise kernels take other paths on other layouts, so
    a transposed moment must stay transposed to round the same), pinned when CUDA is present (pinned memory lets the
    copies run async)."""
    pin = torch.cuda.is_available()
    host = torch.empty_like(value, device="cpu", pin_memory=pin)  # preserve_format: a dense tensor's own strides
    return host.copy_(value, non_blocking=pin and value.is_cuda and not wait)


def wait_for_device(param_groups: list[dict]) -> None:
    """Wait for the queued copies before the host reads offloaded states."""
    if torch.cuda.is_available() and any(g.get("state_device") == HOST for g in param_groups):
        torch.cuda.synchronize()
