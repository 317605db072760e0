"""Checkpoints a resume can trust: written atomically, carrying a manifest, checked before anything loads.

* **Atomic.** The lowmem ``Trainer`` writes a checkpoint under ``<output_dir>/.lowmem-saving/checkpoint-N`` and
  renames it to ``<output_dir>/checkpoint-N`` once every file (of every process) is there, so a ``checkpoint-N``
  is always whole; a save cut short leaves only the staging folder, cleared at the next save.
* **Manifest** (``lowmem_checkpoint.json``, written last): every file's size and SHA-256, and the optimizer's name
  with its resolved options. A resume stops, with one line naming it, at a missing or altered file
  (``ignore_checksums=True`` skips this for checkpoints edited by hand) and at an optimizer or option that differs
  from the run's (``resume_optimizer="reset"`` starts fresh optimizer state from the saved weights). Only
  ``RESUMABLE_OPTIONS`` may change.
* **Auto-resume** (``resume_from_checkpoint=True``): the newest complete checkpoint, naming the ones skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ..checks import POSITIVE

MANIFEST = "lowmem_checkpoint.json"
#: The staging folder under the output directory; ``checkpoint-*`` globs (rotation, auto-resume) never see it.
STAGING = ".lowmem-saving"
#: Options a resume may change, and what happens to them.
RESUMABLE_OPTIONS = {"lr": "learning_rate: the schedule continues from the saved step, scaled to the new peak"}
#: ``resume_optimizer`` values: compare with the saved record; fresh optimizer state; load without a record.
RESUME_OPTIMIZER = ("check", "reset", "keep")
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed as asked (the message names the file or option and the way out)."""


def say(line: str) -> None:
    """One ``lowmem:`` line on stderr, from the first process only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"lowmem: {line}", file=sys.stderr)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(directory: Path) -> list[str]:
    """Every file under ``directory`` (relative, '/'-separated, sorted), the manifest excepted."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, optimizer: dict) -> None:
    """The manifest of ``directory`` as it is now, written to a temporary name and renamed."""
    files = {name: {"bytes": (directory / name).stat().st_size, "sha256": sha256(directory / name)}
             for name in checkpoint_files(directory)}
    write_atomically(directory / MANIFEST, json.dumps({"optimizer": optimizer, "files": files}, indent=1) + "\n")


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("files"), dict):
            raise ValueError("no file list")
        return manifest
    except (ValueError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged ({err}): the checkpoint cannot be checked; resume from another "
                              "one, or pass ignore_checksums=True to load it unchecked") from None


def verify_files(directory: Path, manifest: dict) -> None:
    """``CheckpointError`` naming the first file of the manifest that is missing, resized or altered."""
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != entry.get("bytes"):
            problem = f"has {path.stat().st_size:,} bytes, not the {entry.get('bytes'):,} it was saved with"
        elif sha256(path) != entry.get("sha256"):
            problem = "was altered since it was saved (its SHA-256 differs)"
        else:
            continue
        raise CheckpointError(f"checkpoint {directory}: {name} {problem}; resume from another checkpoint, or pass "
                              "ignore_checksums=True if you changed it on purpose")


#: transformers' names of one optimizer (the same AdamW state; 5.x picks the fused one by default on newer torch).
SAME_OPTIMIZER = {"adamw_torch_fused": "adamw_torch"}
#: Spellings of one state precision (``state_dtype``, ``dense_state_dtype``).
PRECISION_NAMES = {"fp32": "float32", "bf16": "bfloat16", "torch.float32": "float32", "torch.bfloat16": "bfloat16"}


def jsonable(value):
    """``value`` as JSON keeps it (tuples as lists; a dtype as its name; other objects as their text), so that one
    setting spelled two ways compares equal."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    return PRECISION_NAMES.get(text, text)


def optimizer_record(args) -> dict:
    """The run's optimizer: its name (``_layerwise`` is the ``layerwise`` option) and resolved options (a lowmem
    optimizer's after defaults; transformers' own with the arguments it reads)."""
    name = getattr(args, "lowmem_optim", None)
    if name is not None:
        from ..optim.registry import without_layerwise

        return {"optim": without_layerwise(name), "options": jsonable(args.lowmem_options())}
    from .arguments import parse_optim_args

    options = {"lr": args.learning_rate, "weight_decay": args.weight_decay,
               "betas": [args.adam_beta1, args.adam_beta2], "eps": args.adam_epsilon,
               **parse_optim_args(args.optim_args)}
    name = str(getattr(args.optim, "value", args.optim))
    return {"optim": SAME_OPTIMIZER.get(name, name), "options": jsonable(options)}


def option_defaults(args) -> dict:
    """A lowmem optimizer's default options (what an option a checkpoint does not record had), else none."""
    name = getattr(args, "lowmem_optim", None)
    if name is None:
        return {}
    from ..optim.registry import get_spec

    return jsonable(get_spec(name).options())


def check_optimizer(directory: Path, saved: dict | None, current: dict, has_state: bool, lowmem: bool,
                    defaults: dict | None = None) -> list[str]:
    """Compare the run's optimizer with the one that saved ``directory``; returns the resumable options that changed.
    ``CheckpointError`` when the name or another option differs, or when nothing records what saved the state that a
    ``lowmem`` optimizer would load (transformers' own optimizers resume such checkpoints as transformers does). A
    checkpoint without optimizer state (``save_only_model``) has nothing to check. An option the checkpoint does not
    record (one added since) counts as its default (``defaults``); one the run no longer has is not compared."""
    way_out = ("resume_optimizer=reset starts fresh optimizer state from the saved weights (the step, schedule and "
               "data order continue)")
    if not has_state:
        return []
    if saved is None:
        if not lowmem:
            return []
        raise CheckpointError(f"checkpoint {directory} does not record which optimizer saved its state (saved by "
                              f"transformers' Trainer or an older lowmem), so optim={current['optim']!r} cannot be "
                              f"checked against it. {way_out[0].upper() + way_out[1:]}; resume_optimizer=keep loads "
                              "the state unchecked, if you know it was this optimizer's")
    if saved.get("optim") != current["optim"]:
        raise CheckpointError(f"checkpoint {directory} was saved by optim={saved.get('optim')!r}, this run has "
                              f"optim={current['optim']!r}: its optimizer state would load into another optimizer. "
                              f"Resume with optim={saved.get('optim')!r}, or {way_out}")
    old, new = {**(defaults or {}), **saved.get("options", {})}, current["options"]
    changed = sorted(k for k in new if old.get(k, "<unset>") != new[k])
    fixed = [k for k in changed if k not in RESUMABLE_OPTIONS or not POSITIVE.holds(old.get(k))
             or not POSITIVE.holds(new[k])]
    if fixed:
        listed = ", ".join(f"{k}={old.get(k, '<unset>')!r} (now {new.get(k, '<unset>')!r})" for k in fixed)
        raise CheckpointError(f"checkpoint {directory} was saved by optim={saved['optim']!r} with {listed}: its "
                              f"optimizer state belongs to those options. Resume with them, or {way_out}. Options "
                              f"that may change on resume: {', '.join(RESUMABLE_OPTIONS)}")
    return changed


def is_complete(directory: Path, needs_optimizer: bool) -> list[str]:
    """What ``directory`` lacks to be resumed: nothing when it has a manifest (written last); for a checkpoint of
    transformers' own Trainer, its ``trainer_state.json`` (written last) and ``optimizer.pt``."""
    if (directory / MANIFEST).is_file():
        return []
    needed = ["trainer_state.json"] + (["optimizer.pt"] if needs_optimizer else [])
    return [name for name in needed if not (directory / name).exists()
            and not (name == "optimizer.pt" and (directory / "optimizer_0").is_dir())]


def newest_complete(output_dir, needs_optimizer: bool = True) -> str:
    """The newest complete ``checkpoint-N`` in ``output_dir``, saying which and what it skipped (a partial
    checkpoint, a save interrupted in the staging folder). ``FileNotFoundError`` when there is none."""
    out = Path(output_dir)
    found = sorted((p for p in out.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    skipped = [f"{STAGING}/{p.name}: a save interrupted before it completed"
               for p in sorted((out / STAGING).glob("checkpoint-*"))]
    for path in found:
        missing = is_complete(path, needs_optimizer)
        if not missing:
            note = f" (skipped {'; '.join(skipped)})" if skipped else ""
            say(f"resuming from {path}, the newest complete checkpoint{note}")
            return str(path)
        skipped.append(f"{path.name} without {' and '.join(missing)}: an interrupted save")
    raise FileNotFoundError(f"resume_from_checkpoint: true found no complete checkpoint in {out}"
                            + (f" ({'; '.join(skipped)})" if skipped else "") + "; give a checkpoint path, or drop "
                            "resume_from_checkpoint to start afresh")


def has_optimizer_state(directory: Path) -> bool:
    return (directory / "optimizer.pt").is_file() or (directory / "optimizer.bin").is_file() \
        or any(p.is_dir() and p.name.startswith("optimizer") for p in directory.iterdir())


def check_resume(directory, args) -> tuple[list[str], dict | None]:
    """Everything checked before a resume from ``directory`` loads anything: the files against the manifest (unless
    ``args.ignore_checksums``), then the optimizer against the saved one (unless ``resume_optimizer`` is reset or
    keep). Returns the resumable options that changed and the saved optimizer record."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={str(directory)!r} is not a directory; give a checkpoint-N "
                                "folder, or true for the newest complete one in output_dir")
    ignore = getattr(args, "ignore_checksums", False)
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        if not ignore:
            raise
        manifest = None  # damaged, and the files are loaded unchecked anyway
    if ignore:
        say(f"ignore_checksums=True: the files of {directory} are loaded unchecked")
    elif manifest is None:
        say(f"{directory} has no {MANIFEST} (a checkpoint of transformers' Trainer or an older lowmem): its files "
            "cannot be checked")
    else:
        verify_files(directory, manifest)
    saved = (manifest or {}).get("optimizer")
    mode = getattr(args, "resume_optimizer", "check")
    if mode == "reset":
        return [], saved
    current = optimizer_record(args)
    has_state = has_optimizer_state(directory) and (directory / "scheduler.pt").is_file()  # what transformers loads
    if mode == "keep":  # the state loads unchecked; a recorded learning rate still changes as asked
        old = (saved or {}).get("options", {}).get("lr")
        lr = current["options"].get("lr")
        return (["lr"] if has_state and POSITIVE.holds(old) and POSITIVE.holds(lr) and old != lr else []), saved
    changed = check_optimizer(directory, saved, current, has_state, getattr(args, "lowmem_optim", None) is not None,
                              option_defaults(args))
    return changed, saved
