"""ZO2-style block streaming: a decoder model's transformer blocks live in a store (CPU RAM or disk) and come to the
compute device one at a time, the next one loading while the current one computes.

Generic over Hugging Face decoder models: nothing is re-implemented per architecture. Module hooks around each
decoder layer (``layers``) do the work:

* before layer ``i`` runs: take its tensors (loaded in the background while layer ``i - 1`` ran), apply any update
  deferred to it (``defer``: the optimizer's step for a block happens here, while the block is resident), and
  start loading layer ``i + 1`` (after the last layer, layer 0 for the next forward);
* after layer ``i`` ran: write its tensors back to the store if they were updated (in the background) and drop
  them from the device.

So at most three blocks hold device memory: the one computing, the next one loading, and the last one being
written back. Everything outside the layers (embeddings, final norm, head, buffers) stays on the device.
Parameters keep their identity (only ``.data`` changes), so optimizers, peft and ``named_parameters`` still see
them; while offloaded a block's tensors are empty placeholders; use ``gathered()`` to read or save the weights.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .layers import find_decoder_layers


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class BlockStreamer:
    """Streams ``model``'s decoder layers between ``store`` and ``device`` (see the module docstring).

    ``layers``: the dotted path of the ``nn.ModuleList`` of blocks when it is not a known one (``model.layers``,
    ``model.decoder.layers``, ``transformer.h``...). Figures: ``block_bytes`` (per block), ``peak_resident_bytes``
    (the most block bytes on the device at once) and ``resident_bytes()`` (weights outside the blocks).
    """

    def __init__(self, model: nn.Module, store, device: str | torch.device | None = None, layers: str | None = None):
        self.path, self.layers = find_decoder_layers(model, layers)
        self.model, self.store = model, store
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.params = [list(layer.named_parameters()) for layer in self.layers]
        self.block_of = {id(p): i for i, named in enumerate(self.params) for _, p in named}
        self._shapes = {id(p): p.shape for named in self.params for _, p in named}
        self.block_bytes = [_bytes(p.data for _, p in named) for named in self.params]
        for i, named in enumerate(self.params):
            store.save(i, {name: p.data for name, p in named})
            for _, p in named:
                p.data = self._placeholder(p)
        for p in model.parameters():
            if id(p) not in self.block_of:
                p.data = p.data.to(self.device)
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.device)
        self.pending: dict[int, list[Callable[[], None]]] = {}
        self._dirty: set[int] = set()
        self._loading: dict[int, Future] = {}
        self._on_device: dict[int, int] = {}  # block -> bytes it holds on the device (resident or in flight)
        self._lock = threading.Lock()  # ``_on_device`` changes on both threads
        self.peak_resident_bytes = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmem-offload")
        self._upload = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._hooks = []
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(lambda module, args, i=i: self._bring(i)))
            self._hooks.append(layer.register_forward_hook(lambda module, args, out, i=i: self._release(i),
                                                           always_call=True))

    def _placeholder(self, p: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=p.dtype, device=self.device)

    # --- loading and writing back (the worker thread runs these, in submission order) ---

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        tensors = self.store.load(i)
        if self.device.type == "cpu":
            return tensors
        with torch.cuda.stream(self._upload):
            on_device = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
        self._upload.synchronize()
        return on_device

    def _write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        self.store.save(i, tensors)
        self._off_device(i)

    def _off_device(self, i: int) -> None:
        with self._lock:
            self._on_device.pop(i, None)

    def _submit_load(self, i: int) -> None:
        if i not in self._loading and not self._resident(i):
            with self._lock:
                self._on_device[i] = self.block_bytes[i]
                self.peak_resident_bytes = max(self.peak_resident_bytes, sum(self._on_device.values()))
            self._loading[i] = self._worker.submit(self._load, i)

    def _resident(self, i: int) -> bool:
        return any(p.data.numel() for _, p in self.params[i][:1])

    # --- the hooks ---

    def _bring(self, i: int, prefetch: bool = True) -> None:
        """Make block ``i`` resident, apply its deferred updates, and start loading the next block."""
        if not self._resident(i):
            self._submit_load(i)
            tensors = self._loading.pop(i).result()
            for name, p in self.params[i]:
                t = tensors[name]
                if self._upload is not None:
                    t.record_stream(torch.cuda.current_stream(self.device))
                p.data = t
        for update in self.pending.pop(i, ()):
            update()
            self._dirty.add(i)
        if prefetch:
            self._submit_load((i + 1) % len(self.layers))

    def _release(self, i: int) -> None:
        """Drop block ``i`` from the device, writing it back first if it changed."""
        tensors = {name: p.data for name, p in self.params[i]}
        for _, p in self.params[i]:
            p.data = self._placeholder(p)
        if i in self._dirty:
            self._dirty.discard(i)
            self._worker.submit(self._write, i, tensors)
        else:
            self._off_device(i)

    # --- for the optimizer and for saving ---

    def defer(self, block: int, update: Callable[[], None]) -> None:
        """Run ``update`` (which changes block ``block``'s tensors in place) the next time the block is resident."""
        self.pending.setdefault(block, []).append(update)

    def flush(self) -> None:
        """Apply every deferred update now (each block loaded, updated and written back in turn)."""
        for i in sorted(self.pending):
            self._bring(i, prefetch=False)
            self._release(i)
        self.synchronize()

    def synchronize(self) -> None:
        """Wait until every load and write-back submitted so far has finished."""
        self._worker.submit(lambda: None).result()
        for i in list(self._loading):  # prefetched blocks stay prefetched; their loads are done now
            self._loading[i].result()

    def numel(self, p: torch.Tensor) -> int:
        """Elements of parameter ``p``, also while it is an offloaded placeholder."""
        shape = self._shapes.get(id(p))
        return p.numel() if shape is None else shape.numel()

    def resident_bytes(self) -> int:
        """Bytes of the weights that stay on the device (everything outside the streamed blocks)."""
        return _bytes(p.data for p in self.model.parameters() if id(p) not in self.block_of)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Within the block, every parameter holds its current value (blocks as CPU tensors loaded from the store;
        deferred updates applied first), e.g. to save the model; afterwards the blocks are offloaded again."""
        self.flush()
        for i in list(self._loading):
            self._loading.pop(i).result()
            self._off_device(i)
        try:
            for i, named in enumerate(self.params):
                tensors = self.store.load(i)
                for name, p in named:
                    p.data = tensors[name]
            yield
        finally:
            for named in self.params:
                for _, p in named:
                    p.data = self._placeholder(p)

    def close(self) -> None:
        """Stop streaming: remove the hooks and put every block back into the model (on the CPU)."""
        self.flush()
        for hook in self._hooks:
            hook.remove()
        for i in list(self._loading):
            self._loading.pop(i).result()
        for i, named in enumerate(self.params):
            tensors = self.store.load(i)
            for name, p in named:
                p.data = tensors[name]
        self._worker.shutdown()
