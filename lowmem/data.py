"""Training data for recipes: raw text for pretraining, tokenized and packed into ``cutoff_len``-token blocks.

``dataset`` is a comma-separated list of sources, each one of:

* ``python-stdlib``: the Python standard library's own source files, a real corpus on every machine;
* a text file or a folder: ``.txt`` / ``.md`` / ``.py`` files are read whole (one document each), ``.jsonl`` /
  ``.json`` / ``.parquet`` / ``.csv`` files give the ``text_column`` of each record;
* a Hugging Face dataset name (``allenai/c4`` with ``dataset_config: en``), when online.

Documents are tokenized with an end-of-text token after each and concatenated into blocks, as the GaLore / APOLLO
pretraining scripts use C4 but without their padding waste. ``streaming: true`` reads lazily (large corpora; then
``max_steps`` bounds the run). A byte-level BPE tokenizer can be trained on the same text (``train_bpe_tokenizer``).
"""

from __future__ import annotations

import itertools
import sysconfig
from collections.abc import Iterable
from pathlib import Path

STDLIB = "python-stdlib"
RAW_SUFFIXES = (".txt", ".md", ".py")
#: Structured files: suffix -> the ``datasets`` builder that reads them.
RECORD_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
EOS = "<|endoftext|>"


def text_files(dataset: str, limit_bytes: int | None = None) -> list[Path]:
    """The local files a ``dataset`` value names (hub names are skipped), sorted; an error for a missing path."""
    files: list[Path] = []
    for item in _items(dataset):
        if item == STDLIB:
            files += sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        elif _is_local(item):
            files += _local_files(Path(item).expanduser())
    return _first_bytes(files, limit_bytes) if limit_bytes else files


def _items(dataset: str) -> list[str]:
    items = [part.strip() for part in dataset.split(",") if part.strip()]
    if not items:
        raise ValueError(f"dataset {dataset!r} names nothing")
    return items


def _is_local(item: str) -> bool:
    """A path (exists, or looks like one); a hub name is ``owner/name`` or ``name`` that does not exist here."""
    path = Path(item).expanduser()
    if path.exists():
        return True
    if item.startswith((".", "/", "~")) or path.suffix in RAW_SUFFIXES or path.suffix in RECORD_BUILDERS:
        raise FileNotFoundError(f"dataset {item!r} does not exist (give text files or folders, comma-separated, "
                                f"{STDLIB!r}, or a Hugging Face dataset name)")
    return False


def _local_files(path: Path) -> list[Path]:
    suffixes = RAW_SUFFIXES + tuple(RECORD_BUILDERS)
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.suffix in suffixes and p.is_file())
    if not found:
        raise ValueError(f"dataset folder {str(path)!r} has no {', '.join(suffixes)} files")
    return found


def _first_bytes(files: list[Path], limit: int) -> list[Path]:
    """The leading files that hold about ``limit`` bytes (at least one)."""
    kept, total = [], 0
    for path in files:
        kept.append(path)
        total += path.stat().st_size
        if total >= limit:
            break
    return kept


def load_text(dataset: str, *, config: str | None = None, text_column: str = "text", streaming: bool = False,
              limit_bytes: int | None = None):
    """One ``datasets`` dataset with a single ``text`` column from every source ``dataset`` names."""
    from datasets import load_dataset

    parts = []
    files = text_files(dataset, limit_bytes)
    raw = [str(f) for f in files if f.suffix in RAW_SUFFIXES]
    if raw:
        try:
            parts.append(load_dataset("text", data_files=raw, sample_by="document", split="train",
                                      streaming=streaming))
        except Exception as err:
            _refuse_undecodable(err, raw)
            raise
    parts += [_text_column(data, text_column, source) for source, data in _record_files(files, streaming)]
    for name in (item for item in _items(dataset) if item != STDLIB and not _is_local(item)):
        parts.append(_text_column(_hub_dataset(name, config, streaming), text_column, name))
    return _concatenated(parts)


def _record_files(files: list[Path], streaming: bool) -> list[tuple[str, object]]:
    """(source, dataset) for the JSON / JSONL / parquet / CSV files among ``files``, one per builder."""
    from datasets import load_dataset

    loaded = []
    for suffix, builder in RECORD_BUILDERS.items():
        records = [str(f) for f in files if f.suffix == suffix]
        if records:
            loaded.append((", ".join(records),
                           load_dataset(builder, data_files=records, split="train", streaming=streaming)))
    return loaded


def _concatenated(parts: list):
    from datasets import concatenate_datasets

    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _hub_dataset(name: str, config: str | None, streaming: bool):
    from datasets import load_dataset

    try:
        return load_dataset(name, config, split="train", streaming=streaming)
    except Exception as err:  # offline, unknown name, gated: the message says which
        raise FileNotFoundError(f"dataset {name!r} is not a local path and could not be loaded from the Hugging Face "
                                f"Hub ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def _refuse_undecodable(err: Exception, files: list[str]) -> None:
    """A ``ValueError`` naming the first of ``files`` that is not UTF-8, when that is why ``err`` was raised."""
    cause = err
    while cause is not None and not isinstance(cause, UnicodeDecodeError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                while f.read(1 << 24):
                    pass
        except UnicodeDecodeError as bad:
            raise ValueError(f"dataset file {name} is not UTF-8 text ({bad.reason}: byte {bad.object[bad.start]:#x}); "
                             "convert it, e.g. iconv -f latin1 -t utf-8") from None
    raise ValueError(f"a dataset file is not UTF-8 text ({cause.reason}); convert it, e.g. iconv -f latin1 -t "
                     "utf-8") from None


def texts_of(values: list, source: str = "dataset") -> list[str]:
    """``values`` (a batch of a text column), refusing a record without text: null, or a number."""
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"{source} has a record whose text is {value!r}, not a string; drop or fix such records")
    return values


def _text_column(data, column: str, source: str):
    names = data.column_names
    if names is not None and column not in names:
        raise ValueError(f"dataset {source!r} has no {column!r} column (columns: {', '.join(names)}); set "
                         "text_column")
    kind = getattr((data.features or {}).get(column), "dtype", "string")
    if kind not in ("string", "large_string"):
        raise ValueError(f"dataset {source!r}: its {column!r} column holds {kind} values, not text; set text_column "
                         "to a column of strings")
    keep = data.select_columns([column])
    return keep.rename_column(column, "text") if column != "text" else keep


def sample_texts(data, limit_bytes: int) -> Iterable[str]:
    """The leading documents of ``data`` up to about ``limit_bytes`` (what a tokenizer is trained on)."""
    total = 0
    for row in data:
        yield texts_of([row["text"]])[0]
        total += len(row["text"])
        if total >= limit_bytes:
            return


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts`` (seconds for a few MB), with ``<|endoftext|>`` as its
    end-of-text and padding token, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)


def first_records(data, count: int | None):
    """The first ``count`` records of ``data`` (a dataset, or a streaming one); all of them for None or 0."""
    if not count:
        return data
    return data.select(range(min(count, len(data)))) if hasattr(data, "__len__") else data.take(count)


def pack(data, tokenizer, cutoff_len: int, max_samples: int | None = None):
    """``input_ids`` blocks of exactly ``cutoff_len`` tokens from ``data``'s ``text`` documents."""
    if cutoff_len < 2:
        raise ValueError(f"cutoff_len={cutoff_len} must be at least 2 tokens")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-text token to separate documents; set tokenizer.eos_token")
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(texts_of(batch["text"]), add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    def blocks(batch):
        flat = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(flat) // cutoff_len * cutoff_len
        return {"input_ids": [flat[i:i + cutoff_len] for i in range(0, usable, cutoff_len)]}

    tokens = data.map(tokenize, batched=True, remove_columns=["text"])
    packed = tokens.map(blocks, batched=True, batch_size=1000)
    if hasattr(packed, "__len__") and len(packed) == 0:
        raise ValueError(f"dataset has fewer than cutoff_len={cutoff_len} tokens; add text or lower cutoff_len")
    return first_records(packed, max_samples)


#: Used when a tokenizer has no chat template (a base model, the BPE stand-in): role tags and end-of-text.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
IGNORE = -100


def load_records(dataset: str, *, config: str | None = None, streaming: bool = False):
    """Instruction data: JSON / JSONL / parquet / CSV files or a Hub dataset, every column kept."""
    parts = []
    for item in _items(dataset):
        if item != STDLIB and _is_local(item):
            files = [f for f in _local_files(Path(item).expanduser()) if f.suffix in RECORD_BUILDERS]
            if not files:
                raise ValueError(f"dataset {item!r} has no {', '.join(RECORD_BUILDERS)} files of instruction records")
            parts += [data for _, data in _record_files(files, streaming)]
        elif item == STDLIB:
            raise ValueError(f"{STDLIB!r} is raw text: use it with stage: pt")
        else:
            parts.append(_hub_dataset(item, config, streaming))
    return _concatenated(parts)


def dataset_info_entries(dataset: str, dataset_dir: str | None) -> list[dict] | None:
    """The ``dataset_info.json`` entries that ``dataset`` names, LLaMA-Factory's way, from ``dataset_dir`` (default
    ``data``); None when there is no such file, or when none of the names is in the default one, or every name is
    one of lowmem's own local sources (paths, ``python-stdlib``): those load as before."""
    from .dataset_info import INFO, entry, read_info

    folder = dataset_dir or "data"
    info = read_info(folder)
    if info is None:
        return None
    names = _items(dataset)
    missing = [name for name in names if name not in info]
    if not missing:
        return [entry(info, name, folder) for name in names]
    if len(missing) == len(names) and (dataset_dir is None or all(
            name == STDLIB or Path(name).expanduser().exists() for name in names)):
        return None
    known = ", ".join(sorted(info)[:12]) + (" ..." if len(info) > 12 else "")
    raise ValueError(f"dataset {', '.join(missing)} is not in {Path(folder) / INFO} (it has: {known})")


def load_entries(entries: list[dict], max_samples: int | None, streaming: bool, text: bool = False,
                 stopping: str | None = None, probabilities: list[float] | None = None, seed: int = 0):
    """``dataset_info.json`` entries as one dataset: chat ``messages`` records (sft), or ``text`` (``text``: pt);
    ``max_samples`` applies to each entry, as in LLaMA-Factory. ``stopping``: interleave them (``datasets``'
    stopping strategy, with ``probabilities`` and ``seed``) instead of concatenating."""
    from datasets import interleave_datasets

    from . import dataset_info

    read = dataset_info.texts if text else dataset_info.conversations
    parts = [read(found, dataset_info.load(found, streaming), max_samples) for found in entries]
    if stopping is None or len(parts) == 1:
        return _concatenated(parts)
    return interleave_datasets(parts, probabilities=probabilities, seed=seed, stopping_strategy=stopping)


def held_out(data, val_size: float, seed: int):
    """(train, eval) of ``data``: ``val_size`` records (a count above 1, else a fraction) split off at random."""
    if not val_size:
        return data, None
    if not hasattr(data, "__len__"):
        raise ValueError("val_size with streaming: true is not supported; give eval_dataset instead")
    size = int(val_size) if val_size > 1 else val_size
    if (size if isinstance(size, int) else round(size * len(data))) >= len(data):
        raise ValueError(f"val_size={val_size} leaves no training record of {len(data)}")
    split = data.train_test_split(test_size=size, seed=seed)
    return split["train"], split["test"]


def to_messages(record: dict) -> list[dict]:
    """A record as chat messages: ``messages`` as is, or alpaca's instruction / input / output (+ system)."""
    if record.get("messages"):
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if record.get("instruction") is not None and record.get("output") is not None:
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise ValueError(f"an instruction record needs 'messages' or 'instruction' and 'output' (alpaca); this one has "
                     f"{', '.join(sorted(record))}")


def tokenize_chat(messages: list[dict], tokenizer, cutoff_len: int) -> dict:
    """``input_ids`` of the rendered chat and ``labels`` that train only on the assistant turns (prompt tokens are
    -100), truncated to ``cutoff_len``. Each assistant turn's span is found by rendering the chat up to it."""
    def ids(upto: int, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    input_ids = ids(len(messages), False)
    labels = [IGNORE] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = len(ids(i, True)), len(ids(i + 1, False))
            labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids[:cutoff_len], "labels": labels[:cutoff_len]}


def instruction_dataset(records, tokenizer, cutoff_len: int, max_samples: int | None = None, template=None,
                        train_on_prompt: bool = False, mask_history: bool = False, num_proc: int | None = None):
    """Tokenized chats with assistant-only labels: through a LLaMA-Factory ``template`` (``templates``), or the
    tokenizer's own chat template (see ``tokenize_chat``)."""
    from .templates import encode_example

    if template is None and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if template is None and (train_on_prompt or mask_history):
        raise ValueError("train_on_prompt and mask_history need a template (LLaMA-Factory's template key)")
    records = first_records(records, max_samples)
    columns = records.column_names

    def encode(record):
        if template is None:
            return tokenize_chat(to_messages(record), tokenizer, cutoff_len)
        return encode_example(template, to_messages(record), tokenizer, cutoff_len, train_on_prompt, mask_history)

    kwargs = {"num_proc": num_proc} if num_proc and hasattr(records, "__len__") else {}
    data = records.map(encode, remove_columns=columns, **kwargs)
    if hasattr(data, "__len__"):
        data = data.filter(lambda r: any(label != IGNORE for label in r["labels"]))
        if len(data) == 0:
            raise ValueError(f"no instruction record has an assistant answer within cutoff_len={cutoff_len} tokens")
    return data


def pack_examples(data, cutoff_len: int, pad_token_id: int):
    """LLaMA-Factory's ``packing`` of tokenized chats: examples (each at most ``cutoff_len - 1`` tokens) are put in
    packs of at most ``cutoff_len - 1`` tokens by its greedy knapsack (the shortest examples first, each pack then
    filled with the longest example that still fits), each pack padded to ``cutoff_len`` (label -100); positions
    restart at every example. Attention is not isolated between the examples of a pack, as in LLaMA-Factory without
    ``neat_packing``."""
    from bisect import bisect_right

    from datasets import Dataset

    rows = list(data)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    lengths = [len(rows[i]["input_ids"]) for i in order]
    packs = []
    while order:
        pack, room = [], cutoff_len - 1
        while (fit := bisect_right(lengths, room) - 1) >= 0:  # the longest example that still fits
            room -= lengths.pop(fit)
            pack.append(order.pop(fit))
        if not pack:
            raise ValueError(f"an example of {lengths[0]} tokens does not fit a pack of cutoff_len={cutoff_len}")
        packs.append(pack)
    columns = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for pack in packs:
        ids = [token for i in pack for token in rows[i]["input_ids"]]
        labels = [label for i in pack for label in rows[i]["labels"]]
        positions = [p for i in pack for p in range(len(rows[i]["input_ids"]))]
        pad = cutoff_len - len(ids)
        columns["input_ids"].append(ids + [pad_token_id] * pad)
        columns["labels"].append(labels + [IGNORE] * pad)
        columns["position_ids"].append(positions + [0] * pad)
        columns["attention_mask"].append([1] * cutoff_len)
    return Dataset.from_dict(columns)
