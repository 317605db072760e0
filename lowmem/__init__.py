"""lowmem: full-parameter training of billion-parameter language models on one consumer GPU.

The public API is small: ``create_optimizer(name, model, **options)`` and ``available_optimizers()``;
the optimizer classes live in ``lowmem.optim``.
"""

from .optim import available_optimizers, create_optimizer

__version__ = "0.1.0"
__all__ = ["create_optimizer", "available_optimizers", "__version__"]
