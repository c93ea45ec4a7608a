"""The package's layering, read from its imports: a lower layer never imports a higher one, and no verb imports
another verb. Every import counts, including those inside functions (lazy imports still tie the layers together).

    modeling (Hub unit), the package root
    < templates, keymaps
    < presets, factories
    < loading, generation
    < data
    < training | eval | serve | hub      (the verbs: none imports another)
    < cli, demo
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "internvl_chat"
ROOT = Path(__file__).parent.parent / "src" / PACKAGE

LAYERS = {
    "": 0,  # the package root (__init__.py): registers the Auto classes from modeling
    "modeling": 0,
    "templates": 1,
    "keymaps": 1,  # pure string functions (checkpoint key layouts)
    "presets": 2,
    "factories": 2,
    "loading": 3,
    "generation": 3,
    "data": 4,
    "training": 5,
    "eval": 5,
    "serve": 5,
    "hub": 5,
    "cli": 6,
    "demo": 6,
}
VERBS = {name for name, rank in LAYERS.items() if rank == LAYERS["training"]}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def component(module: str) -> str:
    """``internvl_chat.data.check`` → ``data``; the package itself → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def internal_imports(source: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(imported internal module, line) for every import of ``source``, at any depth (functions included).

    ``from .x import y`` yields ``x.y`` when that is a module path, which only matters for ``from .. import data``.
    """
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            if target == PACKAGE:  # `from .. import data`: the names are the components
                out += [(f"{PACKAGE}.{alias.name}", node.lineno) for alias in node.names]
            else:
                out.append((target, node.lineno))
    return out


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Human-readable layer violations of one module's imports."""
    own = component(module)
    found = []
    for target, line in internal_imports(source, module, is_package):
        other = component(target)
        if other == own:
            continue
        if other not in LAYERS:
            found.append(f"{module}:{line} imports {target}: {other!r} has no layer (add it to LAYERS)")
        elif LAYERS[other] > LAYERS[own]:
            found.append(
                f"{module}:{line} imports {target}: {own or 'root'} (layer {LAYERS[own]}) < {other} "
                f"(layer {LAYERS[other]})"
            )
        elif own in VERBS and other in VERBS:
            found.append(f"{module}:{line} imports {target}: the verb {own} imports the verb {other}")
    return found


FILES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    missing = sorted({component(module_name(p)) for p in FILES} - set(LAYERS))
    assert not missing, f"modules without a layer: {missing} (add them to LAYERS in this test and to the README)"


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_no_upward_imports(path):
    found = violations(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_module_docstring(path):
    """Each module says what it owns."""
    if path.name == "__init__.py" and not path.read_text(encoding="utf-8").strip():
        return
    assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{path} has no module docstring"


@pytest.mark.parametrize(
    "source, module, is_package, expected",
    [
        # the cycle this test exists for: the data layer reaching into a verb, lazily inside a function
        ("def f():\n    from ..training.collator import C\n", "internvl_chat.data.check", False, ["data (layer 4)"]),
        ("import internvl_chat.serve.engine\n", "internvl_chat.loading", False, ["loading (layer 3) < serve"]),
        ("from .. import hub\n", "internvl_chat.training.build", False, ["verb training imports the verb hub"]),
        ("from ..eval import runner\n", "internvl_chat.serve", True, ["verb serve imports the verb eval"]),
        ("from . import cli\n", "internvl_chat.presets", False, ["presets (layer 2) < cli"]),
        ("from .nowhere import x\n", "internvl_chat.templates", True, []),  # inside its own package
        ("from ..data import read_samples\nfrom ..factories import create\n", "internvl_chat.training.x", False, []),
        ("from .modeling import register\n", "internvl_chat", True, []),
        ("from .newthing import x\n", "internvl_chat.cli", False, ["has no layer"]),
    ],
)
def test_checker_flags_upward_imports(source, module, is_package, expected):
    found = violations(source, module, is_package)
    assert len(found) == len(expected), found
    for message, part in zip(found, expected):
        assert part in message, message
