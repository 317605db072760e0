"""lowmem optimizers: one composable ``torch.optim.Optimizer`` and drop-in named presets."""

from .compose import LowMemOptimizer
from .presets import FRUGAL, APOLLOAdamW, FiraAdamW, GaLoreAdamW

__all__ = ["LowMemOptimizer", "GaLoreAdamW", "APOLLOAdamW", "FiraAdamW", "FRUGAL"]
