"""What every numeric setting accepts, checked before anything runs: one ``ValueError`` naming the key, the value and
what it takes (``learning_rate=inf: give a finite number of 0 or more``). Used by lowmem's ``TrainingArguments``, the
recipe keys, the optimizers' options and ``lowmem plan``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


def is_real(value) -> bool:
    """A Python or NumPy int or float (not a bool), NaN and inf included."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def is_number(value) -> bool:
    """A finite int or float (not a bool, not NaN / inf)."""
    return is_real(value) and math.isfinite(value)


def is_whole(value) -> bool:
    return isinstance(value, numbers.Integral) and is_real(value)


@dataclass(frozen=True)
class Bound:
    """A number's kind (``int``: whole) and range; ``none``: None is accepted too; ``also``: other accepted values."""

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: bool = False
    also: tuple = ()

    def holds(self, value) -> bool:
        if value is None:
            return self.none
        if is_real(value) and value in self.also:
            return True
        if not (is_whole(value) if self.kind is int else is_number(value)):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def accepts(self) -> str:
        kind = "a whole number" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            text = f"{kind} in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}" \
                   f"{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{kind} {'above' if self.low_open else 'of'} {_num(self.low)}{'' if self.low_open else ' or more'}"
        else:
            text = kind
        extra = [repr(v) for v in self.also] + (["null (unset)"] if self.none else [])
        return text + (f", or {' or '.join(extra)}" if extra else "")

    def check(self, key: str, value, hint: str = "") -> None:
        if not self.holds(value):
            raise ValueError(f"{key}={value!r}: give {self.accepts()}{hint}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def check_all(values, bounds: dict[str, Bound], hints: dict[str, str] | None = None) -> None:
    """Check each key of ``bounds`` that ``values`` (a mapping, or an object's attributes) has."""
    for key, bound in bounds.items():
        if isinstance(values, dict):
            if key not in values:
                continue
            value = values[key]
        elif hasattr(values, key):
            value = getattr(values, key)
        else:
            continue
        bound.check(key, value, (hints or {}).get(key, ""))


POSITIVE_INT = Bound(int, 1)
FRACTION = Bound(float, 0, 1, high_open=True)
NON_NEGATIVE = Bound(float, 0)
POSITIVE = Bound(float, 0, low_open=True)

#: transformers ``TrainingArguments`` fields (both lowmem's subclass and recipes).
TRAINING = {
    "learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "adam_beta1": FRACTION, "adam_beta2": FRACTION,
    "adam_epsilon": NON_NEGATIVE, "num_train_epochs": NON_NEGATIVE,
    "max_grad_norm": Bound(float, none=True, also=(math.inf,)),  # 0 or less: no clipping; inf: none, norm logged
    "max_steps": Bound(int, 1, also=(-1,)), "warmup_steps": NON_NEGATIVE, "warmup_ratio": Bound(float, 0, 1),
    "per_device_train_batch_size": POSITIVE_INT, "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT, "logging_steps": NON_NEGATIVE, "save_steps": NON_NEGATIVE,
    "eval_steps": Bound(float, 0, none=True), "seed": Bound(int, 0, 2**32 - 1),
    "data_seed": Bound(int, 0, 2**32 - 1, none=True), "dataloader_num_workers": Bound(int, 0),
    "save_total_limit": Bound(int, 0, none=True), "label_smoothing_factor": FRACTION,
}
TRAINING_HINTS = {
    "max_steps": " (-1: train num_train_epochs)",
    "learning_rate": " (e.g. 1e-4)",
    "warmup_ratio": " (a fraction of the steps)",
}

#: The recipe's own data and method keys.
RECIPE = {
    "cutoff_len": Bound(int, 2), "max_samples": Bound(int, 1, none=True), "max_bytes": Bound(int, 1, none=True),
    "preprocessing_num_workers": Bound(int, 1, none=True), "val_size": NON_NEGATIVE, "lora_rank": POSITIVE_INT,
    "lora_alpha": Bound(float, 0, low_open=True, none=True), "lora_dropout": FRACTION,
    "num_virtual_tokens": POSITIVE_INT,
}

#: Optimizer options (``optim_args``, ``create_optimizer`` keywords); the rest are checked by kind
#: (``option_of_its_kind``); ``lr``, ``weight_decay``, ``eps`` and betas in torch.optim's words
#: (``compose.check_hyperparameters``), ``rank`` where the weight it does not fit is known.
OPTIONS = {
    "update_proj_gap": POSITIVE_INT, "update_gap": POSITIVE_INT, "ns_steps": POSITIVE_INT,
    "zo_samples": POSITIVE_INT, "switch_interval": POSITIVE_INT, "sinkgd_iterations": POSITIVE_INT,
    "min_8bit_size": Bound(int, 0), "seed": Bound(int, 0, 2**63 - 1), "scale": POSITIVE, "density": Bound(float, 0, 1),
    "zo_eps": POSITIVE, "ns_eps": POSITIVE, "sinkgd_eps": POSITIVE, "clip_threshold": POSITIVE, "alpha": POSITIVE,
    "momentum": FRACTION, "inactive_lr_scale": NON_NEGATIVE, "proj_params_lr_scale": NON_NEGATIVE,
}


def option_of_its_kind(key: str, value, default):
    """An optimizer option checked against its default's kind, and returned as that kind: True / False for a flag
    (``layerwise="no"`` is not False), a whole number for an int (``1e9`` becomes 1000000000; ``8.5``, True and
    "eight" are errors), a finite number for a float, text for a choice. None passes for the options that are not
    flags (their constructors read it as "unset"); lr, weight_decay and eps may be NaN / inf here, for their range
    is checked in torch.optim's words."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: give True or False")
        return value
    if value is None:
        return value
    if key in ("lr", "weight_decay", "eps"):
        if not isinstance(value, (tuple, list)) and not is_real(value):
            raise ValueError(f"{key}={value!r}: give a number")
    elif isinstance(default, int):
        if is_number(value) and float(value).is_integer() and not is_whole(value):
            value = int(value)
        Bound(int).check(key, value)
    elif isinstance(default, float):
        Bound(float).check(key, value)
    elif isinstance(default, str) and not isinstance(value, str) and not _is_dtype(value):
        raise ValueError(f"{key}={value!r}: give one of its names as text (default {default!r})")
    return value


def _is_dtype(value) -> bool:
    return type(value).__name__ == "dtype"  # a torch.dtype for a precision (state_dtype=torch.bfloat16)
