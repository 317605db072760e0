"""Finding a Hugging Face decoder model's transformer blocks: the ``nn.ModuleList`` that offloading streams."""

from __future__ import annotations

from torch import nn

#: Where the common architectures keep their blocks (LLaMA / Qwen2 / Mistral, OPT, GPT-2, GPT-NeoX), after any
#: peft wrapper's ``base_model.model`` prefix.
KNOWN_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers")
_PEFT_PREFIXES = ("", "base_model.model.", "base_model.model.base_model.model.")


def module_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every ``nn.ModuleList`` of two or more modules of one class, largest first: the candidates for blocks."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(c) for c in m}) == 1]
    return sorted(found, key=lambda item: -sum(p.numel() for p in item[1].parameters()))


def find_decoder_layers(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The dotted path and ``nn.ModuleList`` of ``model``'s decoder layers: ``path`` if given, else the first of
    ``KNOWN_PATHS`` that exists. ``ValueError`` naming the candidates when neither works."""
    modules = dict(model.named_modules())
    if path is not None:
        found = modules.get(path)
        if isinstance(found, nn.ModuleList) and len(found):
            return path, found
        problem = "does not exist" if found is None else f"is a {type(found).__name__}, not a non-empty nn.ModuleList"
        raise ValueError(f"offload layers={path!r} {problem} in {type(model).__name__}. {_candidates(model)}")
    for prefix in _PEFT_PREFIXES:
        for known in KNOWN_PATHS:
            found = modules.get(prefix + known)
            if isinstance(found, nn.ModuleList) and len(found):
                return prefix + known, found
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (looked for "
                     f"{', '.join(KNOWN_PATHS)}). {_candidates(model)}")


def _candidates(model: nn.Module) -> str:
    lists = module_lists(model)
    if not lists:
        return "It has no nn.ModuleList of repeated blocks to stream, so it cannot be offloaded block by block."
    names = ", ".join(repr(name) for name, _ in lists[:3])
    return f"Pass layers='<dotted attribute>' naming its list of transformer blocks; candidates: {names}."
