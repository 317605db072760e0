"""lowmem optimizers: one composable ``torch.optim.Optimizer`` and drop-in named presets.

``create_optimizer(name, model, **options)`` builds a registered optimizer for a model;
``available_optimizers()`` lists the names, and ``composition_parts()`` the parts of a generic
``<method>+<rule>[+<precision>]`` name (e.g. ``"galore+came+8bit"``); ``zeroth_order_optimizers()`` the
names that train from forwards only (``"mezo"``: ``MeZO``). The classes accept the
reference packages' constructors, so ``from lowmem.optim import GaLoreAdamW`` replaces galore-torch's.
"""

from .compose import LowMemOptimizer
from .presets import (
    CAME,
    FRUGAL,
    Adafactor,
    AdamMini,
    AdamW8bit,
    APOLLOAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    Muon,
)
from .registry import available_optimizers, composition_parts, create_optimizer, zeroth_order_optimizers
from .targets import split_parameters
from .zo import MeZO

__all__ = [
    "LowMemOptimizer", "GaLoreAdamW", "APOLLOAdamW", "FiraAdamW", "FRUGAL", "Adafactor", "CAME", "GaLoreAdafactor",
    "AdamW8bit", "GaLoreAdamW8bit", "AdamMini", "Muon", "MeZO",
    "create_optimizer", "available_optimizers", "composition_parts", "zeroth_order_optimizers", "split_parameters",
]
