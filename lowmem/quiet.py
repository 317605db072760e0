"""Keep third-party noise out of the ``lowmem`` command's output (``quiet()``, called by ``lowmem.cli.main``).

* bitsandbytes: peft imports it whenever it is installed, and transformers imports peft with its
  ``TrainingArguments``, so every command would import it: 2 s of torch.compile imports and, on a CPU with AVX512-BF16,
  a ``kernels-community ... could not verify publisher trust status`` warning from its search for a hub kernel.
  ``defer_bitsandbytes()`` puts a stand-in in its place that imports the real package the first time one of its
  attributes is read (QLoRA, 8-bit optimizers of transformers, the bnb references), so only the runs that use it
  import it.
  peft's LoRA imports it to check each layer it wraps: ``lora_without_bitsandbytes()`` switches that check off for
  models without quantized layers. Where it is imported on a CPU, its warning about the hub kernel is silenced.
* peft asks a wrapped model for ``is_gradient_checkpointing``, which transformers 5.x deprecates with a
  ``FutureWarning`` on every LoRA model (the planner's included): silenced.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys
import types
import warnings
from contextlib import contextmanager

_NAME = "bitsandbytes"


def quiet() -> None:
    """Defer bitsandbytes and silence peft's deprecation warning, for the rest of this process."""
    defer_bitsandbytes()
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # where bitsandbytes is used on a CPU: its optional hub kernel needs trust_remote_code; the fallback is fine
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@contextmanager
def lora_without_bitsandbytes(model):
    """peft's LoRA imports bitsandbytes to test each target layer against its quantized types; while ``model`` is
    wrapped, those tests are switched off if it has no bitsandbytes layers (the planner's meta models, unquantized
    recipes)."""
    try:
        from peft.tuners.lora import model as lora_model
    except ImportError:
        lora_model = None
    if lora_model is None or any(type(m).__module__.partition(".")[0] == _NAME for m in model.modules()):
        yield
        return
    saved = {name: getattr(lora_model, name) for name in ("is_bnb_available", "is_bnb_4bit_available")
             if hasattr(lora_model, name)}
    for name in saved:
        setattr(lora_model, name, lambda: False)
    try:
        yield
    finally:
        for name, check in saved.items():
            setattr(lora_model, name, check)


class _Deferred(types.ModuleType):
    """bitsandbytes until one of its attributes is read; then the real package is imported and answers."""

    def __getattr__(self, attr: str):
        if not _FINDER.installed:  # the import system probing a module it is still setting up (``__path__``)
            raise AttributeError(attr)
        return getattr(_real(), attr)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Gives ``import bitsandbytes`` the stand-in until the real package is imported."""

    def __init__(self, origin: str | None):
        self.origin = origin
        self.installed = False  # the stand-in is in sys.modules
        self.loaded = False  # the real package is imported

    def find_spec(self, name, path=None, target=None):
        if name == _NAME and not self.loaded:
            return importlib.util.spec_from_loader(name, self, origin=self.origin)
        if self.loaded and name.startswith(_NAME + ".") and name in sys.modules and target is None:
            # ``import bitsandbytes.nn`` read the stand-in's ``__path__``: that imported the real package, which
            # imported this submodule too; hand it back rather than run its code a second time
            spec = importlib.util.spec_from_loader(name, self)
            spec.loader_state = sys.modules[name].__spec__
            return spec
        return None

    def create_module(self, spec):
        if spec.name == _NAME:
            module = _Deferred(_NAME)
            module.__file__ = self.origin  # inspect.getmodule() scans sys.modules for __file__: no import for that
            return module
        return sys.modules[spec.name]

    def exec_module(self, module) -> None:
        if module.__spec__.name == _NAME:
            self.installed = True
        elif module.__spec__.loader_state is not None:  # the submodule: its own spec back (the import replaced it)
            module.__spec__ = module.__spec__.loader_state


_FINDER: _Finder | None = None


def _real() -> types.ModuleType:
    """The real bitsandbytes, imported now if the stand-in is still in its place."""
    module = sys.modules.get(_NAME)
    if module is None or isinstance(module, _Deferred):
        _FINDER.loaded = True
        sys.modules.pop(_NAME, None)
        module = importlib.import_module(_NAME)
    return module


def defer_bitsandbytes() -> None:
    """Import bitsandbytes on first use (see the module docstring); nothing if it is imported or not installed."""
    global _FINDER
    if _FINDER is not None or _NAME in sys.modules:
        return
    spec = importlib.machinery.PathFinder.find_spec(_NAME)
    if spec is None:
        return
    _FINDER = _Finder(spec.origin)
    sys.meta_path.insert(0, _FINDER)


def bitsandbytes_imported() -> bool:
    """Whether the real bitsandbytes has been imported (not just its stand-in)."""
    return _NAME in sys.modules and not isinstance(sys.modules[_NAME], _Deferred)
