"""lowmem: full-parameter training of billion-parameter language models on one consumer GPU.

The public API is small: ``create_optimizer(name, model, **options)``, ``available_optimizers()`` and
``composition_parts()`` (the parts of a generic ``<method>+<rule>[+<precision>]`` name); the optimizer
classes live in ``lowmem.optim``.
"""

from .optim import available_optimizers, composition_parts, create_optimizer

__version__ = "0.1.0"
__all__ = ["create_optimizer", "available_optimizers", "composition_parts", "__version__"]
