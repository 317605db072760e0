"""The package's layers point one way: ``lowmem.optim`` uses ``lowmem.kernels``, never the reverse.

``lowmem/kernels`` holds the Triton kernels and the pure-torch primitives they are twins of (the 8-bit codes, Adam's
moment update, stochastic rounding); the composed optimizer in ``lowmem/optim`` builds on them. An import of
``lowmem.optim`` from a kernel module (even one deferred inside a function) would make the two an import circle
again, so the sources are read with ``ast`` and every import in them checked.
"""

import ast
from pathlib import Path

import pytest

import lowmem

KERNELS = Path(lowmem.__file__).parent / "kernels"
FORBIDDEN = "lowmem.optim"


def _imported(path: Path, root: Path = KERNELS) -> list[tuple[int, str]]:
    """(line, absolute module name) of every module ``path`` (a file under the package directory ``root``, e.g.
    ``.../lowmem/kernels``) imports, relative imports resolved; a ``from package import name`` counts as importing
    ``package.name`` too (``name`` may be a module)."""
    package = ".".join(path.parent.relative_to(root.parent.parent).parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and _called(node) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
    return found


def _called(call: ast.Call) -> str | None:
    """The name a call calls: ``f`` for ``f(...)`` and ``x.f(...)``."""
    return getattr(call.func, "attr", getattr(call.func, "id", None))


def _is_optim(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


def test_the_kernel_sources_are_found():
    sources = sorted(p.name for p in KERNELS.rglob("*.py"))
    assert {"__init__.py", "blockwise_8bit.py", "codes_8bit.py", "common.py", "zo_noise.py"} <= set(sources)


@pytest.mark.parametrize("path", sorted(KERNELS.rglob("*.py")), ids=lambda p: p.name)
def test_no_kernel_module_imports_optim(path):
    offending = [f"{path.name}:{line} imports {module}" for line, module in _imported(path) if _is_optim(module)]
    assert not offending, ("lowmem.kernels must not import lowmem.optim (optim uses kernels, never the reverse); "
                           "move the primitive down into lowmem/kernels instead: " + "; ".join(offending))


@pytest.mark.parametrize("source, bad", [
    ("from ..optim import quantized", True),
    ("from ..optim.rules import adam_moments_", True),
    ("from .. import optim", True),
    ("import lowmem.optim.perturb", True),
    ("from lowmem import optim", True),
    ("def f():\n    from ..optim.perturb import stochastic_round", True),
    ("importlib.import_module('lowmem.optim.rules')", True),
    ("from ...optim import rules", True),  # from a subpackage of kernels
    ("from .common import stochastic_round", False),
    ("from . import codes_8bit, philox", False),
    ("from .. import memory", False),
    ("import torch.optim", False),
])
def test_the_check_catches_every_form_of_import(tmp_path, source, bad):
    """The checker itself: relative, absolute, deferred and importlib imports of lowmem.optim are all caught."""
    root = tmp_path / "lowmem" / "kernels"
    path = root / ("sub/mod.py" if source.startswith("from ...") else "mod.py")
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    assert any(_is_optim(m) for _, m in _imported(path, root)) == bad
