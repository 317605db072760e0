"""Benchmarks against the reference implementations: optimizer-state bytes (``state``), step-time ratios
(``timing``), pretraining quality (``quality``), each reference built with lowmem's own resolved settings
(``references``). ``lowmem bench`` runs ``suite`` in its quick form; ``benchmarks/`` holds the full runs.
"""

from __future__ import annotations

import datetime
import platform
from dataclasses import dataclass

import torch

#: The pairs ``suite`` times by default: one per reference package.
TIMED = ("adamw", "adamw_8bit", "galore_adamw", "apollo_adamw", "apollo_mini", "fira_adamw", "adam_mini", "came",
         "adafactor", "galore_adafactor")


@dataclass
class SuiteResult:
    """The state rows, the timed pairs ((name, reference label, Timing or error text)) and the run's header."""

    header: str
    states: list
    timings: list


def options_for(name: str, rank: int) -> dict:
    """Options a benchmark builds ``name`` with: ``rank`` for the low-rank names (APOLLO-Mini keeps its rank 1)."""
    from ..optim.registry import get_spec

    known = get_spec(name).options()
    return {"rank": rank} if "rank" in known and known["rank"] != 1 else {}


def suite(layers: int = 12, vocab: int = 32000, rank: int = 128, names=None, timed=TIMED, repeats: int = 7,
          min_block_s: float = 0.3, references: bool = True, device: str | None = None,
          progress=print) -> SuiteResult:
    """State table for ``names`` (default: every registered one) and step-time ratios for ``timed``, on the weights
    of LLaMA-130M (hidden 768, intermediate 2048) with ``layers`` layers and a ``vocab`` vocabulary, fp32, on
    ``device`` (default: the GPU when there is one)."""
    from transformers import AutoModelForCausalLM

    from .. import available_optimizers
    from ..memory import load_config
    from .references import REFERENCES, references_of
    from .state import LLAMA_130M, random_grads, state_rows
    from .timing import time_pair

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = {**LLAMA_130M, "num_hidden_layers": layers, "vocab_size": vocab}
    where = torch.cuda.get_device_name() if device == "cuda" else f"{_cpu_name()}, {torch.get_num_threads()} threads"
    header = (f"{datetime.date.today()}; {device}: {where}; torch {torch.__version__}; LLaMA-130M shapes, {layers} "
              f"layer(s), vocab {vocab}, fp32, rank {rank}")
    names = list(names or available_optimizers())
    progress(f"state bytes of {len(names)} optimizers ...")
    states = state_rows(config, names, lambda n: options_for(n, rank), with_references=references, device=device)
    model = AutoModelForCausalLM.from_config(load_config(config)).to(device)
    timings = []
    for name in timed if references else ():
        for key in references_of(name):
            progress(f"timing {name} vs {REFERENCES[key].label} ...")
            random_grads(model)
            try:
                timing = time_pair(name, key, model, options_for(name, rank), repeats=repeats,
                                   min_block_s=min_block_s)
            except (ImportError, AssertionError, RuntimeError) as err:
                timing = f"{type(err).__name__}: {str(err)[:80]}"
                model = AutoModelForCausalLM.from_config(model.config).to(device)  # a failed step may reshape
            timings.append((name, REFERENCES[key].label, timing))
    return SuiteResult(header, states, timings)


def timing_table(timings: list) -> str:
    """Markdown: ms per step of each side and the ratio ours / reference (median, range)."""
    lines = ["| optimizer | reference | ours ms/step | ref ms/step | ours / ref (median) | range |",
             "|---|---|---:|---:|---:|---|"]
    for name, label, t in timings:
        if isinstance(t, str):
            lines.append(f"| {name} | {label} | | | | does not run here ({t}) |")
        else:
            lines.append(f"| {name} | {label} | {t.ours_ms:.1f} | {t.ref_ms:.1f} | **{t.ratio:.2f}** | "
                         f"{t.low:.2f} - {t.high:.2f} ({t.blocks} blocks) |")
    return "\n".join(lines)


def report(result: SuiteResult) -> str:
    from .state import state_table

    return "\n\n".join([result.header, "Optimizer state, bytes per parameter (after one step):",
                        state_table(result.states), "Step time, ours / reference (lower is better):",
                        timing_table(result.timings)])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()
