"""Import rules of the Hub unit (src/internvl_chat/modeling): it is copied flat into every checkpoint, so it may
import only torch, transformers' public API, PIL, numpy (timm lazily, inside functions) and siblings as `from .x`."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "src" / "internvl_chat" / "modeling"
FILES = sorted(p for p in UNIT.glob("*.py") if p.name != "__init__.py")
ALLOWED_TOP = {
    "torch",
    "transformers",
    "PIL",
    "numpy",
    "math",
    "inspect",
    "dataclasses",
    "typing",
    "collections",
    "re",
    "io",
    "base64",
    "os",
    "pathlib",
    "warnings",
    "functools",
    "itertools",
    "copy",
    "json",
    "enum",
    "__future__",
    "collections.abc",
    "contextlib",
    "binascii",
    "numbers",
    "urllib",
}
LAZY_ONLY = {"timm", "torchvision"}


def imports(tree):
    """(module, level, is_top_level) for every import in the file."""
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0, id(node) in top
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level, id(node) in top


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_hub_unit_imports(path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.name} needs a module docstring"
    siblings = {p.stem for p in FILES}
    for module, level, top_level in imports(tree):
        root = module.split(".")[0]
        if level:
            assert level == 1 and module in siblings, f"{path.name}: only `from .sibling import X`, got {module!r}"
        elif root in LAZY_ONLY:
            assert not top_level, f"{path.name}: {root} must be imported lazily (inside a function)"
        else:
            assert root in ALLOWED_TOP, f"{path.name}: import of {module!r} is not allowed in the Hub unit"
        assert root != "internvl_chat", f"{path.name}: absolute self-import breaks remote code"


def test_unit_imports_without_timm():
    """Loading the Hub unit (and building a CLIP model) must not import timm."""
    code = (
        "import sys, internvl_chat\n"
        "from conftest import tiny_clip_llama_config\n"
        "internvl_chat.InternVLChatForConditionalGeneration(tiny_clip_llama_config())\n"
        "assert 'timm' not in sys.modules, 'timm was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
