"""Quality: pretrain a tiny LLaMA from scratch on the Python standard library's source with each optimizer (and
its reference implementation), for the same token budget, and compare held-out loss.

The corpus is the stdlib's top-level ``*.py`` files: every ``EVAL_EVERY``-th file (sorted by name) is held out for
evaluation, the rest train; a byte-level BPE tokenizer is trained on the training files. Every run starts from the
same initial weights and sees the same batches in the same order (``seed``), under one schedule (linear warm-up,
cosine decay to 10%), so the only difference between two runs is the optimizer. A run that produces a non-finite
loss raises: a benchmark must fail loudly, never report a NaN as a number.
"""

from __future__ import annotations

import math
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..memory import checked_step

#: The quality model: 5.3M parameters (embeddings 2 x 1.05M, four 256-wide layers).
MODEL = dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=256, vocab_size=4096, tie_word_embeddings=False)
EVAL_EVERY = 10  # every 10th stdlib file is held out


@dataclass
class Corpus:
    """Packed token blocks: ``train`` and ``eval`` are ``(n, seq)`` int64 tensors from disjoint files."""

    train: torch.Tensor
    eval: torch.Tensor
    vocab_size: int
    files: tuple[int, int]  # training files, held-out files


def stdlib_corpus(seq: int = 128, vocab_size: int = MODEL["vocab_size"]) -> Corpus:
    """The stdlib split into training and held-out files, BPE-tokenized (trained on the training files only)."""
    from datasets import Dataset

    from ..data import pack, train_bpe_tokenizer

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    held_out = [f for i, f in enumerate(files) if i % EVAL_EVERY == EVAL_EVERY - 1]
    training = [f for f in files if f not in held_out]

    def texts(paths):
        return [p.read_text(encoding="utf-8", errors="replace") for p in paths]

    train_texts = texts(training)
    tokenizer = train_bpe_tokenizer(train_texts, vocab_size)

    def blocks(docs):
        packed = pack(Dataset.from_dict({"text": docs}), tokenizer, seq)
        return torch.tensor(packed["input_ids"], dtype=torch.long)

    return Corpus(blocks(train_texts), blocks(texts(held_out)), len(tokenizer), (len(training), len(held_out)))


@dataclass
class Run:
    """One training run's record: losses by step, the final held-out loss, time and state bytes."""

    label: str
    optimizer: str
    lr: float
    seed: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    state_bytes: int = 0
    tokens: int = 0

    @property
    def final_eval(self) -> float:
        return self.eval_loss[-1][1]


def tiny_llama(seed: int, vocab_size: int):
    """The quality model with seeded initial weights."""
    from transformers import AutoModelForCausalLM

    from ..memory import load_config

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(load_config({**MODEL, "vocab_size": vocab_size}))


def schedule(optimizer, steps: int, warmup: float = 0.1, floor: float = 0.1):
    """Linear warm-up over ``warmup`` of the steps, then cosine decay to ``floor`` x the peak learning rate."""
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch: int = 32) -> float:
    """Mean next-token loss over ``blocks`` (every block weighs the same)."""
    model.eval()
    losses = [model(input_ids=chunk, labels=chunk).loss.item() for chunk in blocks.split(batch)]
    model.train()
    return sum(losses) / len(losses)


def train(label: str, make_optimizer, corpus: Corpus, *, steps: int, batch: int, lr: float, seed: int = 0,
          eval_points: int = 10, eval_blocks: int | None = None, optimizer_name: str = "") -> Run:
    """Train the quality model for ``steps`` steps of ``batch`` blocks; ``make_optimizer(model, lr)`` builds the
    optimizer. Evaluates ``eval_points`` times on the first ``eval_blocks`` held-out blocks (all when None), and
    at the end on all of them."""
    from ..optim.states import state_bytes

    model = tiny_llama(seed, corpus.vocab_size)
    model.config.use_cache = False
    optimizer = make_optimizer(model, lr)
    scheduler = schedule(optimizer, steps)
    order = torch.randperm(len(corpus.train), generator=torch.Generator().manual_seed(seed))
    held_out = corpus.eval[:eval_blocks] if eval_blocks else corpus.eval
    run = Run(label, optimizer_name or label, lr, seed)
    every = max(1, steps // eval_points)
    start = time.perf_counter()
    for step in range(steps):
        index = order[torch.arange(step * batch, (step + 1) * batch) % len(order)]
        loss = checked_step(model, optimizer, corpus.train[index], f"{label} at step {step} (lr {lr})")
        scheduler.step()
        run.train_loss.append((step + 1, loss.item()))
        if step + 1 == steps:
            run.eval_loss.append((steps, evaluate(model, corpus.eval)))
        elif (step + 1) % every == 0:
            run.eval_loss.append((step + 1, evaluate(model, held_out)))
    run.seconds = time.perf_counter() - start
    run.tokens = steps * batch * corpus.train.shape[1]
    run.state_bytes = sum(state_bytes(s) for s in optimizer.state.values())
    if not math.isfinite(run.final_eval):
        raise FloatingPointError(f"{label}: the held-out loss is {run.final_eval}")
    return run
