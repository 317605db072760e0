"""lowmem: full-parameter training of billion-parameter language models on one consumer GPU.

The public API is small: ``create_optimizer(name, model, **options)``, ``available_optimizers()`` and
``composition_parts()`` (the parts of a generic ``<method>+<rule>[+<precision>]`` name), and the Hugging Face
``Trainer`` / ``TrainingArguments`` whose ``optim`` takes those names; the optimizer classes live in
``lowmem.optim``.
"""

from .optim import available_optimizers, composition_parts, create_optimizer


def __getattr__(name: str):
    """``Trainer`` and ``TrainingArguments`` on first use: importing transformers' Trainer takes seconds."""
    if name in ("Trainer", "TrainingArguments"):
        from . import trainers

        return getattr(trainers, name)
    raise AttributeError(f"module 'lowmem' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "create_optimizer", "available_optimizers", "composition_parts", "Trainer", "TrainingArguments", "__version__",
]
