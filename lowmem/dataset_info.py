"""Datasets named the LLaMA-Factory way: entries of ``dataset_info.json`` in ``dataset_dir``.

An entry gives where the records are (``file_name``: a file or a folder under ``dataset_dir``; ``hf_hub_url``: a Hub
dataset, when online) and how to read them (``formatting``: ``alpaca`` or ``sharegpt``/``openai``, with ``columns``
and ``tags`` naming the fields; as in LLaMA-Factory, a ``columns`` / ``tags`` block resets every field it does not
list). Records become chat ``messages`` (a leading system message when there is one); a sharegpt record whose roles do
not alternate is dropped, counted in one warning. ``max_samples`` keeps the first records of *each* dataset.
``ranking`` datasets (preference pairs) are refused: lowmem trains ``pt`` and ``sft``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .data import first_records

INFO = "dataset_info.json"
#: The file types LLaMA-Factory reads, by suffix: the ``datasets`` builder.
BUILDERS = {".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
           "messages": "conversations", "system": None, "tools": None, "images": None, "videos": None,
           "audios": None, "chosen": None, "rejected": None, "kto_tag": None}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function", "system_tag": "system"}


def read_info(dataset_dir: str | Path) -> dict | None:
    """``dataset_dir``'s ``dataset_info.json``, or None when it has none."""
    path = Path(dataset_dir).expanduser() / INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} must map dataset names to entries")
    return info


def entry(info: dict, name: str, dataset_dir: str | Path) -> dict:
    """The checked entry of dataset ``name``: its source and how to read it."""
    found = info[name]
    if not isinstance(found, dict):
        raise ValueError(f"dataset {name!r} in {INFO} must be a mapping (file_name, formatting, columns...)")
    if found.get("ranking"):
        raise ValueError(f"dataset {name!r} has ranking: true (preference pairs for LLaMA-Factory's rm / dpo / kto "
                         "stages): lowmem trains stage pt and sft; use an sft dataset")
    if found.get("num_samples") is not None:
        raise ValueError(f"dataset {name!r} sets num_samples (LLaMA-Factory's random resampling): not supported; use "
                         "max_samples (the first records of each dataset)")
    formatting = found.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise ValueError(f"dataset {name!r} has formatting {formatting!r}; use alpaca, sharegpt or openai")
    columns = {key: found["columns"].get(key) for key in COLUMNS} if "columns" in found else dict(COLUMNS)
    tags = OPENAI_TAGS if formatting == "openai" else TAGS
    tags = {key: found["tags"].get(key) for key in tags} if "tags" in found else dict(tags)
    return {"name": name, "formatting": formatting, "columns": columns, "tags": tags,
            "files": _files(found, name, Path(dataset_dir).expanduser()), "hub": found.get("hf_hub_url"),
            "subset": found.get("subset"), "split": found.get("split", "train"), "folder": found.get("folder")}


def _files(found: dict, name: str, dataset_dir: Path) -> list[str] | None:
    if any(found.get(key) for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")):
        if not found.get("hf_hub_url"):
            raise ValueError(f"dataset {name!r} comes from ModelScope / a script / cloud storage: lowmem reads "
                             "file_name entries and hf_hub_url ones")
        return None
    if not found.get("file_name"):
        raise ValueError(f"dataset {name!r} in {INFO} has no file_name or hf_hub_url")
    path = dataset_dir / found["file_name"]
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if not path.exists():
        raise FileNotFoundError(f"dataset {name!r}: file {str(path)!r} not found")
    unknown = sorted({p.suffix for p in files} - set(BUILDERS))
    if unknown or len({BUILDERS[p.suffix] for p in files}) > 1:
        raise ValueError(f"dataset {name!r}: files must be one type of {', '.join(BUILDERS)}, got "
                         f"{', '.join(sorted({p.suffix or p.name for p in files}))}")
    return [str(p) for p in files]


def load(found: dict, streaming: bool = False):
    """The entry's raw records (a ``datasets`` dataset)."""
    from datasets import load_dataset

    if found["files"] is None:
        try:
            return load_dataset(found["hub"], found["subset"], data_dir=found["folder"], split=found["split"],
                                streaming=streaming)
        except Exception as err:  # offline, unknown name, gated: the message says which
            raise FileNotFoundError(f"dataset {found['name']!r}: {found['hub']!r} could not be loaded from the "
                                    f"Hugging Face Hub ({type(err).__name__}: {str(err).splitlines()[0][:200]})") \
                from None
    builder = BUILDERS[Path(found["files"][0]).suffix]
    return load_dataset(builder, data_files=found["files"], split=found["split"], streaming=streaming)


def to_conversation(record: dict, found: dict) -> list[dict] | None:
    """A record as chat messages (system first when there is one); None for a record LLaMA-Factory would drop."""
    if found["formatting"] == "alpaca":
        return _alpaca(record, found["columns"])
    return _sharegpt(record, found["columns"], found["tags"])


def _alpaca(record: dict, columns: dict) -> list[dict] | None:
    messages = []
    if columns["system"] and record.get(columns["system"]):
        messages.append({"role": "system", "content": record[columns["system"]]})
    if columns["history"] and isinstance(record.get(columns["history"]), list):
        for old_prompt, old_response in record[columns["history"]]:
            messages += [{"role": "user", "content": old_prompt}, {"role": "assistant", "content": old_response}]
    query = [record[c] for c in (columns["prompt"], columns["query"]) if c and record.get(c)]
    response = record.get(columns["response"]) if columns["response"] else None
    if not isinstance(response, str):
        return None
    return messages + [{"role": "user", "content": "\n".join(query)}, {"role": "assistant", "content": response}]


def _sharegpt(record: dict, columns: dict, tags: dict) -> list[dict] | None:
    turns = record.get(columns["messages"]) or []
    role, content = tags["role_tag"], tags["content_tag"]
    system = record.get(columns["system"]) if columns["system"] else None
    if turns and tags["system_tag"] and turns[0].get(role) == tags["system_tag"]:
        system, turns = turns[0][content], turns[1:]
    user, assistant = tags["user_tag"], tags["assistant_tag"]
    if not turns or len(turns) % 2 or any(t.get(role) != (user if i % 2 == 0 else assistant)
                                          for i, t in enumerate(turns)):
        return None  # tool calls (observation / function turns) included: lowmem trains plain chats
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user" if i % 2 == 0 else "assistant", "content": t[content]}
                       for i, t in enumerate(turns)]


def conversations(found: dict, data, max_samples: int | None):
    """``data``'s records as ``messages`` (the first ``max_samples``), the dropped ones counted in one warning."""
    data = first_records(data, max_samples)
    converted = data.map(lambda r: {"messages": to_conversation(r, found)}, remove_columns=data.column_names)
    if not hasattr(converted, "__len__"):
        return converted.filter(lambda r: r["messages"] is not None)
    kept = converted.filter(lambda r: r["messages"] is not None)
    if len(kept) < len(converted):
        warnings.warn(f"dataset {found['name']!r}: dropped {len(converted) - len(kept)} of {len(converted)} records "
                      "whose roles do not alternate user / assistant or that have no answer", UserWarning,
                      stacklevel=2)
    return kept


def texts(found: dict, data, max_samples: int | None):
    """Pretraining text of an entry: its prompt column (LLaMA-Factory's ``pt`` stage), the first ``max_samples``."""
    column = found["columns"]["prompt"]
    data = first_records(data, max_samples)
    if data.column_names is not None and column not in data.column_names:
        raise ValueError(f"dataset {found['name']!r} has no {column!r} column for pretraining text (columns: "
                         f"{', '.join(data.column_names)}); set its columns: {{prompt: ...}} in {INFO}")
    keep = data.select_columns([column])
    return keep.rename_column(column, "text") if column != "text" else keep
