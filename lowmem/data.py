"""Training data for recipes: raw text for pretraining, tokenized and packed into ``cutoff_len``-token blocks.

``dataset`` is a comma-separated list of text files and folders (every ``*.txt``, ``*.md``, ``*.py`` and ``*.json``
file under a folder), or ``python-stdlib``: the Python standard library's own source files, a real corpus that
exists on every machine. Files are read whole (one document each) with ``datasets``' ``text`` builder, tokenized
with an end-of-text token after each document, and concatenated into blocks, as the GaLore / APOLLO pretraining
scripts pack C4. A byte-level BPE tokenizer can be trained on the same files on the fly (``train_bpe_tokenizer``).
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

STDLIB = "python-stdlib"
TEXT_SUFFIXES = (".txt", ".md", ".py", ".json")
EOS = "<|endoftext|>"


def text_files(dataset: str, limit_bytes: int | None = None) -> list[Path]:
    """The files a ``dataset`` value names, sorted; ``FileNotFoundError`` naming any path that does not exist."""
    files: list[Path] = []
    for item in (part.strip() for part in dataset.split(",")):
        if not item:
            continue
        if item == STDLIB:
            files += sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"dataset folder {item!r} has no {', '.join(TEXT_SUFFIXES)} files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"dataset {item!r} does not exist (give text files or folders, comma-separated, "
                                    f"or {STDLIB!r})")
    if not files:
        raise ValueError(f"dataset {dataset!r} names no files")
    return _first_bytes(files, limit_bytes) if limit_bytes else files


def _first_bytes(files: list[Path], limit: int) -> list[Path]:
    """The leading files that hold about ``limit`` bytes (at least one)."""
    kept, total = [], 0
    for path in files:
        kept.append(path)
        total += path.stat().st_size
        if total >= limit:
            break
    return kept


def train_bpe_tokenizer(files: list[Path], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``files`` (seconds for a few MB), with ``<|endoftext|>`` as its
    end-of-text and padding token, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def pretraining_dataset(files: list[Path], tokenizer, cutoff_len: int, max_samples: int | None = None):
    """``datasets.Dataset`` of ``input_ids`` blocks of exactly ``cutoff_len`` tokens packed from ``files``."""
    from datasets import load_dataset

    if cutoff_len < 2:
        raise ValueError(f"cutoff_len={cutoff_len} must be at least 2 tokens")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents; set tokenizer.eos_token")
    raw = load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    def pack(batch):
        flat = [token for doc in batch["input_ids"] for token in doc]
        usable = len(flat) // cutoff_len * cutoff_len
        return {"input_ids": [flat[i:i + cutoff_len] for i in range(0, usable, cutoff_len)]}

    tokens = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    blocks = tokens.map(pack, batched=True, batch_size=1000)
    if len(blocks) == 0:
        raise ValueError(f"dataset has fewer than cutoff_len={cutoff_len} tokens; add text or lower cutoff_len")
    if max_samples is not None:
        blocks = blocks.select(range(min(max_samples, len(blocks))))
    return blocks
