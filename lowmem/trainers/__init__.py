"""Hugging Face Trainer integration: ``Trainer(optim="galore_adamw")`` with every lowmem optimizer name.

``TrainingArguments`` and ``Trainer`` subclass transformers' own (extended only through ``__post_init__`` and
``create_optimizer``). Layer-wise updates, the ZO trainer and distributed checks arrive in later increments.
"""

from .arguments import TrainingArguments, parse_optim_args
from .trainer import Trainer

__all__ = ["Trainer", "TrainingArguments", "parse_optim_args"]
