"""ZO2-style offloading: stream a decoder model's transformer blocks between a store (CPU RAM or disk) and the
compute device, so zeroth-order training (``optim="mezo"`` with ``offload="ram"`` or ``"disk"``) fits models far
larger than the device. See ``streamer`` for how, ``store`` for where, ``layers`` for which modules."""

from .layers import find_decoder_layers
from .store import DiskStore, RamStore, make_store
from .streamer import BlockStreamer

__all__ = ["BlockStreamer", "DiskStore", "RamStore", "find_decoder_layers", "make_store"]
