"""Hugging Face Trainer integration: ``Trainer(optim="galore_adamw")`` with every lowmem optimizer name.

``TrainingArguments`` and ``Trainer`` subclass transformers' own, extended only through ``__post_init__``,
``place_model_on_device`` and the Trainer's override points (``create_optimizer``, ``training_step``, ``log``,
``save_model``): layer-wise updates with gradient accumulation, the real ``grad_norm``, MeZO's forward-only step
(and its offloaded blocks gathered for saving), and errors for what cannot work (clipping, fp16 or DDP with
layer-wise or zeroth-order optimizers).
"""

from .arguments import TrainingArguments, parse_optim_args
from .trainer import Trainer

__all__ = ["Trainer", "TrainingArguments", "parse_optim_args"]
